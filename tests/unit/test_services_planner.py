"""The planner service over the in-memory broker: agents appear -> plan; a last will -> re-plan."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from memfleet import MLP_SPEC, SETTINGS, eventually, key_file, running

from edgeslice.broker.client import Will
from edgeslice.broker.memory import MemoryBroker, MemoryClient
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    ONLINE,
    AssignmentDesired,
    Info,
    PlanMessage,
    PlannerStatus,
    PlanStage,
    Status,
    Telemetry,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import ModelCost, Segment
from edgeslice.planner.registry import Registry
from edgeslice.planner.service import PlannerService, describe_plan

T = Topics("unit")


async def _fake_agent(broker: MemoryBroker, agent_id: str, gflops: float = 5.0) -> MemoryClient:
    """Status and info as an agent announces them, with its last will (no torch, no service)."""
    lost = codec.encode(Status(agent_id=agent_id, state=OFFLINE, session=7, reason="lost"))
    client = broker.client(f"agent-{agent_id}", will=Will(T.status(agent_id), lost))
    await client.connect()
    status = Status(agent_id=agent_id, state=ONLINE, session=7, ts=time.time())
    info = Info(agent_id=agent_id, profile="x86-laptop", gflops=gflops, session=7)
    info = Info(**{**info.__dict__, "memory_budget_bytes": 1 << 30, "link_rtt_s": 0.001})
    await client.publish(T.status(agent_id), codec.encode(status), qos=1, retain=True)
    await client.publish(T.info(agent_id), codec.encode(info), qos=1, retain=True)
    return client


def _plan(broker: MemoryBroker, model: str) -> PlanMessage | None:
    payload = broker.retained_payload(T.plan(model))
    return codec.decode(payload, PlanMessage) if payload else None


def test_agents_appearing_get_a_plan_and_a_last_will_replans(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        lines: list[str] = []
        config = PlannerConfig(
            model_spec=MLP_SPEC,
            broker=SETTINGS,
            min_agents=2,
            max_segments=4,
            replan_delay_s=0.05,
            fleet_key_file=key_file(tmp_path),
        )
        planner = PlannerService(
            config, transport=broker.factory, on_plan=lambda p: lines.append(describe_plan(p))
        )
        async with running(planner.run):
            await eventually(lambda: planner.model_name, what="model loaded")
            a = await _fake_agent(broker, "a")
            b = await _fake_agent(broker, "b")
            first = await eventually(lambda: _plan(broker, planner.model_name), what="a plan")
            assert isinstance(first, PlanMessage) and not first.ready
            used = {agent for stage in first.stages for agent in stage.agents}
            assert used <= {"a", "b"} and used
            for agent_id in used:
                desired = codec.decode(
                    broker.retained_payload(T.assignment_desired(agent_id)) or b"",
                    AssignmentDesired,
                )
                assert desired.plan_version == first.plan_version and desired.stages
            assert lines and lines[0].startswith(f"plan v1 for {planner.model_name}: ")
            assert "predicted" in lines[0] and "ms/req" in lines[0]

            gone = sorted(used)[0]
            (a if gone == "a" else b).crash()  # its will says offline: re-plan without it

            def replanned() -> PlanMessage | None:
                plan = _plan(broker, planner.model_name)
                return plan if plan and plan.plan_version > first.plan_version else None

            # min_agents gated the first plan only: the agent left is planned on at once
            second = await eventually(replanned, what="a re-plan")
            assert isinstance(second, PlanMessage)
            assert gone not in {agent for s in second.stages for agent in s.agents}
            assert second.stages
            assert broker.retained_payload(T.assignment_desired(gone)) is None  # cleared
        kept = _plan(broker, planner.model_name)  # a stopped planner keeps its plan ...
        assert kept is not None and kept.plan_version == second.plan_version
        status = codec.decode(broker.retained_payload(T.planner_status()) or b"", PlannerStatus)
        assert status.state == OFFLINE and "kept" in status.summary  # ... and says it left

    asyncio.run(scenario())


def test_describe_plan_is_one_readable_line() -> None:
    plan = PlanMessage(
        model="mobilenetv2",
        plan_id="p",
        plan_version=3,
        objective="throughput",
        strategy="edgeslice",
        stages=[PlanStage(0, 0, 12, ["a", "b"]), PlanStage(1, 12, 21, ["c"])],
        predicted_latency_s=0.0451,
        predicted_period_s=0.0123,
    )
    assert describe_plan(plan) == (
        "plan v3 for mobilenetv2: 2 stages [0-11 on a,b] [12-20 on c]; "
        "predicted 12.3 ms/req, 45.1 ms latency (throughput)"
    )


def test_registry_says_when_the_usable_set_changes_and_fits_corrections() -> None:
    registry = Registry(T)
    status = Status(agent_id="a", state=ONLINE, session=3)
    assert not registry.apply(T.status("a"), codec.encode(status), 0.0)  # no info yet
    info = Info(agent_id="a", profile="p", gflops=2.0, memory_budget_bytes=1 << 20, session=3)
    assert registry.apply(T.info("a"), codec.encode(info), 0.0)
    (device,) = registry.devices(0.0)
    assert (device.agent_id, device.gflops, device.memory_bytes) == ("a", 2.0, 1 << 20)
    assert device.bandwidth_bps > 0 and device.rtt_s > 0  # nominal link from the profile
    old = Info(agent_id="b", profile="p", gflops=2.0, session=1)
    registry.apply(T.status("b"), codec.encode(Status("b", ONLINE, session=2)), 0.0)
    assert not registry.apply(T.info("b"), codec.encode(old), 0.0)  # an earlier session's info
    timings = {"sha": {"stage": 0, "count": 5, "compute_s": 2.0, "queue_s": 0.0}}
    tel = Telemetry(agent_id="a", ts=1.0, cpu_percent=50.0, busy=0.4, stage_timings=timings)
    assert not registry.apply(T.telemetry("a"), codec.encode(tel), 1.0)
    assert registry.load("a", 1.0) == 0.4 and registry.devices(1.0, use_load=True)[0].load == 0.4
    cost = ModelCost("m", 64, (Segment(flops=1e9, param_bytes=0, out_bytes=4, act_bytes=0),))
    stages = [PlanStage(0, 0, 1, ["a"], artifact="sha")]
    correction = registry.correction(cost, stages, 1.0)
    assert correction.get("a", 1.0) > 1.0  # measured slower than predicted
    assert registry.correction(cost, [], 1.0) == {}
    lost = Status(agent_id="a", state=OFFLINE, session=3, reason="lost")
    assert registry.apply(T.status("a"), codec.encode(lost), 2.0)
    assert registry.usable_ids() == frozenset()
