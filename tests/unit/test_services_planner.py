"""The planner service over the in-memory broker: agents appear -> plan; a last will -> re-plan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from memfleet import MLP_SPEC, SETTINGS, eventually, key_file, running

from edgeslice.broker.client import ConnectHook, Will
from edgeslice.broker.memory import MemoryBroker, MemoryClient
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    ONLINE,
    AssignmentDesired,
    AssignmentReported,
    Info,
    PlanMessage,
    PlannerStatus,
    PlanStage,
    Status,
    Telemetry,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.client.inference import InferenceClient
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import ModelCost, Segment
from edgeslice.planner.registry import Registry
from edgeslice.planner.replan import BackoffConfig
from edgeslice.planner.retained import describe_plan
from edgeslice.planner.service import PlannerService

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


async def _report_desired(
    broker: MemoryBroker, client: MemoryClient, agent_id: str, state: str
) -> int:
    """Answer the agent's retained desired assignment with ``state``; its plan version."""
    payload = broker.retained_payload(T.assignment_desired(agent_id))
    assert payload, f"no desired assignment for {agent_id}"
    desired = codec.decode(payload, AssignmentDesired)
    stages = [s.stage for s in desired.stages]
    error = "over the memory budget" if state == "error" else ""
    report = AssignmentReported(
        agent_id, desired.plan_id, desired.plan_version, state, stages, error=error
    )
    await client.publish(T.assignment_reported(agent_id), codec.encode(report), qos=1, retain=True)
    return desired.plan_version


def _config(tmp_path: Path, **changes: object) -> PlannerConfig:
    values: dict[str, object] = {
        "model_spec": MLP_SPEC,
        "broker": SETTINGS,
        "max_segments": 4,
        "replan_delay_s": 30.0,  # joins wait long: only leaves and errors re-plan in the test
        "fleet_key_file": key_file(tmp_path),
    }
    values.update(changes)
    return PlannerConfig(**values)  # type: ignore[arg-type]


