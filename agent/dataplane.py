"""The agent's data plane: inbox chunks -> reassembly -> stage compute -> next hop or client.

Requests carry a typed :class:`RequestEnvelope` in the transfer header: their route (one
``(agent_id, artifact)`` hop per stage, chosen by the client); an envelope that does not
decode is answered with an error, never a crash. Who sent a request is known from the topic
only (``agents/{id}/inbox/{client}``, which the broker's ACL lets a client write under its own
username alone): results and errors go to that client, forwarded activations keep its
segment, and a request whose envelope ``reply_to`` names another client is refused. The
client id is also the *sender* the reassembler bounds, so one client flooding half-finished
transfers holds at most ``max_open_per_sender`` of them, which are evicted when idle
(``evict_after_s``) and expired after ``idle_s`` without a chunk. This agent runs the
stage named by the header's ``stage`` with the artifact the route names, so a request
planned under an older plan version still finishes while its stages stay loaded. Compute
runs on one worker thread (torch never blocks the MQTT loop); reassembly and publishing
run on the event loop, so stage k of request n+1 arrives while request n computes, and
request n's output is published while n+1 computes. Every failure becomes an ``error``
transfer to the client naming the stage and agent; nothing hangs silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import (
    Completed,
    Reassembler,
    Refused,
    TransferHeader,
    encode_transfer,
)
from edgeslice.broker.protocol.errors import (
    AgentBusyError,
    EdgesliceError,
    InferenceError,
    StageUnavailableError,
    TransferError,
)
from edgeslice.broker.protocol.messages import ErrorReply, RequestEnvelope, StageTiming
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One completed inbound transfer waiting for compute."""

    done: Completed
    received_at: float  # time.time() when the last chunk arrived
    recv_s: float  # first chunk -> last chunk on this agent
    client_id: str = ""  # from the inbox topic: who sent it, where its result goes


@dataclass
class StageStats:
    """Running averages of one stage's timings, reported in telemetry for the planner."""

    stage: int
    count: int = 0
    compute_s: float = 0.0
    queue_s: float = 0.0

    def add(self, compute_s: float, queue_s: float) -> None:
        self.count += 1
        alpha = 1.0 / min(self.count, 20)  # mean of the first 20, then an EWMA
        self.compute_s += alpha * (compute_s - self.compute_s)
        self.queue_s += alpha * (queue_s - self.queue_s)


@dataclass(frozen=True)
class Outbound:
    """What a computed job sends next: topic + chunks, or an error to the client."""

    topic: str
    chunks: list[bytes]
    request_id: str


