"""The typed request envelope and error reply: round trips, tolerance, refusals, retryability."""

from __future__ import annotations

import pytest

from edgeslice.agent.dataplane import DataPlane, Job
from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.protocol import PROTOCOL_MAJOR, codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, encode_transfer
from edgeslice.broker.protocol.errors import (
    AgentBusyError,
    DecodeError,
    EdgesliceError,
    InferenceError,
    RemoteStageError,
    StageUnavailableError,
    TransferError,
    VersionError,
)
from edgeslice.broker.protocol.messages import ErrorReply, RequestEnvelope, RouteHop, StageTiming
from edgeslice.broker.protocol.topics import Topics

ENV = RequestEnvelope(
    route=[RouteHop("pi-1", "a" * 64), RouteHop("pi-2", "b" * 64)],
    reply_to="client-1",
    tensors=[{"dtype": "float32", "shape": [1, 3], "nbytes": 12}],
    model="resnet18",
    compression="fp16",
    sent_at=1700000000.5,
    timings=[StageTiming(0, "pi-1", recv_s=0.01, transfer_s=0.02, queue_s=0.0, compute_s=0.3)],
)


def _through_a_transfer(meta: dict[str, object], kind: str = "request") -> dict[str, object]:
    """What the receiver of a chunked transfer sees in the header's ``m``."""
    chunks = encode_transfer(b"x" * 3000, request_id="r", kind=kind, meta=meta, chunk_size=1024)
    reassembler = Reassembler()
    results = [reassembler.feed(c, 0.0) for c in chunks.chunks]
    done = results[-1]
    assert isinstance(done, Completed)
    return done.header.meta


def test_envelope_round_trips_through_a_chunked_transfer() -> None:
    back = codec.from_wire(_through_a_transfer(codec.to_wire(ENV)), RequestEnvelope)
    assert back == ENV
    assert isinstance(back.route[1], RouteHop)
    assert back.route[1].agent_id == "pi-2"
    assert isinstance(back.timings[0], StageTiming)


def test_envelope_also_round_trips_as_a_standalone_message() -> None:
    assert codec.decode(codec.encode(ENV), RequestEnvelope) == ENV


def test_route_hops_travel_as_two_item_lists_as_in_protocol_1_1() -> None:
    wire = codec.unpackb(codec.packb(codec.to_wire(ENV)))
    assert wire["route"] == [["pi-1", "a" * 64], ["pi-2", "b" * 64]]


def test_a_protocol_1_1_map_without_kind_or_version_is_read() -> None:
    old = {
        "route": [["pi-1", "sha"]],
        "reply_to": "c",
        "tensors": [],
        "model": "m",
        "compression": "",
        "sent_at": 1.0,
        "timings": [],
    }
    env = codec.from_wire(old, RequestEnvelope)
    assert env.route == [RouteHop("pi-1", "sha")]
    assert env.reply_to == "c"


def test_unknown_fields_are_ignored() -> None:
    wire = {**codec.to_wire(ENV), "trace_id": "abc", "priority": 3}
    wire["timings"] = [{**wire["timings"][0], "gpu_s": 1.0}]
    assert codec.from_wire(wire, RequestEnvelope) == ENV


def test_a_newer_major_version_is_refused() -> None:
    wire = {**codec.to_wire(ENV), "v": [PROTOCOL_MAJOR + 1, 0]}
    with pytest.raises(VersionError, match="upgrade"):
        codec.from_wire(wire, RequestEnvelope)


def test_a_newer_minor_version_is_accepted() -> None:
    wire = {**codec.to_wire(ENV), "v": [PROTOCOL_MAJOR, 99]}
    assert codec.from_wire(wire, RequestEnvelope) == ENV


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("route", "pi-1"),  # not a list
        ("route", [["pi-1"]]),  # a hop of one item
        ("route", [["pi-1", 7]]),  # artifact not a str
        ("route", [{"agent_id": "pi-1", "artifact": "x"}]),  # a hop as a map
        ("reply_to", None),
        ("reply_to", 12),
        ("tensors", {"dtype": "float32"}),
        ("sent_at", "now"),
        ("timings", [{"stage": "0", "agent": "pi-1"}]),
        ("timings", [{"agent": "pi-1"}]),  # stage missing
        ("compression", False),
    ],
)
def test_wrong_types_are_a_decode_error(field: str, value: object) -> None:
    wire = {**codec.to_wire(ENV), field: value}
    with pytest.raises(DecodeError, match=field):
        codec.from_wire(wire, RequestEnvelope)


@pytest.mark.parametrize("wire", [None, [], "request", {"reply_to": "c"}, {"route": []}])
def test_not_an_envelope_is_a_decode_error(wire: object) -> None:
    with pytest.raises(DecodeError):
        codec.from_wire(wire, RequestEnvelope)


def test_an_error_reply_is_not_read_as_an_envelope() -> None:
    reply = ErrorReply(error="boom", stage=1, agent="pi-2")
    with pytest.raises(DecodeError, match="expected a 'request'"):
        codec.from_wire(codec.to_wire(reply), RequestEnvelope)


