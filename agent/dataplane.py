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

A request of a tiled plan (envelope ``tiles``, agent/tiles.py) arrives as *pieces*: each
completed transfer, and each piece this agent cuts for its own next tile, goes to a
bounded, expiring gather per request, stage and send; once the pieces cover this agent's
tile input it runs as one job (never batched) and its output is cut into the next stage's
pieces. A refused piece or a gather that times out is answered with an error to the client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from torch import Tensor

from edgeslice.agent.batching import BatchKey, BatchPolicy, BatchQueue, StageStats, run_grouped
from edgeslice.agent.hops import Job, Outbound, Prepared, error_reply, next_hop, prepare
from edgeslice.agent.runtime import StageRuntime
from edgeslice.agent.tiles import (
    LocalPiece,
    Refusal,
    TileIntake,
    TileJob,
    is_tiled,
    run_tile,
    tile_outbounds,
)
from edgeslice.broker.protocol.chunking import (
    Reassembler,
    Refused,
    TransferHeader,
)
from edgeslice.broker.protocol.errors import (
    AgentBusyError,
    EdgesliceError,
    TransferError,
)
from edgeslice.broker.protocol.messages import ErrorReply, StageTiming
from edgeslice.broker.protocol.pieces import PieceBuffer
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport

log = logging.getLogger(__name__)


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
        gather_idle_s: float = 30.0,
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
        # tiled requests: pieces wait for their siblings, whose compute may take seconds
        self.tiles = TileIntake(
            agent_id,
            runtime,
            PieceBuffer(256, max_open_per_sender, 256 * 1024 * 1024, idle_s=gather_idle_s),
        )
        self._expired_at = 0.0
        self.batching = batching or BatchPolicy()
        self.queue: BatchQueue[Job | TileJob] = BatchQueue(
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
        # every transfer received in several chunks: (bytes after its first chunk, first
        # chunk's time, last chunk's time), on ``clock`` (agent/linkwatch.py)
        self.on_received: Callable[[int, float, float], None] = lambda _n, _first, _last: None

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
        chunks = result.header.total_chunks
        if chunks > 1:  # its arrival paced by the link (agent/linkwatch.py)
            after_first = result.header.total_length * (chunks - 1) // chunks
            self.on_received(after_first, result.first_chunk_at, now)
        if is_tiled(result.header.meta):  # a piece of a tiled request: gather it first
            self._take(self.tiles.on_transfer(result, client_id, now))
            return
        recv_s = max(0.0, now - result.first_chunk_at)
        self._take(Job(result, received_at=now, recv_s=recv_s, client_id=client_id))

    def _take(self, job: Job | TileJob | Refusal | None) -> None:
        """Queue a job for the stage worker, or answer it at once (a refused piece, draining,
        overloaded); None: a piece that waits for its siblings."""
        if job is None:
            return
        if isinstance(job, Refusal):
            self._count_refused(
                "agent=%s refused piece client=%s req=%s stage=%d: %s",
                self.agent_id,
                job.client_id,
                job.header.request_id,
                job.header.stage,
                job.error,
            )
            self._reply_error(job.header, job.error, job.client_id)
            return
        if self.refusing is not None:  # draining: the client retries on the current plan
            self._reply_error(job.header, self.refusing, job.client_id)
            return
        if self.queue.qsize() >= self.max_queue:
            busy = AgentBusyError(
                f"agent {self.agent_id} is overloaded ({self.queue.qsize()} requests queued); "
                "retry, or add agents"
            )
            self._reply_error(job.header, busy, job.client_id)
            return
        self.queue.put_nowait(job)

    def expire(self) -> None:
        self._expired_at = now = self.clock()
        for refused in self.reassembler.expire(now):
            self._on_refused(refused)
        for refusal in self.tiles.expire(now):
            self._take(refusal)

    def _count_refused(self, what: str, *args: object) -> None:
        self.refused += 1
        # a flood must not become a flood of log lines: the first 20, then every 1000th
        (log.warning if self.refused <= 20 or self.refused % 1000 == 0 else log.debug)(
            what + " (%d dropped so far)", *args, self.refused
        )

    def _on_refused(self, refused: Refused) -> None:
        if not refused.is_error:
            return
        header = refused.header
        self._count_refused(
            "agent=%s dropped transfer=%s client=%s req=%s reason=%s: %s",
            self.agent_id,
            refused.transfer_id[:12],
            refused.sender or "?",
            header.request_id if header else "?",
            refused.reason,
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
        while True:
            await self._run_batch(await self.queue.get_batch())

    async def _run_batch(self, jobs: list[Job | TileJob]) -> None:
        """One batch (its own frame, so its inputs are not held while the next is awaited)."""
        loop = asyncio.get_running_loop()
        self.running = len(jobs)
        head = jobs[0]
        try:
            started = self.clock()
            if isinstance(head, TileJob):  # never batched (agent/tiles.py)
                outbounds = await loop.run_in_executor(
                    self.executor, self._compute_tile, head, started
                )
            else:
                plain = [j for j in jobs if isinstance(j, Job)]
                outbounds = await loop.run_in_executor(
                    self.executor, self._compute_batch, plain, started
                )
        finally:
            self.running = 0
        for outbound in outbounds:
            if isinstance(outbound.local, LocalPiece):  # our own next tile: no broker
                self._take(self.tiles.on_local(outbound.local, self.clock()))
                continue
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
        return prepare(job, self.agent_id, self.runtime)

    def _finish(
        self, p: Prepared, outputs: list[Tensor], started: float, compute_s: float, batch: int
    ) -> Outbound:
        """One request's timing (recorded in the stage stats) and its next hop."""
        job, env, stage = p.job, p.env, p.job.done.header.stage
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
        outbound = next_hop(p, outputs, timing, self.topics, self.chunk_size, self.clock())
        self.on_outcome(timing)
        return outbound

    def _compute_tile(self, job: TileJob, started: float) -> list[Outbound]:
        """Worker thread: one tiled job (agent/tiles.py), or its error reply."""
        try:
            outputs, timing, sha = run_tile(job, self.runtime, self.agent_id, started)
            self.busy_s += timing.compute_s
            self.stats.setdefault(sha, StageStats(timing.stage)).add(
                timing.compute_s, timing.queue_s
            )
            out = tile_outbounds(
                job, outputs, timing, self.agent_id, self.topics, self.chunk_size, self.clock()
            )
        except Exception as exc:  # every failure goes back to the client, never a hang
            return [self._failed(job, exc)]
        self.on_outcome(timing)
        return out

    def _failed(self, job: Job | TileJob, exc: Exception) -> Outbound:
        header = job.header
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
        """The error reply to the request's client (agent/hops.py), or nothing to send."""
        made = error_reply(header, exc, client_id, self.agent_id, self.topics, self.chunk_size)
        if made is None:
            log.warning(
                "agent=%s req=%s cannot report its failure: bad client id %r",
                self.agent_id,
                header.request_id,
                client_id,
            )
            return Outbound("", [], header.request_id)
        outbound, reply = made
        self.on_outcome(reply)
        return outbound

    def _reply_error(self, header: TransferHeader, exc: EdgesliceError, client_id: str) -> None:
        outbound = self._error_outbound(header, exc, client_id)
        if outbound.topic:
            task = asyncio.ensure_future(self._send(outbound))
            self._send_tasks.add(task)
            task.add_done_callback(self._send_tasks.discard)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
