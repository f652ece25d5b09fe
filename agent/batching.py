"""Dynamic batching on an agent: requests waiting for the same stage run as one batch.

The data plane's inbox queue is a :class:`BatchQueue`. When the stage worker is free it
takes the oldest request and, with it, every queued request of the same *batch key* —
same stage artifact (sha256), same plan id and version, same stage index — up to
``max_batch`` in arrival order; requests of other keys keep their places. If the batch
is not full it may wait for more, but never past ``max_wait_s`` after the oldest
request arrived (``0``: only batch what is already queued) and never so long that a
request with a deadline could not be computed in time (its deadline minus the stage's
recent compute time). A backed-up queue therefore adds no wait at all; an idle agent
holds a lone request for at most ``max_wait_s``.

Only stages whose artifact says ``batchable`` (exported with a dynamic dim 0, see
planner/batchdim.py) are batched; the others run one request at a time, as does a
request whose key cannot be read (its error is reported by the data plane as before).
A stage's assignment may lower the limit (``StageAssignment.max_batch``: the planner
measured that batching slows that stage down, planner/batchcost.py): the queue takes
``min(max_batch, the stage's limit)`` (``stage_limits``, set by agent/assignments.py).

:func:`measure_batch_speedup` is the start-up measurement agents announce in ``info``:
the calibration kernel (broker/calibration.py: a 256x256 matmul and a 64-channel 3x3
convolution per request) run for one request and for ``k`` requests at once;
speed-up = ``k x time(1) / time(k)``, what the planner's cost model prices a saturated
stage with (``planner.costmodel.batched_period_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
from torch import Tensor

from edgeslice.agent.runtime import LoadedStage
from edgeslice.broker.protocol.chunking import TransferHeader
from edgeslice.broker.protocol.messages import BatchSpeedup

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAIT_S = 0.002


class Waiting(Protocol):
    """What the queue needs of a queued job (agent/dataplane.py's ``Job``)."""

    @property
    def received_at(self) -> float: ...

    @property
    def header(self) -> TransferHeader: ...


J = TypeVar("J", bound=Waiting)
BatchKey = tuple[str, str, int, int]  # (artifact sha256, plan id, plan version, stage)


@dataclass(frozen=True)
class BatchPolicy:
    """``max_batch`` requests at most per run; wait at most ``max_wait_s`` for more."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        if self.max_wait_s < 0:
            raise ValueError(f"max batch wait must be >= 0 s, got {self.max_wait_s}")


def batch_key(header: TransferHeader) -> BatchKey | None:
    """The key requests must share to run together; None when the envelope's route cannot
    be read here (the data plane then reports the request's error on its own)."""
    try:
        artifact = header.meta["route"][header.stage][1]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(artifact, str) or header.stage < 0:
        return None
    return (artifact, header.plan_id, header.plan_version, header.stage)


def take_matching(
    pending: deque[J], key_of: Callable[[J], Hashable | None], key: Hashable, limit: int
) -> list[J]:
    """Remove and return up to ``limit`` jobs of ``key`` from ``pending``, oldest first;
    the other jobs keep their order."""
    taken: list[J] = []
    if limit <= 0:
        return taken
    kept: deque[J] = deque()
    while pending:
        job = pending.popleft()
        if len(taken) < limit and key_of(job) == key:
            taken.append(job)
        else:
            kept.append(job)
    pending.extend(kept)
    return taken


def hold_until(jobs: Iterable[Waiting], max_wait_s: float, expected_s: float) -> float:
    """Until when (clock of ``received_at``) a batch may wait for more requests: the oldest
    request's arrival plus ``max_wait_s``, earlier if a deadline would pass otherwise."""
    jobs = list(jobs)
    until = min(job.received_at for job in jobs) + max_wait_s
    for job in jobs:
        deadline = job.header.deadline
        if deadline > 0:
            until = min(until, deadline - expected_s)
    return until


class BatchQueue(Generic[J]):
    """The inbox queue, consumed a batch at a time (module docstring). One consumer."""

    def __init__(
        self,
        policy: BatchPolicy,
        batchable: Callable[[BatchKey], bool],
        expected_s: Callable[[BatchKey], float] = lambda _key: 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.batchable = batchable
        self.expected_s = expected_s
        # artifact sha256 -> the stage's own limit (its assignment's max_batch)
        self.stage_limits: dict[str, int] = {}
        self.clock = clock
        self.pending: deque[J] = deque()
        self._arrived = asyncio.Event()

    def qsize(self) -> int:
        return len(self.pending)

    def empty(self) -> bool:
        return not self.pending

    def put_nowait(self, job: J) -> None:
        self.pending.append(job)
        self._arrived.set()

    @staticmethod
    def key_of(job: Waiting) -> BatchKey | None:
        return batch_key(job.header)

    async def get(self) -> J:
        """The oldest job alone."""
        while not self.pending:
            await self._wait(None)
        return self.pending.popleft()

    async def get_batch(self) -> list[J]:
        """The oldest job and what may run with it (see the module docstring)."""
        head = await self.get()
        key = self.key_of(head)
        if key is None:
            return [head]
        limit = self.limit(key)
        if limit == 1 or not self.batchable(key):
            return [head]
        batch = [head, *take_matching(self.pending, self.key_of, key, limit - 1)]
        while len(batch) < limit:
            until = hold_until(batch, self.policy.max_wait_s, self.expected_s(key))
            remaining = until - self.clock()
            if remaining <= 0 or not await self._wait(remaining):
                break
            batch += take_matching(self.pending, self.key_of, key, limit - len(batch))
        return batch

    def limit(self, key: BatchKey) -> int:
        """The most requests of ``key`` one run takes: the policy's, lowered by the stage's."""
        stage = self.stage_limits.get(key[0])
        return self.policy.max_batch if stage is None else max(1, min(stage, self.policy.max_batch))

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for the next arrival; False when ``timeout`` passed first."""
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            return False
        return True


@dataclass
class StageStats:
    """Running averages of one stage's timings, reported in telemetry for the planner.

    ``compute_s`` (over ``count`` runs) is a request run alone, what the planner's
    correction compares with its batch-1 prediction; batched runs go to ``batched``
    (requests), ``batch_mean`` and ``batched_compute_s`` (run time / batch size).
    """

    stage: int
    count: int = 0
    compute_s: float = 0.0
    queue_s: float = 0.0
    requests: int = 0
    batched: int = 0
    batch_mean: float = 0.0
    batched_compute_s: float = 0.0

    def add(self, compute_s: float, queue_s: float, batch: int = 1) -> None:
        self.requests += 1
        alpha = 1.0 / min(self.requests, 20)  # mean of the first 20, then an EWMA
        self.queue_s += alpha * (queue_s - self.queue_s)
        if batch <= 1:
            self.count += 1
            alpha = 1.0 / min(self.count, 20)
            self.compute_s += alpha * (compute_s - self.compute_s)
            return
        self.batched += 1
        alpha = 1.0 / min(self.batched, 20)
        self.batch_mean += alpha * (batch - self.batch_mean)
        self.batched_compute_s += alpha * (compute_s / batch - self.batched_compute_s)


Ran = tuple[list[Tensor] | Exception, float, int]  # outputs or error, compute s, batch size


def run_grouped(stages: Sequence[LoadedStage], inputs: Sequence[list[Tensor]]) -> list[Ran]:
    """Run each group of requests for the same stage as one batch (torch: the stage thread).

    Per request, in order: its outputs (or the exception that failed it), the run's
    seconds and how many requests it held. A batch that fails is retried one request at
    a time, so a request that breaks a batch fails alone.
    """
    groups: dict[str, list[int]] = {}
    for i, stage in enumerate(stages):
        groups.setdefault(stage.sha256, []).append(i)
    results: list[Ran | None] = [None] * len(stages)
    for members in groups.values():
        start = time.perf_counter()
        try:
            outputs = stages[members[0]].run_batch([inputs[i] for i in members])
        except Exception as exc:
            if len(members) == 1:
                results[members[0]] = (exc, time.perf_counter() - start, 1)
                continue
            log.warning(
                "batch of %d failed (%s); running its requests one by one", len(members), exc
            )
            for i in members:
                results[i] = run_grouped([stages[i]], [inputs[i]])[0]
            continue
        elapsed = time.perf_counter() - start
        for i, out in zip(members, outputs, strict=True):
            results[i] = (out, elapsed, len(members))
    return [r for r in results if r is not None]


def speedup(batch: int, one_s: float, batch_s: float) -> float:
    """Throughput gain of running ``batch`` requests at once: ``batch x one_s / batch_s``."""
    if batch < 1 or one_s <= 0 or batch_s <= 0:
        raise ValueError("speed-up needs a batch >= 1 and positive times")
    return batch * one_s / batch_s


def measure_batch_speedup(
    max_batch: int, seconds: float = 0.3, threads: int | None = None
) -> list[BatchSpeedup]:
    """Speed-up of the calibration kernel at batch 2, 4, ... up to ``max_batch`` (module
    docstring); empty for ``max_batch`` 1. Runs torch: call it off the event loop."""
    sizes = sorted({min(k, max_batch) for k in (2, 4, 8, 16, 32, 64)} - {1})
    if max_batch < 2 or not sizes:
        return []
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        weight_mm = torch.randn(256, 256, generator=gen)
        weight_conv = torch.randn(64, 64, 3, 3, generator=gen)
        per_size = seconds / (len(sizes) + 1)

        def timed(k: int) -> float:
            a = torch.randn(256 * k, 256, generator=gen)
            image = torch.randn(k, 64, 28, 28, generator=gen)

            def step() -> None:
                torch.mm(a, weight_mm)
                torch.nn.functional.conv2d(image, weight_conv, padding=1)

            step()  # warm-up
            best = float("inf")
            spent, count = 0.0, 0
            while spent < per_size or count < 3:
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
                best, spent, count = min(best, elapsed), spent + elapsed, count + 1
            return best

        with torch.inference_mode():
            one = timed(1)
            return [BatchSpeedup(k, round(speedup(k, one, timed(k)), 3)) for k in sizes]
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
