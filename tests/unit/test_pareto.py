"""The latency/throughput Pareto front: its points, the bound that picks each, `edgeslice plan`
(fleet file, broker, PNG) and the planner serving the point its --max-latency-ms selects."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from memfleet import MLP_SPEC, SETTINGS, eventually, key_file, running

from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.protocol.messages import ONLINE, Info, PlanMessage, Status
from edgeslice.broker.protocol.topics import Topics
from edgeslice.lab.cli import cli
from edgeslice.lab.plan_cli import broker_fleet, write_png
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import Device, ModelCost, Segment
from edgeslice.planner.pareto import (
    Candidate,
    candidate_plans,
    dominated,
    pareto_front,
    pick_under_latency,
    plan_under_latency,
    selecting_bounds,
)
from edgeslice.planner.partition import plan_partition
from edgeslice.planner.planning import propose
from edgeslice.planner.service import PlannerService
from edgeslice.planner.startup import load_and_price

MB = 1_000_000
T = Topics("unit")


def _instance(seed: int) -> tuple[ModelCost, list[Device]]:
    """A model too big for some devices on a fleet of unlike devices and links."""
    rng = random.Random(seed)
    n = rng.randint(5, 10)
    segments = tuple(
        Segment(
            rng.uniform(0.5, 3) * 1e9, int(rng.uniform(50, 300) * MB), rng.randint(1, 8) * 5e4, 0
        )
        for _ in range(n)
    )
    devices = [
        Device(
            f"d{k}",
            gflops=rng.choice((2.0, 5.0, 10.0, 20.0)),
            memory_bytes=rng.choice((600, 1200, 4000)) * MB,
            bandwidth_bps=rng.choice((5e6, 20e6, 100e6)),
            rtt_s=rng.choice((0.001, 0.005, 0.02)),
        )
        for k in range(rng.randint(3, 6))
    ]
    return ModelCost("m", 600_000, segments), devices


def _layout(plan: object) -> list[tuple[int, int, tuple[str, ...]]]:
    return [(s.start, s.end, tuple(s.agents)) for s in plan.stages]  # type: ignore[attr-defined]


@pytest.mark.parametrize("seed", range(10))
def test_front_is_non_dominated_and_holds_both_optima(seed: int) -> None:
    model, devices = _instance(seed)
    candidates = candidate_plans(model, devices, exact=True)
    front = pareto_front(candidates)
    assert front == sorted(front, key=lambda c: c.latency_s)
    for point in front:  # nothing beats a front point on both figures
        assert not any(dominated(point, other) for other in candidates)
    for cand in candidates:  # and every other candidate is beaten or equalled by one
        assert cand in front or any(
            dominated(cand, p) or (p.latency_s, p.period_s) == (cand.latency_s, cand.period_s)
            for p in front
        )
    fastest = plan_partition(model, devices, "latency", exact=True)
    busiest = plan_partition(model, devices, "throughput", exact=True, margin=0.0)
    assert front[0].latency_s == pytest.approx(fastest.latency_s, rel=1e-12)
    assert min(p.period_s for p in front) == pytest.approx(busiest.period_s, rel=1e-12)


def test_each_point_is_picked_by_its_printed_bound() -> None:
    sizes = []
    for seed in range(10):
        model, devices = _instance(seed)
        candidates = candidate_plans(model, devices)
        front = pareto_front(candidates)
        sizes.append(len(front))
        for point, bound_ms in zip(front, selecting_bounds(front), strict=True):
            assert bound_ms >= point.latency_s * 1e3
            assert pick_under_latency(candidates, bound_ms / 1e3) is point
    assert max(sizes) >= 3  # the instances do exercise trade-offs


def test_a_bound_no_plan_meets_serves_the_fastest_plan() -> None:
    model, devices = _instance(3)
    front = pareto_front(candidate_plans(model, devices))
    plan, met = plan_under_latency(model, devices, front[0].latency_s / 2)
    assert not met and _layout(plan) == _layout(front[0].plan)
    plan, met = plan_under_latency(model, devices, 1e9)
    assert met and _layout(plan) == _layout(front[-1].plan) and plan.objective == "throughput"


def test_the_served_plan_is_kept_while_within_the_bound_and_the_margin() -> None:
    model, devices = _instance(3)
    front = pareto_front(candidate_plans(model, devices))
    assert len(front) >= 2
    best, runner_up = front[-1].plan, front[-2].plan
    served = [(s.start, s.end, s.agents) for s in runner_up.stages]
    bound = best.latency_s * 1.01
    kept, _ = plan_under_latency(model, devices, bound, margin=10.0, baseline=served)
    assert _layout(kept)[: len(served)] == [(a, b, tuple(c)) for a, b, c in served]
    moved, _ = plan_under_latency(model, devices, bound, margin=0.0, baseline=served)
    assert _layout(moved) == _layout(best)


def test_png_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model, devices = _instance(3)
    candidates = candidate_plans(model, devices)
    path = tmp_path / "front.png"
    assert write_png(pareto_front(candidates), candidates, str(path), "m on 5 devices")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_matplotlib_no_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it does
    front: list[Candidate] = pareto_front(candidate_plans(*_instance(3)))
    assert not write_png(front, front, str(tmp_path / "x.png"), "")
    assert not (tmp_path / "x.png").exists()


FLEET = """
[[agents]]
profile = "rpi4-4gb"
count = 2
[[agents]]
profile = "rpi3b"
link = { bandwidth_mbit = 20, latency_ms = 5 }
"""


def test_plan_command_prints_the_front_of_a_fleet_file(tmp_path: Path) -> None:
    (tmp_path / "fleet.toml").write_text(FLEET)
    runner = CliRunner()
    args = ["plan", "--model", MLP_SPEC, "--fleet", str(tmp_path / "fleet.toml")]
    result = runner.invoke(cli, [*args, "--json", "--no-png"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows and rows[0]["point"] == 0 and rows[0]["max_latency_ms"] >= rows[0]["latency_ms"]
    agents = {a for row in rows for stage in row["layout"] for a in stage["agents"]}
    assert agents <= {"rpi4-4gb-1", "rpi4-4gb-2", "rpi3b-3"}
    png = tmp_path / "front.png"
    table = runner.invoke(cli, [*args, "--png", str(png)])
    assert table.exit_code == 0, table.output
    assert "SERVE IT WITH" in table.stdout and "--max-latency-ms" in table.stdout
    assert "<- --objective latency" in table.stdout
    if png.exists():
        assert f"wrote {png}" in table.stderr
    else:
        assert "matplotlib is not installed" in table.stderr
    bad = runner.invoke(cli, [*args, "--png", "x.png", "--no-png"])
    assert bad.exit_code == 2
    missing = runner.invoke(cli, ["plan", "--model", MLP_SPEC, "--fleet", "/nonexistent.toml"])
    assert missing.exit_code == 1 and "does not exist" in missing.output


async def _announce(broker: MemoryBroker, agent_id: str, gflops: float, budget: int) -> None:
    client = broker.client(f"agent-{agent_id}")
    await client.connect()
    status = Status(agent_id=agent_id, state=ONLINE, session=7, ts=time.time())
    info = Info(
        agent_id=agent_id, profile="x86-laptop", gflops=gflops, session=7,
        memory_budget_bytes=budget, link_rtt_s=0.002, link_bandwidth_bps=20e6,
    )  # fmt: skip
    await client.publish(T.status(agent_id), codec.encode(status), qos=1, retain=True)
    await client.publish(T.info(agent_id), codec.encode(info), qos=1, retain=True)


def test_plan_reads_the_agents_on_the_broker() -> None:
    async def scenario() -> list[Device]:
        broker = MemoryBroker()
        await _announce(broker, "a", 4.0, 1 << 30)
        await _announce(broker, "b", 8.0, 1 << 29)
        registry, served = await broker_fleet(SETTINGS, "mlp", 0.2, broker.factory)
        assert served is None
        return list(registry.devices(time.time()))

    devices = asyncio.run(scenario())
    assert [(d.agent_id, d.gflops, d.bandwidth_bps) for d in devices] == [
        ("a", 4.0, 20e6),
        ("b", 8.0, 20e6),
    ]


def test_the_planner_serves_the_point_its_bound_selects(tmp_path: Path) -> None:
    """Every point of a front with trade-offs, chosen by its bound, is what propose serves."""
    loaded, profile, _ = load_and_price(MLP_SPEC, 8)
    n = len(profile.segments)
    cost = ModelCost(loaded.name, 4000, tuple(Segment(2e9, 300 * MB, 200_000, 0) for _ in range(n)))
    devices = [
        Device("a", 20, 700 * MB, 50e6, 0.002),
        Device("b", 10, 700 * MB, 50e6, 0.002),
        Device("c", 10, 2000 * MB, 10e6, 0.002),
        Device("d", 5, 400 * MB, 20e6, 0.004),
    ]
    front = pareto_front(candidate_plans(cost, devices))
    assert len(front) >= 2
    key = load_signing_key(key_file(tmp_path))
    for point, bound_ms in zip(front, selecting_bounds(front), strict=True):
        config = PlannerConfig(MLP_SPEC, SETTINGS, max_latency_s=bound_ms / 1e3)
        proposal = asyncio.run(propose(config, cost, loaded, profile, key, devices, [], []))
        assert _layout(proposal.plan) == _layout(point.plan)
        assert [(s.start_segment, s.end_segment) for s in proposal.stages] == [
            (s.start, s.end) for s in point.plan.stages
        ]


def test_the_planner_service_plans_under_its_bound(tmp_path: Path) -> None:
    """Over the memory broker: the served plan is the front's pick for the bound."""

    async def scenario() -> None:
        broker = MemoryBroker()
        config = PlannerConfig(
            MLP_SPEC, SETTINGS, max_latency_s=1e-6, min_agents=3, replan_delay_s=0.05,
            max_segments=8, fleet_key_file=key_file(tmp_path),
        )  # fmt: skip
        planner = PlannerService(config, transport=broker.factory)
        async with running(planner.run):
            await eventually(lambda: planner.model_name, what="model loaded")
            for agent_id, gflops, budget in (("a", 4, 6000), ("b", 8, 9000), ("c", 2, 1 << 20)):
                await _announce(broker, agent_id, gflops, budget)

            def plan() -> PlanMessage | None:
                payload = broker.retained_payload(T.plan(planner.model_name))
                return codec.decode(payload, PlanMessage) if payload else None

            served = await eventually(plan, what="a plan")
            assert isinstance(served, PlanMessage) and served.stages
            devices = planner.registry.devices(time.time())
            front = pareto_front(candidate_plans(planner.cost, devices))
            # no plan is within 1 us: the planner serves the front's least-latency point
            assert [(s.start_segment, s.end_segment, tuple(s.agents)) for s in served.stages] == (
                _layout(front[0].plan)
            )
            assert served.objective == "throughput"

    asyncio.run(scenario())


def test_the_bound_is_checked() -> None:
    with pytest.raises(ConfigError, match="max-latency-ms must be > 0"):
        PlannerConfig(MLP_SPEC, SETTINGS, max_latency_s=0.0)
    with pytest.raises(ConfigError, match="--objective throughput"):
        PlannerConfig(MLP_SPEC, SETTINGS, objective="latency", max_latency_s=0.1)
