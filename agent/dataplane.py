"""The agent's data plane: inbox chunks -> reassembly -> stage compute -> next hop or client.

Requests carry their route (``meta["route"]``: one ``[agent_id, artifact_sha]`` per stage,
chosen by the client with AMP4EC scoring) and a reply-to client id. This agent runs the
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
from dataclasses import dataclass
from typing import Any

from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.protocol.chunking import Completed, Reassembler, Refused, encode_transfer
from edgeslice.broker.protocol.errors import EdgesliceError
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
    ) -> None:
        self.agent_id = agent_id
        self.client = client
        self.topics = topics
        self.runtime = runtime
        self.max_queue = max_queue
        self.chunk_size = chunk_size
        self.clock = clock
        self.reassembler = Reassembler(max_open=256, max_age_s=60.0)
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self.stats: dict[str, StageStats] = {}
        self.running = 0
        self.refused = 0
        self.busy_s = 0.0  # compute seconds since the last busy_fraction() call
        self._busy_since = time.monotonic()
        self._send_tasks: set[asyncio.Task[None]] = set()

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
    def on_chunk(self, payload: bytes) -> None:
        """Feed one inbox message; never raises (a bad chunk is logged and dropped)."""
        now = self.clock()
        result = self.reassembler.feed(payload, now)
        if result is None:
            return
        if isinstance(result, Refused):
            self._on_refused(result)
            return
        job = Job(result, received_at=now, recv_s=max(0.0, now - result.first_chunk_at))
        if self.queue.qsize() >= self.max_queue:
            self._reply_error(
                result.header.meta,
                result.header.request_id,
                result.header.stage,
                f"agent {self.agent_id} is overloaded ({self.queue.qsize()} requests queued); "
                "retry, or add agents",
                retryable=True,
            )
            return
        self.queue.put_nowait(job)

    def expire(self) -> None:
        for refused in self.reassembler.expire(self.clock()):
            self._on_refused(refused)

    def _on_refused(self, refused: Refused) -> None:
        if not refused.is_error:
            return
        self.refused += 1
        header = refused.header
        log.warning(
            "agent=%s dropped transfer=%s req=%s reason=%s: %s",
            self.agent_id,
            refused.transfer_id[:12],
            header.request_id if header else "?",
            refused.reason,
            refused.detail,
        )
        if header is not None and header.kind in ("request", "activation"):
            self._reply_error(
                header.meta,
                header.request_id,
                header.stage,
                f"agent {self.agent_id} refused stage {header.stage} input: "
                f"{refused.reason} ({refused.detail})",
                retryable=refused.reason not in ("malformed", "too_large"),
            )

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
        meta = header.meta
        stage = header.stage
        try:
            route = _route(meta)
            if not 0 <= stage < len(route) or route[stage][0] != self.agent_id:
                raise EdgesliceError(
                    f"request {header.request_id} routes stage {stage} to "
                    f"{route[stage][0] if 0 <= stage < len(route) else 'nobody'}, "
                    f"not to agent {self.agent_id}"
                )
            sha = route[stage][1]
            loaded = self.runtime.get(sha)
            if loaded is None:
                raise EdgesliceError(
                    f"agent {self.agent_id} has no stage {stage} loaded for artifact {sha[:12]} "
                    f"(plan {header.plan_id} v{header.plan_version}); the plan changed: retry"
                )
            inputs = unpack_tensors(meta["tensors"], job.done.payload, share=True)
            t0 = time.perf_counter()
            outputs = loaded.run(inputs)
            compute_s = time.perf_counter() - t0
            self.busy_s += compute_s
            queue_s = max(0.0, started - job.received_at)
            stats = self.stats.setdefault(sha, StageStats(stage))
            stats.add(compute_s, queue_s)
            timing = {
                "stage": stage,
                "agent": self.agent_id,
                "recv_s": job.recv_s,
                "transfer_s": max(0.0, job.done.first_chunk_at - float(meta.get("sent_at", 0.0)))
                if meta.get("sent_at")
                else 0.0,
                "queue_s": queue_s,
                "compute_s": compute_s,
            }
            last = stage == len(route) - 1
            compression = None if last else (meta.get("compression") or None)
            tensor_meta, payload = pack_tensors(outputs, compression=compression)
            new_meta = dict(meta)
            new_meta["tensors"] = tensor_meta
            new_meta["timings"] = [*meta.get("timings", []), timing]
            new_meta["sent_at"] = self.clock()
            if last:
                topic = self.topics.client_results(str(meta["reply_to"]))
                kind = "result"
            else:
                topic = self.topics.inbox(route[stage + 1][0])
                kind = "activation"
            encoded = encode_transfer(
                payload,
                request_id=header.request_id,
                kind=kind,
                plan_id=header.plan_id,
                plan_version=header.plan_version,
                stage=stage + 1,
                deadline=header.deadline,
                meta=new_meta,
                chunk_size=self.chunk_size,
            )
            return Outbound(topic, encoded.chunks, header.request_id)
        except Exception as exc:  # every failure goes back to the client, never a hang
            log.warning(
                "agent=%s req=%s stage=%d failed: %s", self.agent_id, header.request_id, stage, exc
            )
            retryable = isinstance(exc, EdgesliceError) and "retry" in str(exc)
            return self._error_outbound(meta, header.request_id, stage, str(exc), retryable)

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

    def _error_outbound(
        self, meta: dict[str, Any], request_id: str, stage: int, message: str, retryable: bool
    ) -> Outbound:
        reply_to = meta.get("reply_to")
        if not isinstance(reply_to, str):
            return Outbound("", [], request_id)
        error_meta = {
            "error": message,
            "stage": stage,
            "agent": self.agent_id,
            "retryable": retryable,
            "timings": meta.get("timings", []) if isinstance(meta.get("timings"), list) else [],
        }
        try:
            topic = self.topics.client_results(reply_to)
        except EdgesliceError:
            return Outbound("", [], request_id)
        encoded = encode_transfer(
            b"",
            request_id=request_id,
            kind="error",
            stage=stage,
            meta=error_meta,
            chunk_size=self.chunk_size,
        )
        return Outbound(topic, encoded.chunks, request_id)

    def _reply_error(
        self, meta: dict[str, Any], request_id: str, stage: int, message: str, retryable: bool
    ) -> None:
        outbound = self._error_outbound(meta, request_id, stage, message, retryable)
        if outbound.topic:
            task = asyncio.ensure_future(self._send(outbound))
            self._send_tasks.add(task)
            task.add_done_callback(self._send_tasks.discard)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _route(meta: dict[str, Any]) -> list[tuple[str, str]]:
    route = meta.get("route")
    if not isinstance(route, list) or not route:
        raise EdgesliceError("transfer meta has no route")
    out = []
    for hop in route:
        if not (isinstance(hop, list) and len(hop) == 2 and all(isinstance(x, str) for x in hop)):
            raise EdgesliceError(f"bad route hop {hop!r}")
        out.append((hop[0], hop[1]))
    return out
