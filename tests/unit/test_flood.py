"""Floods: one sender's half-finished transfers never block another's, and everyone recovers."""

from __future__ import annotations

import asyncio
import os

import msgpack
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslice.broker.memory import MemoryBroker, MemoryClient
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import (
    Completed,
    Reassembler,
    Refused,
    encode_transfer,
    split_payload,
)
from edgeslice.broker.protocol.errors import RequestTimeout
from edgeslice.broker.protocol.messages import PlanMessage, PlanStage, RequestEnvelope
from edgeslice.broker.protocol.tensors import pack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import BrokerSettings
from edgeslice.client.inference import InferenceClient


def _chunks(payload: bytes, request_id: str = "r", chunk_size: int = 1024) -> list[bytes]:
    return split_payload(payload, request_id=request_id, kind="request", chunk_size=chunk_size)


def _half(count: int, size: int = 4000) -> list[bytes]:
    """Chunk 0 of ``count`` transfers that never send the rest (what a flooder leaves open)."""
    return [_chunks(os.urandom(size))[0] for _ in range(count)]


def _deliver(reassembler: Reassembler, chunks: list[bytes], now: float, sender: str) -> list:  # type: ignore[type-arg]
    return [reassembler.feed(c, now, sender=sender) for c in chunks]


def _completes(reassembler: Reassembler, payload: bytes, now: float, sender: str) -> bool:
    results = _deliver(reassembler, _chunks(payload), now, sender)
    return any(isinstance(r, Completed) and r.payload == payload for r in results)


def test_a_flooding_sender_is_held_to_its_quota_and_others_still_get_through():
    rx = Reassembler(max_open=64, max_open_per_sender=8, max_bytes_per_sender=1 << 20)
    results = _deliver(rx, _half(300), 0.0, "flooder")
    refused = [r for r in results if isinstance(r, Refused)]
    assert len(refused) == 292 and {r.reason for r in refused} == {"too_many_open"}
    assert "flooder" in refused[0].detail and refused[0].sender == "flooder"
    assert rx.held_by("flooder")[0] == 8 and rx.open_transfers == 8
    assert _completes(rx, os.urandom(5000), 0.1, "good-client")


def test_the_flooder_itself_recovers_once_its_old_transfers_are_idle():
    rx = Reassembler(max_open=64, max_open_per_sender=8, idle_s=3.0, evict_after_s=1.0)
    _deliver(rx, _half(50), 0.0, "app")
    # still hammering: nothing of its own is idle yet, so the fresh one is refused
    busy = rx.feed(_chunks(b"x" * 3000)[0], 0.5, sender="app")
    assert isinstance(busy, Refused) and busy.reason == "too_many_open"
    # a second later its oldest half-finished transfer is evicted for a fresh one
    assert _completes(rx, os.urandom(3000), 1.5, "app")
    evicted = rx.expire(1.6)
    assert [r.reason for r in evicted] == ["evicted"] and evicted[0].sender == "app"
    # and a few seconds after the flood stops, nothing of it is left
    timed_out = rx.expire(10.0)
    assert {r.reason for r in timed_out} == {"timed_out"} and "none for" in timed_out[0].detail
    assert rx.open_transfers == 0 and rx.buffered_bytes == 0 and rx.held_by("app") == (0, 0)


def test_the_global_bound_evicts_the_oldest_idle_transfer_instead_of_refusing():
    rx = Reassembler(max_open=4, evict_after_s=1.0)
    olds = _half(4)
    for i, chunk in enumerate(olds):
        assert rx.feed(chunk, float(i) * 0.1, sender=f"s{i}") is None
    fresh = _chunks(os.urandom(3000))
    assert isinstance(rx.feed(fresh[0], 0.5, sender="late"), Refused)  # nothing idle yet
    fresh = _chunks(os.urandom(3000))
    assert rx.feed(fresh[0], 1.05, sender="late") is None  # s0 (idle 1.05 s) made room
    evicted = rx.expire(1.1)
    assert [(r.reason, r.sender) for r in evicted] == [("evicted", "s0")]
    assert msgpack.unpackb(olds[0])["t"] == evicted[0].transfer_id


def test_a_header_nobody_waits_for_is_refused_at_once():
    wanted = {"mine"}
    rx = Reassembler(accept=lambda h: None if h.request_id in wanted else "not awaited")
    for chunk in _half(600):
        refused = rx.feed(chunk, 0.0)
        assert isinstance(refused, Refused) and refused.reason == "unexpected"
    assert rx.open_transfers == 0
    payload = os.urandom(5000)
    results = _deliver(rx, _chunks(payload, request_id="mine"), 0.0, "")
    assert any(isinstance(r, Completed) and r.payload == payload for r in results)


