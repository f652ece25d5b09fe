"""Assignment changes are serialised, newest wins: one load at a time, intermediate states
skipped, a superseded load's result dropped (agent/assignments.py), over the memory broker."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from memfleet import agent_config, build_mlp, eventually, key_file, running

from edgeslice.agent.runtime import ArtifactCache, LoadedStage
from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    StageAssignment,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.planner.profile import profile_model
from edgeslice.planner.stages import build_stages

T = Topics("unit")


def _three_first_stages(tmp_path: Path) -> list[Any]:
    """Three different stage-0 artifacts of one model (cut at three places), in a1's cache."""
    model, inputs = build_mlp()
    profile = profile_model(model, inputs, max_segments=4)
    n = len(profile.segments)
    assert n >= 3, "the MLP profiles into at least 3 segments"
    key = load_signing_key(key_file(tmp_path))
    cache = ArtifactCache(tmp_path / "a1" / "artifacts")
    arts = []
    for bounds in ([0, n], [0, 1, n], [0, 2, n]):
        art = build_stages(model, inputs, profile, bounds, key)[0]
        cache.put(art.sha256, art.data)
        arts.append(art)
    assert len({a.sha256 for a in arts}) == 3
    return arts


class GatedLoads:
    """Wraps StageRuntime.load: records every load, counts how many run at once, and holds
    the loads of ``gated`` until :meth:`release` (a slow torch.export.load, on demand)."""

    def __init__(self, service: AgentService, gated: str) -> None:
        self.inner = service.runtime.load
        self.gated = gated
        self.started: list[str] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self._gate = threading.Event()
        self._lock = threading.Lock()
        service.runtime.load = self  # type: ignore[method-assign]

    def release(self) -> None:
        self._gate.set()

    def __call__(self, data: bytes, key: Any, sha256: str | None = None, cache: Any = None) -> Any:
        with self._lock:
            self.started.append(sha256 or "")
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if sha256 == self.gated:
                assert self._gate.wait(30.0), "the test never released the gated load"
            loaded: LoadedStage = self.inner(data, key, sha256=sha256, cache=cache)
            return loaded
        finally:
            with self._lock:
                self.concurrent -= 1


def _reports(broker: MemoryBroker) -> list[AssignmentReported]:
    topic = T.assignment_reported("a1")
    return [
        codec.decode(p.payload, AssignmentReported)
        for p in broker.published
        if p.topic == topic and p.payload
    ]


def test_newest_desired_wins_while_a_load_runs(tmp_path: Path) -> None:
    """v1 loads (held in torch); v2 then v3 arrive: v1's result is dropped, v2 is never
    loaded nor reported, v3 ends ready; never two loads at once."""
    v1, v2, v3 = _three_first_stages(tmp_path)

    async def scenario() -> None:
        broker = MemoryBroker()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        loads = GatedLoads(service, gated=v1.sha256)
        planner = broker.client("planner")
        await planner.connect()

        async def desire(version: int, art: Any) -> None:
            stage = StageAssignment(stage=0, artifact=art.sha256, size=art.size)
            desired = AssignmentDesired("a1", "p1", version, model="mlp", stages=[stage])
            await planner.publish(
                T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True
            )

        async with running(service.run):
            await eventually(lambda: broker.retained_payload(T.info("a1")), what="info")
            await desire(1, v1)
            await eventually(lambda: loads.started, what="v1's load started")
            await desire(2, v2)
            await desire(3, v3)
            await asyncio.sleep(0.2)  # give a wrong implementation the chance to load v2
            assert loads.started == [v1.sha256], "nothing else starts while v1 loads"
            loads.release()

            def settled() -> AssignmentReported | None:
                rep = _reports(broker)[-1]
                return rep if rep.plan_version == 3 and rep.state != "loading" else None

            final = await eventually(settled, what="v3 reported")
            assert isinstance(final, AssignmentReported)
            assert (final.state, final.stages) == ("ready", [0]), final.error
            assert loads.started == [v1.sha256, v3.sha256], "v2 is never loaded"
            assert loads.max_concurrent == 1
            reported = [(r.plan_version, r.state) for r in _reports(broker)]
            assert [v for v, _ in reported if v == 2] == [], f"v2 reported: {reported}"
            assert (1, "ready") not in reported, f"v1's dropped load was reported: {reported}"
            assert service.assignments.skipped == 2  # v1 (cancelled while loading), v2
            assert service.runtime.get(v3.sha256) is not None
            # a redelivery of v3 (a retained message after a reconnect) loads nothing again
            await desire(3, v3)
            await asyncio.sleep(0.1)
            assert loads.started == [v1.sha256, v3.sha256]
            assert _reports(broker)[-1].plan_version == 3

    asyncio.run(scenario())


def test_a_cleared_assignment_supersedes_a_load_and_reports_idle(tmp_path: Path) -> None:
    v1, _, _ = _three_first_stages(tmp_path)

    async def scenario() -> None:
        broker = MemoryBroker()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        loads = GatedLoads(service, gated=v1.sha256)
        planner = broker.client("planner")
        await planner.connect()
        async with running(service.run):
            await eventually(lambda: broker.retained_payload(T.info("a1")), what="info")
            stage = StageAssignment(stage=0, artifact=v1.sha256, size=v1.size)
            desired = AssignmentDesired("a1", "p1", 1, model="mlp", stages=[stage])
            topic = T.assignment_desired("a1")
            await planner.publish(topic, codec.encode(desired), qos=1, retain=True)
            await eventually(lambda: loads.started, what="v1's load started")
            await planner.publish(topic, b"", qos=1, retain=True)  # the planner took it back
            loads.release()

            def idle() -> AssignmentReported | None:
                rep = _reports(broker)[-1]
                return rep if rep.state == "idle" else None

            report = await eventually(idle, what="idle report")
            assert isinstance(report, AssignmentReported) and report.stages == []
            assert "ready" not in [r.state for r in _reports(broker)]

    asyncio.run(scenario())
