"""Desired -> reported assignments: fetch, verify and load the stages the planner asks for.

The planner publishes what an agent should run (``assignment/desired``, retained); this
module makes it so and says how it went (``assignment/reported``, retained): ``loading``,
then ``ready`` or ``error`` with the reason (over the memory budget, an artifact that does
not arrive or does not verify, a stage index that disagrees), or ``idle`` for an empty
assignment (a cleared retained assignment counts as an empty one of the last plan).

Changes are applied one at a time, newest wins:

* one worker applies desired states in turn; never two loads at once (torch.export.load
  keeps process-global state, see :data:`_LOAD_LOCK`);
* a desired state that arrives while another is applied supersedes it: the running apply
  is cancelled where it waits (a fetch), and a load already in torch (which cannot be
  interrupted) finishes, its result dropped (no ``ready`` for the superseded plan);
* then only the newest desired state is applied: intermediate ones are skipped, never
  loaded, never reported;
* a redelivery of the desired state being applied or already applied (a retained message
  after a reconnect) is ignored; one that ended in ``error`` is applied again.

The previous plan's stages stay loaded, so requests routed by it finish. While the agent
drains (:meth:`Assignments.drain`) it loads nothing new: an assignment with stages is
reported as ``error`` (the agent is shutting down), an empty one as ``idle``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from edgeslice.agent.dataplane import DataPlane
from edgeslice.agent.fetch import ArtifactFetcher
from edgeslice.agent.runtime import ArtifactCache, LoadedStage, StageRuntime
from edgeslice.broker.fleetkey import key_fingerprint, load_verify_key
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.artifacts import PublicKey
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import AssignmentDesired, AssignmentReported
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport

log = logging.getLogger(__name__)

# torch.export.load keeps process-global state while it runs: two loads at once in one
# process fail ("_CURRENT_DESERIALIZER is already set"). One agent per process never
# overlaps with itself, but agents sharing a process (unit tests) must take turns.
_LOAD_LOCK = threading.Lock()


def _load(
    runtime: StageRuntime, data: bytes, key: PublicKey, sha: str, cache: ArtifactCache
) -> LoadedStage:
    with _LOAD_LOCK:  # a refused artifact is deleted from the cache
        return runtime.load(data, key, sha256=sha, cache=cache)


class Assignments:
    """The agent's assignment state machine (see the module docstring)."""

    def __init__(
        self,
        agent_id: str,
        client: Transport,
        topics: Topics,
        runtime: StageRuntime,
        fetcher: ArtifactFetcher,
        dataplane: DataPlane,
        memory_budget_bytes: Callable[[], int],
        fleet_key_file: str | None,
    ) -> None:
        self.agent_id = agent_id
        self.client = client
        self.topics = topics
        self.runtime = runtime
        self.fetcher = fetcher
        self.dataplane = dataplane
        self.memory_budget_bytes = memory_budget_bytes
        self.fleet_key_file = fleet_key_file
        self.desired: AssignmentDesired | None = None  # the newest accepted desired state
        self.reported: AssignmentReported | None = None  # the last one published
        self.draining = False
        self.skipped = 0  # desired states superseded before or while they were applied
        self._next: AssignmentDesired | None = None  # newest desired state not started yet
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None  # the apply under way
        self._applying: AssignmentDesired | None = None
        self._loading: asyncio.Future[LoadedStage] | None = None  # a load in torch's hands
        self._key: PublicKey | None = None
        self._previous_keep: set[str] = set()

    def on_desired(self, payload: bytes) -> None:
        """An ``assignment/desired`` message; raises on one that is malformed or not ours."""
        if not payload:  # retained assignment cleared: the planner wants nothing from us
            if self.desired is None or not self.desired.stages:
                return
            desired = replace(self.desired, stages=[])
        else:
            desired = codec.decode(payload, AssignmentDesired)
            if desired.agent_id != self.agent_id:
                raise EdgesliceError(f"assignment is addressed to {desired.agent_id!r}")
        if self.desired is not None and _same(desired, self.desired) and not self._failed():
            return  # a redelivery of what we run or are about to run
        self.desired = desired
        if self._next is not None:
            self._skip(self._next, "never started")
        self._next = desired
        current, applying = self._current, self._applying
        if current is not None and not current.done() and applying is not None:
            self._skip(applying, "cancelled while applied")
            current.cancel()  # a load already in torch finishes; its result is dropped
        self._wake.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name=f"assignments-{self.agent_id}")

    def drain(self) -> None:
        """The agent is shutting down: load nothing new from here on (module docstring)."""
        self.draining = True
        applying, current = self._applying, self._current
        if current is not None and not current.done() and applying and applying.stages:
            self._skip(applying, "the agent is draining")
            current.cancel()

    def cancel(self) -> None:
        for task in (self._worker, self._current):
            if task is not None and not task.done():
                task.cancel()

    @property
    def busy(self) -> bool:
        """A desired state is waiting or being applied (or a dropped load still runs)."""
        running = self._current is not None and not self._current.done()
        loading = self._loading is not None and not self._loading.done()
        return self._next is not None or running or loading

    def _failed(self) -> bool:
        """The newest desired state ended in ``error`` and nothing is applying it again."""
        rep, desired = self.reported, self.desired
        return (
            rep is not None
            and desired is not None
            and rep.state == "error"
            and (rep.plan_id, rep.plan_version) == (desired.plan_id, desired.plan_version)
            and not self.busy
        )

    def _skip(self, desired: AssignmentDesired, why: str) -> None:
        self.skipped += 1
        log.info(
            "agent=%s plan=%s v%d superseded (%s): the newest desired state wins",
            self.agent_id,
            desired.plan_id,
            desired.plan_version,
            why,
        )

    async def _work(self) -> None:
        """One desired state at a time, always the newest (module docstring)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._loading is not None and not self._loading.done():
                await asyncio.wait({self._loading})  # a dropped load still in torch: wait
            desired, self._next = self._next, None
            if desired is None:
                continue
            self._applying = desired
            self._current = asyncio.create_task(self._apply(desired))
            try:
                await asyncio.wait({self._current})
            finally:
                self._applying = None

    async def _apply(self, desired: AssignmentDesired) -> None:
        started = time.perf_counter()
        stages = [s.stage for s in desired.stages]
        try:
            if not desired.stages:
                await self._report(desired, "idle", [], "", 0.0)
                return
            if self.draining:
                raise EdgesliceError(
                    f"agent {self.agent_id} is shutting down (draining): it loads no new stages"
                )
            total = sum(s.size for s in desired.stages)
            budget = self.memory_budget_bytes()
            if total > budget:
                raise EdgesliceError(
                    f"agent {self.agent_id}: stages {stages} need {total / 2**20:.1f} MiB, "
                    f"memory budget is {budget / 2**20:.1f} MiB"
                )
            await self._report(desired, "loading", stages, "", 0.0)
            if self._key is None:
                self._key = load_verify_key(self.fleet_key_file)
                log.info(
                    "agent=%s loads artifacts signed by fleet key %s",
                    self.agent_id,
                    key_fingerprint(self._key),
                )
            keep = set()
            for stage in desired.stages:
                data = await self.fetcher.get(stage.artifact)
                loaded = await self._load(data, stage.artifact)
                if loaded.info.index != stage.stage:
                    raise EdgesliceError(
                        f"artifact {stage.artifact[:12]} is stage {loaded.info.index}, "
                        f"assignment says stage {stage.stage}"
                    )
                keep.add(stage.artifact)
            limits = self.dataplane.queue.stage_limits  # the planner's word on batching a stage
            for stage in desired.stages:
                if stage.max_batch is None:
                    limits.pop(stage.artifact, None)
                else:
                    limits[stage.artifact] = stage.max_batch
            self._unload_old(keep)
            self.dataplane.reassembler.set_min_plan_version(desired.plan_id, 0)
            await self._report(desired, "ready", stages, "", time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "agent=%s plan=%s v%d assignment failed: %s",
                self.agent_id,
                desired.plan_id,
                desired.plan_version,
                exc,
            )
            await self._report(desired, "error", stages, str(exc), time.perf_counter() - started)

    async def _load(self, data: bytes, sha: str) -> LoadedStage:
        """Load on a worker thread; a cancelled apply leaves the load running to its end
        (torch cannot be interrupted) and the worker waits for it before the next one."""
        assert self._key is not None
        loading = asyncio.ensure_future(
            asyncio.to_thread(_load, self.runtime, data, self._key, sha, self.fetcher.cache)
        )
        loading.add_done_callback(_retrieve)
        self._loading = loading
        return await asyncio.shield(loading)

    def _unload_old(self, keep: set[str]) -> None:
        """Keep this plan's stages and the previous plan's (in-flight requests finish)."""
        for sha in self.runtime.loaded():
            if sha not in keep and sha not in self._previous_keep:
                self.runtime.unload(sha)
        self._previous_keep = keep

    async def _report(
        self, desired: AssignmentDesired, state: str, stages: list[int], error: str, load_s: float
    ) -> None:
        report = AssignmentReported(
            agent_id=self.agent_id,
            plan_id=desired.plan_id,
            plan_version=desired.plan_version,
            state=state,
            stages=stages,
            error=error,
            load_s=load_s,
            ts=time.time(),
        )
        self.reported = report
        await self.republish()

    async def republish(self) -> None:
        """(Re)publish the last report: after a reconnect the broker may have lost it."""
        if self.reported is None:
            return
        await self.client.publish(
            self.topics.assignment_reported(self.agent_id),
            codec.encode(self.reported),
            qos=1,
            retain=True,
        )


def _same(a: AssignmentDesired, b: AssignmentDesired) -> bool:
    """The same desired state (a redelivery may carry another timestamp)."""
    return (a.plan_id, a.plan_version, a.stages) == (b.plan_id, b.plan_version, b.stages)


def _retrieve(fut: asyncio.Future[LoadedStage]) -> None:
    """Mark a dropped load's exception as seen (it was superseded; nobody awaits it)."""
    if not fut.cancelled():
        fut.exception()