def test_leave_replans_at_once_errors_back_off_and_no_agent_withdraws_the_plan(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        a = await _fake_agent(broker, "a")
        planner = PlannerService(_config(tmp_path), transport=broker.factory)
        planner.backoff.config = BackoffConfig(base_s=0.3, factor=2.0, cap_s=1.0)

        def plan_where(check: Callable[[PlanMessage], bool]) -> PlanMessage | None:
            plan = _plan(broker, "build_mlp")
            return plan if plan is not None and check(plan) else None

        def agents(plan: PlanMessage) -> set[str]:
            return {x for s in plan.stages for x in s.agents}

        async with running(planner.run):
            # an agent known at start is planned on at once (no quiet period to wait out)
            first = await eventually(lambda: plan_where(lambda p: True), what="a plan")
            assert isinstance(first, PlanMessage) and agents(first) == {"a"}
            # it cannot load the plan: re-planned at once; nobody else: withdrawn, saying why
            await _report_desired(broker, a, "a", "error")
            gone = await eventually(lambda: plan_where(lambda p: not p.stages), what="withdrawn")
            assert isinstance(gone, PlanMessage)
            assert "no usable agent" in gone.reason and "a sitting out" in gone.reason
            # its back-off ends: it is planned on again (not excluded until a restart)
            back = await eventually(lambda: plan_where(lambda p: bool(p.stages)), what="back")
            assert isinstance(back, PlanMessage) and agents(back) == {"a"}
            await _report_desired(broker, a, "a", "ready")
            await eventually(lambda: plan_where(lambda p: p.ready), what="ready")
            b = await _fake_agent(broker, "b")  # a join: waits for 30 s of quiet ...
            a.crash()  # ... but a leave re-plans at once, on b
            moved = await eventually(lambda: plan_where(lambda p: agents(p) == {"b"}), what="b")
            assert isinstance(moved, PlanMessage) and moved.plan_version > back.plan_version
            b.crash()
            final = await eventually(lambda: plan_where(lambda p: not p.stages), what="none")
            assert isinstance(final, PlanMessage) and final.reason == "no usable agent"

    asyncio.run(scenario())


def test_a_broker_restart_keeps_the_plan_while_its_agents_reconnect(tmp_path: Path) -> None:
    """The broker stops (sending every agent's last will) and starts again empty; the
    planner reconnects first. Agents back within the grace: the plan is kept, never
    withdrawn (a client waiting for it would fail at once). Agents not back: withdrawn
    once the grace is over, saying why (clients still fail fast when nobody is left)."""

    async def scenario() -> None:
        broker = MemoryBroker()
        agents = {name: await _fake_agent(broker, name) for name in ("a", "b")}
        # joins wait 0.5 s of quiet, every agent gone withdraws after that much: without
        # the grace the plan would be withdrawn before the agents are back
        config = _config(tmp_path, replan_delay_s=0.5, reconnect_grace_s=2.0)
        planner = PlannerService(config, transport=broker.factory)
        model = "build_mlp"

        async def restart_broker() -> None:
            for client in agents.values():
                client.crash()  # the stopping broker sends every last will ...
            # ... which reach the planner before its own connection drops (paho reconnects
            # a second later at the earliest)
            await eventually(lambda: not planner.registry.usable_ids(), what="the wills")
            planner.client.drop_connection()  # type: ignore[attr-defined]
            broker.retained.clear()  # no persistence: it comes back empty

        def withdrawn() -> list[PlanMessage]:
            plans = [
                codec.decode(p.payload, PlanMessage)
                for p in broker.published
                if p.topic == T.plan(model) and p.payload
            ]
            return [p for p in plans if not p.stages]

        async with running(planner.run):
            plan = await eventually(lambda: _plan(broker, model), what="a plan")
            assert isinstance(plan, PlanMessage)
            for name in {x for s in plan.stages for x in s.agents}:
                await _report_desired(broker, agents[name], name, "ready")
            ready = await eventually(lambda: (p := _plan(broker, model)) and p.ready and p)
            assert isinstance(ready, PlanMessage)

            await restart_broker()
            await eventually(lambda: _plan(broker, model), what="the plan re-published")
            await asyncio.sleep(1.0)  # longer than the 0.5 s the planner once waited
            agents = {name: await _fake_agent(broker, name) for name in agents}
            await asyncio.sleep(1.5)  # past the grace: the fleet is whole again
            kept = _plan(broker, model)
            assert kept is not None and kept.ready
            assert (kept.plan_id, kept.plan_version) == (ready.plan_id, ready.plan_version)
            assert withdrawn() == []

            await restart_broker()  # ... and this time no agent comes back
            gone = await eventually(withdrawn, timeout=15.0, what="the plan withdrawn")
            assert isinstance(gone, list) and gone[0].reason == "no usable agent"

    asyncio.run(scenario())


def test_a_stop_while_the_planner_is_still_connecting_ends_it(tmp_path: Path) -> None:
    """SIGTERM before the broker answers (nothing listens yet: paho retries for 10 s)
    ends the planner then, not when connecting gives up (a supervisor kills it first)."""

    class NeverAnswers(MemoryClient):
        async def connect(self, timeout: float = 10.0) -> None:
            await asyncio.Event().wait()

    async def scenario() -> None:
        broker = MemoryBroker()

        def factory(
            client_id: str, will: Will | None = None, on_connect: ConnectHook | None = None
        ) -> MemoryClient:
            return NeverAnswers(broker, client_id, will=will, on_connect=on_connect)

        planner = PlannerService(_config(tmp_path), transport=factory)
        stop = asyncio.Event()
        task = asyncio.ensure_future(planner.run(stop))
        await eventually(lambda: planner.model_name, what="the model loaded")
        stop.set()
        await asyncio.wait_for(task, 10.0)  # without the stop: never (connect never returns)
        assert broker.retained_payload(T.planner_status()) is None  # it never got online

    asyncio.run(scenario())


def test_a_restarted_planner_adopts_the_valid_retained_plan(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        agents = {name: await _fake_agent(broker, name) for name in ("a", "b")}
        config = _config(tmp_path)
        first = PlannerService(config, transport=broker.factory)
        async with running(first.run):
            plan = await eventually(lambda: _plan(broker, "build_mlp"), what="a plan")
            assert isinstance(plan, PlanMessage)
            for name in {x for s in plan.stages for x in s.agents}:
                await _report_desired(broker, agents[name], name, "ready")
            await eventually(lambda: (p := _plan(broker, "build_mlp")) and p.ready, what="ready")
        kept = _plan(broker, "build_mlp")
        assert kept is not None and kept.ready  # kept on exit
        second = PlannerService(config, transport=broker.factory)
        async with running(second.run):
            await eventually(lambda: second.served, what="adopted")
            assert (second.plan_id, second.version) == (kept.plan_id, kept.plan_version)
            await asyncio.sleep(0.3)  # nothing re-planned: the same plan is still served
            assert _plan(broker, "build_mlp") == kept
            status = codec.decode(broker.retained_payload(T.planner_status()) or b"", PlannerStatus)
            assert status.state == ONLINE and status.plan_version == kept.plan_version

    asyncio.run(scenario())


def test_a_planner_with_a_latency_bound_does_not_adopt_a_plan_over_it(tmp_path: Path) -> None:
    """--max-latency-ms on restart: a retained plan predicted slower than the bound is
    replaced, not adopted (a plan within the bound is adopted as before)."""

    async def scenario() -> None:
        broker = MemoryBroker()
        agents = {name: await _fake_agent(broker, name) for name in ("a", "b")}
        first = PlannerService(_config(tmp_path), transport=broker.factory)
        async with running(first.run):
            plan = await eventually(lambda: _plan(broker, "build_mlp"), what="a plan")
            assert isinstance(plan, PlanMessage)
            for name in {x for s in plan.stages for x in s.agents}:
                await _report_desired(broker, agents[name], name, "ready")
            await eventually(lambda: (p := _plan(broker, "build_mlp")) and p.ready, what="ready")
        kept = _plan(broker, "build_mlp")
        assert kept is not None and kept.ready and kept.predicted_latency_s > 0
        bound = kept.predicted_latency_s / 2
        second = PlannerService(_config(tmp_path, max_latency_s=bound), transport=broker.factory)
        async with running(second.run):
            await eventually(lambda: second.served, what="served")
            assert second.plan_id != kept.plan_id  # planned anew under the bound

    asyncio.run(scenario())


def test_garbage_retained_on_the_planners_topics_is_replaced_by_its_own(tmp_path: Path) -> None:
    """Malformed bytes or a foreign plan retained on plans/{model} (or on an agent's
    assignment/desired) are replaced by the planner's own, rate-limited; a client that
    connects afterwards sees the ready plan."""

    async def scenario() -> None:
        broker = MemoryBroker()
        a = await _fake_agent(broker, "a")
        planner = PlannerService(_config(tmp_path), transport=broker.factory)
        async with running(planner.run):
            plan = await eventually(lambda: _plan(broker, "build_mlp"), what="a plan")
            assert isinstance(plan, PlanMessage)
            await _report_desired(broker, a, "a", "ready")
            ready = await eventually(lambda: (p := _plan(broker, "build_mlp")) and p.ready and p)
            assert isinstance(ready, PlanMessage)
            desired = broker.retained_payload(T.assignment_desired("a"))
            vandal = broker.client("vandal")
            await vandal.connect()

            def planners(topic: str) -> int:
                return sum(p.topic == topic and p.sender != "vandal" for p in broker.published)

            topic = T.plan("build_mlp")
            before = planners(topic)
            for i in range(30):  # a burst of garbage: repaired, but not once per message
                await vandal.publish(topic, b"\xc1garbage%d" % i, qos=1, retain=True)
            await eventually(lambda: _plan_or_none(broker) == ready, what="plan repaired")
            assert planners(topic) - before <= 3
            assert planner.retained.repairs[topic] >= 1

            foreign = PlanMessage(**{**ready.__dict__, "plan_id": "someone", "plan_version": 99})
            await vandal.publish(topic, codec.encode(foreign), qos=1, retain=True)
            await eventually(lambda: _plan_or_none(broker) == ready, what="foreign replaced")

            mine = T.assignment_desired("a")
            await vandal.publish(mine, b"not msgpack", qos=1, retain=True)
            await eventually(lambda: broker.retained_payload(mine) == desired, what="desired")

            await vandal.publish(topic, b"\xc1late garbage", qos=1, retain=True)
            await eventually(lambda: _plan_or_none(broker) == ready, what="repaired again")
            async with InferenceClient(SETTINGS, "build_mlp", transport=broker.factory) as late:
                seen = await late.wait_ready(timeout=5.0)
            assert (seen.plan_id, seen.plan_version, seen.ready) == (
                ready.plan_id,
                ready.plan_version,
                True,
            )

    asyncio.run(scenario())


def _plan_or_none(broker: MemoryBroker) -> PlanMessage | None:
    """The retained plan, or None while it is garbage."""
    try:
        return _plan(broker, "build_mlp")
    except EdgesliceError:
        return None