def test_another_sender_cannot_touch_a_transfer_it_does_not_own():
    rx = Reassembler()
    chunks = _chunks(os.urandom(5000))
    assert rx.feed(chunks[0], 0.0, sender="a") is None
    forged = rx.feed(chunks[1], 0.0, sender="b")
    assert isinstance(forged, Refused) and forged.reason == "malformed"
    garbage = msgpack.unpackb(chunks[2]) | {"d": b""}
    assert isinstance(rx.feed(msgpack.packb(garbage), 0.0, sender="b"), Refused)
    assert rx.open_transfers == 1  # a's transfer is still open and completes
    assert any(isinstance(r, Completed) for r in _deliver(rx, chunks[1:], 0.0, "a"))


def _header(count: int, length: int) -> bytes:
    """A header chunk that promises ``count`` chunks / ``length`` bytes and brings none."""
    fields = {"t": os.urandom(4).hex(), "s": 0, "v": [1, 0], "r": "r", "k": "request", "p": "",
              "pv": 0, "st": 0, "n": count, "l": length, "c": 0, "m": {}, "d": b""}  # fmt: skip
    return msgpack.packb(fields)


def _data(seq: int, data: bytes) -> bytes:
    return msgpack.packb({"t": "x" * 8, "s": seq, "d": data})


_flood_chunk = st.one_of(
    st.binary(max_size=64),
    st.builds(_header, st.integers(1, 2**20), st.integers(0, 2**30)),
    st.builds(_data, st.integers(0, 2**33), st.binary(max_size=32)),
)


@settings(max_examples=60, deadline=None)
@given(flood=st.lists(_flood_chunk, max_size=80), size=st.integers(0, 6000))
def test_no_flood_keeps_a_good_sender_out_or_breaks_the_accounting(flood, size):
    quota_open, quota_bytes = 4, 1 << 20
    rx = Reassembler(
        max_open=16, max_buffered_bytes=4 << 20, max_open_per_sender=quota_open,
        max_bytes_per_sender=quota_bytes, max_transfer_bytes=1 << 30,
    )  # fmt: skip
    for i, chunk in enumerate(flood):
        rx.feed(chunk, i * 0.001, sender="bad")
        held_open, held_bytes = rx.held_by("bad")
        assert held_open <= quota_open and held_bytes <= quota_bytes
    assert _completes(rx, os.urandom(size), 0.5, "good")
    rx.expire(100.0)
    assert rx.open_transfers == 0 and rx.buffered_bytes == 0 and rx.held_by("bad") == (0, 0)


# -- the inference client over the in-memory broker -------------------------------------------


def test_a_client_ignores_garbage_plans_and_floods_on_its_results_topic() -> None:
    settings = BrokerSettings(host="memory", port=0, namespace="unit")
    t = Topics("unit")
    x = torch.randn(1, 4)
    plan = PlanMessage(
        model="m", plan_id="p", plan_version=1, objective="latency", strategy="edgeslice",
        stages=[PlanStage(0, 0, 1, ["a1"], artifact="a" * 64)],
        input_specs=[{"dtype": "float32", "shape": [1, 4]}], ready=True,
    )  # fmt: skip

    async def echo_agent(agent: MemoryClient, rx: Reassembler) -> None:
        """Stands in for agent a1: answers each request with its own input, to the topic's
        client (what a real agent does), never to the envelope's reply_to."""
        async for msg in agent.messages():
            done = rx.feed(msg.payload, 0.0, sender=t.parse(msg.topic).name)
            if isinstance(done, Completed):
                env = codec.from_wire(done.header.meta, RequestEnvelope)
                meta, payload = pack_tensors([x])
                reply = encode_transfer(
                    bytes(payload), request_id=done.header.request_id, kind="result",
                    meta=codec.to_wire(RequestEnvelope(env.route, env.reply_to, meta)),
                )  # fmt: skip
                for chunk in reply.chunks:
                    await agent.publish(t.client_results(t.parse(msg.topic).name), chunk)

    async def scenario() -> None:
        broker = MemoryBroker()
        planner, agent = broker.client("planner"), broker.client("a1")
        await planner.connect()
        await agent.connect()
        await agent.subscribe(t.agent_inbox("a1"), qos=1)
        serving = asyncio.create_task(echo_agent(agent, Reassembler()))
        await planner.publish(t.plan("m"), b"\xc1 garbage", qos=1, retain=True)
        async with InferenceClient(settings, "m", "app", transport=broker.factory) as client:
            try:
                await client.wait_ready(0.3)
                raise AssertionError("a garbage plan was taken for a plan")
            except RequestTimeout as exc:
                assert f"malformed plan was seen on topic {t.plan('m')}" in str(exc)
            await planner.publish(t.plan("m"), codec.encode(plan), qos=1, retain=True)
            assert (await client.wait_ready(5)).plan_id == "p"
            for chunk in _half(600):  # results nobody asked for, never finished
                await planner.publish(t.client_results("app"), chunk)
            result = await client.infer(x, timeout=5)
            assert torch.equal(result.outputs[0], x)
            assert client._reassembler.open_transfers == 0
        serving.cancel()

    asyncio.run(scenario())
