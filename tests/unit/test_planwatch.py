"""client/planwatch.py: which plan a client routes by while the planner moves the fleet
to a new plan (the last ready one keeps serving while the new one loads)."""

from __future__ import annotations

import asyncio

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import PlanMessage, PlanStage
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.planwatch import PlanWatch

T = Topics("ns")


def _plan(version: int, agents: list[str], ready: bool, plan_id: str = "p1") -> PlanMessage:
    stages = [
        PlanStage(stage=i, start_segment=i, end_segment=i + 1, agents=[a], artifact="a" * 64)
        for i, a in enumerate(agents)
    ]
    return PlanMessage(
        model="m",
        plan_id=plan_id,
        plan_version=version,
        objective="throughput",
        strategy="edgeslice",
        stages=stages,
        ready=ready,
    )


def _watch(offline: set[str] | None = None) -> PlanWatch:
    down = offline if offline is not None else set()
    return PlanWatch(
        parse_broker_url("mqtt://127.0.0.1:1", "ns"), "m", "c", FleetState(T), lambda: down
    )


def _publish(watch: PlanWatch, plan: PlanMessage) -> None:
    asyncio.run(watch.on_plan(T.plan("m"), codec.encode(plan)))


def test_the_last_ready_plan_serves_while_a_newer_one_loads() -> None:
    watch = _watch()
    _publish(watch, _plan(1, ["a", "b"], ready=True))
    _publish(watch, _plan(2, ["a", "b", "c"], ready=False))  # c joined and is loading
    usable = watch.usable_plan()
    assert usable is not None and usable.plan_version == 1
    _publish(watch, _plan(2, ["a", "b", "c"], ready=True))
    usable = watch.usable_plan()
    assert usable is not None and usable.plan_version == 2


def test_no_fallback_to_a_dead_agent_another_planner_or_a_withdrawn_plan() -> None:
    watch = _watch(offline={"b"})
    _publish(watch, _plan(1, ["a", "b"], ready=True))
    _publish(watch, _plan(2, ["a", "c"], ready=False))
    assert watch.usable_plan() is None  # v1 needs b, which is offline
    other = _watch()
    _publish(other, _plan(1, ["a"], ready=True))
    _publish(other, _plan(1, ["a"], ready=False, plan_id="p2"))  # a restarted planner
    assert other.usable_plan() is None
    withdrawn = _watch()
    _publish(withdrawn, _plan(1, ["a"], ready=True))
    _publish(withdrawn, PlanMessage("m", "p1", 2, "throughput", "edgeslice", [], reason="none"))
    assert withdrawn.usable_plan() is None


def test_wait_ready_returns_the_serving_plan_and_respects_newer_than() -> None:
    watch = _watch()
    _publish(watch, _plan(1, ["a"], ready=True))
    _publish(watch, _plan(2, ["a", "b"], ready=False))

    async def go() -> tuple[int, bool]:
        first = await watch.wait_ready(timeout=1)
        try:
            await watch.wait_ready(timeout=0.2, newer_than=1)
            waited_out = False
        except Exception:
            waited_out = True
        return first.plan_version, waited_out

    version, waited_out = asyncio.run(go())
    assert version == 1 and waited_out  # a caller asking for a newer plan still waits
