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
request n's output is published while n+1 computes. Requests queued for the same stage
artifact and plan version run as one batch (agent/batching.py) and are split back into
one result or activation each, with its own timings (``queue_s`` includes the wait for
the batch, ``compute_s`` is the batch's run, ``batch`` its size). Every failure becomes
an ``error`` transfer to the client naming the stage and agent; nothing hangs silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from torch import Tensor

from edgeslice.agent.batching import BatchKey, BatchPolicy, BatchQueue, StageStats, run_grouped
from edgeslice.agent.runtime import LoadedStage, StageRuntime
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
        batching: BatchPolicy | None = None,
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
        self.batching = batching or BatchPolicy()
        self.queue: BatchQueue[Job] = BatchQueue(
            self.batching, self._batchable, self._expected_s, clock
        )
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

    def _batchable(self, key: BatchKey) -> bool:
        loaded = self.runtime.get(key[0])
        return loaded is not None and loaded.info.batchable

    def _expected_s(self, key: BatchKey) -> float:
        stats = self.stats.get(key[0])
        return stats.compute_s if stats is not None else 0.0

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
                "batched": s.batched,
                "batch_mean": s.batch_mean,
                "batched_compute_s": s.batched_compute_s,
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
        """The worker loop: one batch at a time on the stage thread; sends overlap compute."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self.queue.get_batch()
            self.running = len(jobs)
            try:
                started = self.clock()
                outbounds = await loop.run_in_executor(
                    self.executor, self._compute_batch, jobs, started
                )
            finally:
                self.running = 0
            for outbound in outbounds:
                task = asyncio.create_task(self._send(outbound))
                self._send_tasks.add(task)
                task.add_done_callback(self._send_tasks.discard)

    def _compute(self, job: Job, started: float) -> Outbound:
        """Worker thread: one job alone (see :meth:`_compute_batch`)."""
        return self._compute_batch([job], started)[0]

    def _compute_batch(self, jobs: list[Job], started: float) -> list[Outbound]:
        """Worker thread: unpack, run the stage once for all ``jobs`` (one batch key, see
        agent/batching.py), pack each next hop's transfer (or its error), in job order."""
        out: dict[int, Outbound] = {}
        ready: list[tuple[int, Prepared]] = []
        for i, job in enumerate(jobs):
            try:
                ready.append((i, self._prepare(job)))
            except Exception as exc:  # every failure goes back to the client, never a hang
                out[i] = self._failed(job, exc)
        ran = run_grouped([p.stage for _, p in ready], [p.inputs for _, p in ready])
        for (i, p), (result, compute_s, batch) in zip(ready, ran, strict=True):
            if isinstance(result, Exception):
                out[i] = self._failed(p.job, result)
                continue
            self.busy_s += compute_s / batch  # the batch's time, once over its requests
            try:
                out[i] = self._finish(p, result, started, compute_s, batch)
            except Exception as exc:
                out[i] = self._failed(p.job, exc)
        return [out[i] for i in range(len(jobs))]

    def _prepare(self, job: Job) -> Prepared:
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
        loaded.check_inputs(inputs)
        return Prepared(job, env, sha, loaded, inputs)

    def _finish(
        self, p: Prepared, outputs: list[Tensor], started: float, compute_s: float, batch: int
    ) -> Outbound:
        """One request's timing, outputs and next hop (the client when it was the last)."""
        job, env, header = p.job, p.env, p.job.done.header
        stage, route = header.stage, env.route
        queue_s = max(0.0, started - job.received_at)
        self.stats.setdefault(p.sha, StageStats(stage)).add(compute_s, queue_s, batch)
        timing = StageTiming(
            stage=stage,
            agent=self.agent_id,
            recv_s=job.recv_s,
            transfer_s=max(0.0, job.done.first_chunk_at - env.sent_at) if env.sent_at else 0.0,
            queue_s=queue_s,
            compute_s=compute_s,
            batch=batch,
        )
        last = stage == len(route) - 1
        compression = None if last else (env.compression or None)
        tensor_meta, payload = pack_tensors(outputs, compression=compression)
        forward = replace(
            env, tensors=tensor_meta, timings=[*env.timings, timing], sent_at=self.clock()
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

    def _failed(self, job: Job, exc: Exception) -> Outbound:
        header = job.done.header
        log.warning(
            "agent=%s req=%s stage=%d failed: %s",
            self.agent_id,
            header.request_id,
            header.stage,
            exc,
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
