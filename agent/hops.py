"""What one request sends next from this agent: its checks against the stage this agent
holds, the next hop's transfer (an activation, or the result to the client), and the error
reply when it fails.

Plain functions over values (the data plane's worker thread and event loop call them):
who sent a request is the client id from its inbox topic (``agents/{id}/inbox/{client}``),
never a field of the payload, so results, errors and forwarded activations all go under
that id, and a request whose envelope ``reply_to`` names another client is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from edgeslice.agent.runtime import LoadedStage, StageRuntime
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, TransferHeader, encode_transfer
from edgeslice.broker.protocol.errors import (
    EdgesliceError,
    InferenceError,
    StageUnavailableError,
)
from edgeslice.broker.protocol.messages import ErrorReply, RequestEnvelope, StageTiming
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Topics


@dataclass
class Job:
    """One completed inbound transfer waiting for compute."""

    done: Completed
    received_at: float  # time.time() when the last chunk arrived
    recv_s: float  # first chunk -> last chunk on this agent
    client_id: str = ""  # from the inbox topic: who sent it, where its result goes

    @property
    def header(self) -> TransferHeader:
        return self.done.header


@dataclass
class Prepared:
    """A job checked and unpacked on the stage thread, ready to run with others."""

    job: Job
    env: RequestEnvelope
    sha: str
    stage: LoadedStage
    inputs: list[Tensor]


@dataclass(frozen=True)
class Outbound:
    """What a computed job sends next: topic + chunks, or an error to the client; or, for a
    tiled request, a piece this agent keeps for itself (``local``, agent/tiles.py)."""

    topic: str
    chunks: list[bytes]
    request_id: str
    local: Any = None  # an agent.tiles.LocalPiece: fed back to this agent, never published


def prepare(job: Job, agent_id: str, runtime: StageRuntime) -> Prepared:
    """Decode and check one job's envelope and inputs against this agent's stage."""
    header = job.done.header
    stage = header.stage
    env = codec.from_wire(header.meta, RequestEnvelope)
    if env.reply_to != job.client_id:
        raise InferenceError(
            f"request {header.request_id} came from client {job.client_id!r} (its inbox "
            f"topic) but asks for its result to go to {env.reply_to!r}; refused: a "
            "client gets only its own results (set reply_to to the client id you "
            "publish under)"
        )
    route = env.route
    if not 0 <= stage < len(route) or route[stage].agent_id != agent_id:
        raise InferenceError(
            f"request {header.request_id} routes stage {stage} to "
            f"{route[stage].agent_id if 0 <= stage < len(route) else 'nobody'}, "
            f"not to agent {agent_id}"
        )
    sha = route[stage].artifact
    loaded = runtime.get(sha)
    if loaded is None:
        raise StageUnavailableError(
            f"agent {agent_id} has no stage {stage} loaded for artifact {sha[:12]} "
            f"(plan {header.plan_id} v{header.plan_version}); the plan changed: retry"
        )
    inputs = unpack_tensors(env.tensors, job.done.payload, share=True)
    loaded.check_inputs(inputs)
    return Prepared(job, env, sha, loaded, inputs)


def next_hop(
    p: Prepared,
    outputs: list[Tensor],
    timing: StageTiming,
    topics: Topics,
    chunk_size: int,
    now: float,
) -> Outbound:
    """The request's outputs, with ``timing`` appended, to the next stage's agent, or to
    the client when this was the last stage."""
    job, env, header = p.job, p.env, p.job.done.header
    stage, route = header.stage, env.route
    last = stage == len(route) - 1
    compression = None if last else (env.compression or None)
    tensor_meta, payload = pack_tensors(outputs, compression=compression)
    timing = replace(timing, sent_bytes=memoryview(payload).nbytes)
    forward = replace(env, tensors=tensor_meta, timings=[*env.timings, timing], sent_at=now)
    if last:
        topic = topics.client_results(job.client_id)
        kind = "result"
    else:  # the next stage learns the client from the topic, as this one did
        topic = topics.inbox(route[stage + 1].agent_id, job.client_id)
        kind = "activation"
    encoded = encode_transfer(
        payload,
        request_id=header.request_id,
        kind=kind,
        plan_id=header.plan_id,
        plan_version=header.plan_version,
        stage=stage + 1,
        deadline=header.deadline,
        meta=codec.to_wire(forward),
        chunk_size=chunk_size,
    )
    return Outbound(topic, encoded.chunks, header.request_id)


def error_reply(
    header: TransferHeader,
    exc: Exception,
    client_id: str,
    agent_id: str,
    topics: Topics,
    chunk_size: int,
) -> tuple[Outbound, ErrorReply] | None:
    """An ``error`` transfer to the client that sent the request (named by the inbox topic,
    whatever the envelope says); None when the client id is not a valid one.

    ``retryable`` and ``code`` come from the exception (errors.py); anything that is not
    an EdgesliceError (a torch failure inside the stage) is ``stage_failed``, final. An
    envelope that does not decode is answered too (without timings).
    """
    try:
        env: RequestEnvelope | None = codec.from_wire(header.meta, RequestEnvelope)
    except EdgesliceError:
        env = None
    try:
        topic = topics.client_results(client_id)
    except EdgesliceError:
        return None
    known = exc if isinstance(exc, EdgesliceError) else None
    reply = ErrorReply(
        error=str(exc),
        stage=header.stage,
        agent=agent_id,
        retryable=known.retryable if known else False,
        code=known.code if known else "stage_failed",
        timings=env.timings if env is not None else [],
    )
    encoded = encode_transfer(
        b"",
        request_id=header.request_id,
        kind="error",
        stage=header.stage,
        meta=codec.to_wire(reply),
        chunk_size=chunk_size,
    )
    return Outbound(topic, encoded.chunks, header.request_id), reply
