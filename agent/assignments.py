"""Desired -> reported assignments: fetch, verify and load the stages the planner asks for.

The planner publishes what an agent should run (``assignment/desired``, retained); this
module makes it so and says how it went (``assignment/reported``, retained): ``loading``,
then ``ready`` or ``error`` with the reason (over the memory budget, an artifact that does
not arrive or does not verify, a stage index that disagrees), or ``idle`` for an empty
assignment. A newer assignment cancels one still loading; a redelivery of the running one
is ignored. The previous plan's stages stay loaded, so requests routed by it finish.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

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
        self.desired: AssignmentDesired | None = None
        self.reported: AssignmentReported | None = None
        self._task: asyncio.Task[None] | None = None
        self._key: PublicKey | None = None
        self._previous_keep: set[str] = set()

    def on_desired(self, payload: bytes) -> None:
        """An ``assignment/desired`` message; raises on one that is malformed or not ours."""
        if not payload:  # retained message cleared
            return
        desired = codec.decode(payload, AssignmentDesired)
        if desired.agent_id != self.agent_id:
            raise EdgesliceError(f"assignment is addressed to {desired.agent_id!r}")
        current = self.desired
        if (
            current is not None
            and (current.plan_id, current.plan_version) == (desired.plan_id, desired.plan_version)
            and self.reported is not None
            and self.reported.state in ("ready", "idle")
        ):
            return  # a redelivery of what we already run
        self.desired = desired
        previous = self._task
        if previous is not None and not previous.done():
            previous.cancel()
        self._task = asyncio.create_task(self._apply(desired))

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _apply(self, desired: AssignmentDesired) -> None:
        started = time.perf_counter()
        stages = [s.stage for s in desired.stages]
        try:
            if not desired.stages:
                await self._report(desired, "idle", [], "", 0.0)
                return
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
                loaded = await asyncio.to_thread(
                    _load, self.runtime, data, self._key, stage.artifact, self.fetcher.cache
                )
                if loaded.info.index != stage.stage:
                    raise EdgesliceError(
                        f"artifact {stage.artifact[:12]} is stage {loaded.info.index}, "
                        f"assignment says stage {stage.stage}"
                    )
                keep.add(stage.artifact)
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
        await self.client.publish(
            self.topics.assignment_reported(self.agent_id), codec.encode(report), qos=1, retain=True
        )