def test_error_replies_carry_retryable_and_code() -> None:
    reply = ErrorReply(
        error="agent pi-2 has no stage 1 loaded",
        stage=1,
        agent="pi-2",
        retryable=True,
        code="stage_unavailable",
        timings=ENV.timings,
    )
    back = codec.from_wire(_through_a_transfer(codec.to_wire(reply), "error"), ErrorReply)
    assert back == reply
    assert back.retryable is True


def test_a_protocol_1_1_error_map_is_read_as_final_with_the_default_code() -> None:
    old = {"error": "boom", "stage": 2, "agent": "pi-3", "retryable": False, "timings": []}
    reply = codec.from_wire(old, ErrorReply)
    assert (reply.stage, reply.agent, reply.retryable, reply.code) == (2, "pi-3", False, "error")


def test_error_reply_with_a_string_retryable_is_a_decode_error() -> None:
    wire = {**codec.to_wire(ErrorReply("boom", 0, "pi-1")), "retryable": "yes"}
    with pytest.raises(DecodeError, match="retryable"):
        codec.from_wire(wire, ErrorReply)


# -- retryability is a field --------------------------------------------------------------


def test_errors_are_final_unless_their_class_says_otherwise() -> None:
    assert EdgesliceError("x").retryable is False
    assert InferenceError("please retry").retryable is False  # the text decides nothing
    assert StageUnavailableError("x").retryable is True
    assert AgentBusyError("x").retryable is True
    assert StageUnavailableError("x").code == "stage_unavailable"


@pytest.mark.parametrize(
    ("reason", "retryable"),
    [
        ("too_many_open", True),
        ("buffer_full", True),
        ("stale_plan", True),
        ("malformed", False),
        ("too_large", False),
        ("version", False),
    ],
)
def test_refused_transfers_are_retryable_by_reason(reason: str, retryable: bool) -> None:
    error = TransferError("refused", reason=reason)
    assert (error.retryable, error.code) == (retryable, reason)


def test_remote_stage_error_keeps_what_the_agent_said() -> None:
    error = RemoteStageError("x", stage=1, agent="pi-2", retryable=True, code="busy")
    assert (error.retryable, error.code, error.stage, error.agent) == (True, "busy", 1, "pi-2")
    assert RemoteStageError("x").retryable is False


# -- the agent answers every bad request with a typed error reply ---------------------------


def _agent_reply(
    meta: dict[str, object], stage: int = 0, sender: str = "c"
) -> tuple[str, ErrorReply | None]:
    """Run one inbound transfer from client ``sender`` through an agent with no stage loaded."""
    plane = DataPlane("pi-1", None, Topics("t"), StageRuntime())  # type: ignore[arg-type]
    try:
        chunks = encode_transfer(b"", request_id="r", kind="request", stage=stage, meta=meta)
        done = Reassembler().feed(chunks.chunks[0], 0.0)
        assert isinstance(done, Completed)
        out = plane._compute(Job(done, received_at=0.0, recv_s=0.0, client_id=sender), started=0.0)
    finally:
        plane.close()
    if not out.chunks:
        return out.topic, None
    reply = Reassembler().feed(out.chunks[0], 0.0)
    assert isinstance(reply, Completed) and reply.header.kind == "error"
    return out.topic, codec.from_wire(reply.header.meta, ErrorReply)


def test_a_stage_that_is_not_loaded_is_a_retryable_reply() -> None:
    env = RequestEnvelope(route=[RouteHop("pi-1", "a" * 64)], reply_to="c", timings=[])
    topic, reply = _agent_reply(codec.to_wire(env))
    assert topic == Topics("t").client_results("c")
    assert reply is not None
    assert (reply.retryable, reply.code, reply.agent, reply.stage) == (
        True,
        "stage_unavailable",
        "pi-1",
        0,
    )


def test_a_request_routed_to_another_agent_is_a_final_reply() -> None:
    env = RequestEnvelope(route=[RouteHop("pi-9", "a" * 64)], reply_to="c")
    _topic, reply = _agent_reply(codec.to_wire(env))
    assert reply is not None
    assert reply.retryable is False
    assert "pi-9" in reply.error


def test_an_envelope_of_wrong_types_is_answered_with_a_decode_error() -> None:
    _topic, reply = _agent_reply({**codec.to_wire(ENV), "route": "pi-1"})
    assert reply is not None
    assert (reply.retryable, reply.code) == (False, "decode")
    assert "route" in reply.error


def test_the_reply_goes_to_the_sender_named_by_the_topic_not_the_envelope() -> None:
    env = RequestEnvelope(route=[RouteHop("pi-1", "a" * 64)], reply_to="victim")
    topic, reply = _agent_reply(codec.to_wire(env), sender="c")
    assert topic == Topics("t").client_results("c")
    assert reply is not None and reply.retryable is False and "'victim'" in reply.error
    topic, reply = _agent_reply({**codec.to_wire(ENV), "reply_to": 5}, sender="c")
    assert topic == Topics("t").client_results("c") and reply is not None
    assert reply.code == "decode"


def test_a_request_without_a_valid_sender_gets_no_reply() -> None:
    topic, reply = _agent_reply(codec.to_wire(ENV), sender="")
    assert (topic, reply) == ("", None)