class DataPlane:
    """Receives chunks for this agent, runs stages, forwards outputs (see module doc)."""

    def __init__(
        self,
        agent_id: str,
        client: Transport,
        topics: Topics,
        runtime: StageRuntime,
        max_queue: int = 64,
        chunk_size: int = 256 * 1024,
        clock: Callable[[], float] = time.time,
        idle_s: float = 5.0,
        max_open_per_sender: int = 64,
    ) -> None:
        self.agent_id = agent_id
        self.client = client
        self.topics = topics
        self.runtime = runtime
        self.max_queue = max_queue
        self.chunk_size = chunk_size
        self.clock = clock
        self.reassembler = Reassembler(
            max_open=256,
            max_age_s=60.0,
            max_open_per_sender=max_open_per_sender,
            max_bytes_per_sender=256 * 1024 * 1024,
            idle_s=idle_s,
        )
        self._expired_at = 0.0
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.stats: dict[str, StageStats] = {}
        self.running = 0
        self.refused = 0
        self.busy_s = 0.0  # compute seconds since the last busy_fraction() call
        self._busy_since = time.monotonic()
        self._send_tasks: set[asyncio.Task[None]] = set()
        self.refusing: EdgesliceError | None = None  # set while draining: refuse new work
        # every stage run (its StageTiming) and error reply, e.g. for agent/metrics.py
        self.on_outcome: Callable[[StageTiming | ErrorReply], None] = lambda _outcome: None

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize()

    @property
    def in_flight(self) -> int:
        return self.queue.qsize() + self.running + len(self._send_tasks)

    def busy_fraction(self) -> float:
        """Share of the time since the last call that the stage worker spent computing."""
        now = time.monotonic()
        elapsed, self._busy_since = now - self._busy_since, now
        busy, self.busy_s = self.busy_s, 0.0
        return min(1.0, busy / elapsed) if elapsed > 0 else 0.0

    def stage_timings(self) -> dict[str, dict[str, float]]:
        return {
            sha: {
                "stage": s.stage,
                "count": s.count,
                "compute_s": s.compute_s,
                "queue_s": s.queue_s,
            }
            for sha, s in self.stats.items()
        }

    # -- receive ----------------------------------------------------------------
    def on_chunk(self, payload: bytes, client_id: str) -> None:
        """Feed one message of ``inbox/{client_id}``; never raises (a bad chunk is logged and
        dropped). Half-finished transfers are expired here too, at most once a second."""
        now = self.clock()
        if now - self._expired_at >= 1.0:
            self.expire()
        result = self.reassembler.feed(payload, now, sender=client_id)
        if result is None:
            return
        if isinstance(result, Refused):
            self._on_refused(result)
            return
        recv_s = max(0.0, now - result.first_chunk_at)
        job = Job(result, received_at=now, recv_s=recv_s, client_id=client_id)
        if self.refusing is not None:  # draining: the client retries on the current plan
            self._reply_error(result.header, self.refusing, client_id)
            return
        if self.queue.qsize() >= self.max_queue:
            busy = AgentBusyError(
                f"agent {self.agent_id} is overloaded ({self.queue.qsize()} requests queued); "
                "retry, or add agents"
            )
            self._reply_error(result.header, busy, client_id)
            return
        self.queue.put_nowait(job)

    def expire(self) -> None:
        self._expired_at = now = self.clock()
        for refused in self.reassembler.expire(now):
            self._on_refused(refused)

    def _on_refused(self, refused: Refused) -> None:
        if not refused.is_error:
            return
        self.refused += 1
        header = refused.header
        # a flood must not become a flood of log lines: the first 20, then every 1000th
        (log.warning if self.refused <= 20 or self.refused % 1000 == 0 else log.debug)(
            "agent=%s dropped transfer=%s client=%s req=%s reason=%s (%d dropped so far): %s",
            self.agent_id,
            refused.transfer_id[:12],
            refused.sender or "?",
            header.request_id if header else "?",
            refused.reason,
            self.refused,
            refused.detail,
        )
        if header is not None and header.kind in ("request", "activation") and refused.sender:
            error = TransferError(
                f"agent {self.agent_id} refused stage {header.stage} input: "
                f"{refused.reason} ({refused.detail})",
                reason=refused.reason,
            )
            self._reply_error(header, error, refused.sender)

    # -- compute ----------------------------------------------------------------
    async def run(self) -> None:
        """The worker loop: one job at a time on the stage thread; sends overlap compute."""
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            self.running = 1
            try:
                started = self.clock()
                outbound = await loop.run_in_executor(self.executor, self._compute, job, started)
            finally:
                self.running = 0
            task = asyncio.create_task(self._send(outbound))
            self._send_tasks.add(task)
            task.add_done_callback(self._send_tasks.discard)

    def _compute(self, job: Job, started: float) -> Outbound:
        """Worker thread: unpack, run the stage, pack the next hop's transfer (or an error)."""
        header = job.done.header
        stage = header.stage
        try:
            env = codec.from_wire(header.meta, RequestEnvelope)
            if env.reply_to != job.client_id:
                raise InferenceError(
                    f"request {header.request_id} came from client {job.client_id!r} (its inbox "
                    f"topic) but asks for its result to go to {env.reply_to!r}; refused: a "
                    "client gets only its own results (set reply_to to the client id you "
                    "publish under)"
                )
            route = env.route
            if not 0 <= stage < len(route) or route[stage].agent_id != self.agent_id:
                raise InferenceError(
                    f"request {header.request_id} routes stage {stage} to "
                    f"{route[stage].agent_id if 0 <= stage < len(route) else 'nobody'}, "
                    f"not to agent {self.agent_id}"
                )
            sha = route[stage].artifact
            loaded = self.runtime.get(sha)
            if loaded is None:
                raise StageUnavailableError(
                    f"agent {self.agent_id} has no stage {stage} loaded for artifact {sha[:12]} "
                    f"(plan {header.plan_id} v{header.plan_version}); the plan changed: retry"
                )
            inputs = unpack_tensors(env.tensors, job.done.payload, share=True)
            t0 = time.perf_counter()
            outputs = loaded.run(inputs)
            compute_s = time.perf_counter() - t0
            self.busy_s += compute_s
            queue_s = max(0.0, started - job.received_at)
            stats = self.stats.setdefault(sha, StageStats(stage))
            stats.add(compute_s, queue_s)
            timing = StageTiming(
                stage=stage,
                agent=self.agent_id,
                recv_s=job.recv_s,
                transfer_s=max(0.0, job.done.first_chunk_at - env.sent_at) if env.sent_at else 0.0,
                queue_s=queue_s,
                compute_s=compute_s,
            )
            last = stage == len(route) - 1
            compression = None if last else (env.compression or None)
            tensor_meta, payload = pack_tensors(outputs, compression=compression)
            forward = replace(
                env,
                tensors=tensor_meta,
                timings=[*env.timings, timing],
                sent_at=self.clock(),
            )
            if last:
                topic = self.topics.client_results(job.client_id)
                kind = "result"
            else:  # the next stage learns the client from the topic, as this one did
                topic = self.topics.inbox(route[stage + 1].agent_id, job.client_id)
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
                chunk_size=self.chunk_size,
            )
            self.on_outcome(timing)
            return Outbound(topic, encoded.chunks, header.request_id)
        except Exception as exc:  # every failure goes back to the client, never a hang
            log.warning(
                "agent=%s req=%s stage=%d failed: %s", self.agent_id, header.request_id, stage, exc
            )
            return self._error_outbound(header, exc, job.client_id)

    # -- send -------------------------------------------------------------------
    async def _send(self, outbound: Outbound) -> None:
        try:
            futures = [
                self.client.publish_nowait(outbound.topic, chunk, qos=1)
                for chunk in outbound.chunks
            ]
            await asyncio.wait_for(asyncio.gather(*futures), timeout=60.0)
        except Exception as exc:
            log.warning(
                "agent=%s req=%s send to %s failed: %s",
                self.agent_id,
                outbound.request_id,
                outbound.topic,
                exc,
            )

    def _error_outbound(self, header: TransferHeader, exc: Exception, client_id: str) -> Outbound:
        """An ``error`` transfer to the client that sent the request (named by the inbox topic,
        whatever the envelope says); nothing when there is no valid client id.

        ``retryable`` and ``code`` come from the exception (errors.py); anything that is not
        an EdgesliceError (a torch failure inside the stage) is ``stage_failed``, final. An
        envelope that does not decode is answered too (without timings).
        """
        request_id = header.request_id
        try:
            env: RequestEnvelope | None = codec.from_wire(header.meta, RequestEnvelope)
        except EdgesliceError:
            env = None
        try:
            topic = self.topics.client_results(client_id)
        except EdgesliceError as bad:
            log.warning(
                "agent=%s req=%s cannot report its failure: %s", self.agent_id, request_id, bad
            )
            return Outbound("", [], request_id)
        known = exc if isinstance(exc, EdgesliceError) else None
        reply = ErrorReply(
            error=str(exc),
            stage=header.stage,
            agent=self.agent_id,
            retryable=known.retryable if known else False,
            code=known.code if known else "stage_failed",
            timings=env.timings if env is not None else [],
        )
        self.on_outcome(reply)
        encoded = encode_transfer(
            b"",
            request_id=request_id,
            kind="error",
            stage=header.stage,
            meta=codec.to_wire(reply),
            chunk_size=self.chunk_size,
        )
        return Outbound(topic, encoded.chunks, request_id)

    def _reply_error(self, header: TransferHeader, exc: EdgesliceError, client_id: str) -> None:
        outbound = self._error_outbound(header, exc, client_id)
        if outbound.topic:
            task = asyncio.ensure_future(self._send(outbound))
            self._send_tasks.add(task)
            task.add_done_callback(self._send_tasks.discard)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
