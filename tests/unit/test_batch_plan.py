"""Per-segment batch gains in planning: measured gains change the throughput plan, a stage
whose gain is below 1 is told not to batch, and the agent's batch queue obeys
(planner/batchcost.py, planner/timing.py, agent/batching.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from memfleet import FakeHeader, FakeJob, agent_config, build_mlp, eventually, key_file, running
from torch import nn

from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    ONLINE,
    AssignmentDesired,
    AssignmentReported,
    Info,
    PlanMessage,
    PlanStage,
    StageAssignment,
    Status,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.planner.batchcost import (
    gain_at,
    saturated_period_s,
    stage_gain,
    stage_max_batch,
)
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    Device,
    ModelCost,
    Segment,
    stage_period_s,
)
from edgeslice.planner.costtable import CostTable
from edgeslice.planner.partition import plan_partition
from edgeslice.planner.profile import profile_model
from edgeslice.planner.registry import Registry
from edgeslice.planner.retained import describe_plan, desired_assignments, plan_stages
from edgeslice.planner.search import device_classes, plan_groups
from edgeslice.planner.stages import build_stages
from edgeslice.planner.timing import timed_cost

T = Topics("unit")


def _model(gains: list[float], batch_size: int = 8) -> ModelCost:
    """Segments of 10 GFLOP each (0.1 s on a 100 GFLOP/s device), tiny activations."""
    segs = tuple(Segment(1e10, 1000, 1000, 1000, batch_gain=g) for g in gains)
    return ModelCost("m", input_bytes=1000, segments=segs, batch_size=batch_size)


def _devices(max_batch: int, count: int = 2) -> list[Device]:
    return [Device(f"d{k}", 100.0, 1 << 30, 1e9, 0.0005, max_batch=max_batch) for k in range(count)]


def _cuts(plan: Any) -> list[int]:
    return [s.start for s in plan.stages[1:]]


def test_large_segment_gains_move_the_throughput_cut() -> None:
    """Segments 0-3 batch 4x: priced saturated, the first stage would take more of the model
    (cut at 5 or 6, saturated period ~0.3 s), but that cut is 50 % slower at batch 1 (0.6
    against 0.4 s), more than the planner's margin: the plan keeps the even cut."""
    model = _model([4.0] * 4 + [1.0] * 4)
    plain = plan_partition(model, _devices(1), "throughput", replicas=False)
    assert _cuts(plain) == [4]
    assert plain.saturated_period_s == pytest.approx(plain.period_s)
    # below saturation the batched cut is slower (0.6 against 0.5 s per request): with the
    # default margin (10 %) the planner keeps the batch-1 plan ...
    kept = plan_partition(model, _devices(8), "throughput", replicas=False)
    assert _cuts(kept) == [4]
    assert kept.saturated_period_s == pytest.approx(0.4, rel=0.05)
    # the search on the batched table alone moves the cut (what the guard turned down)
    t = CostTable(model, _devices(8), batched=True)
    groups, _ = plan_groups(
        t, device_classes(_devices(8), DEFAULT_PARAMS), "throughput", 2, True, False
    )
    assert [i for i, _, _ in groups[1:]] in ([5], [6])
    assert max(t.period(i, j, ds[0]) for i, j, ds in groups) == pytest.approx(0.3, rel=0.05)


def test_a_batched_plan_no_slower_at_batch_1_is_taken() -> None:
    """Two of four equal devices batch: the batch-1 search ties on any pair, the batched
    one picks the batching pair (saturated 0.1 s, batch 1 the same 0.4 s)."""
    devices = [
        Device(f"d{k}", 100.0, 1 << 30, 1e9, 0.0005, max_batch=b)
        for k, b in enumerate((1, 1, 8, 8))
    ]
    plan = plan_partition(_model([4.0] * 8), devices, "throughput", replicas=False, max_stages=2)
    assert sorted(a for s in plan.stages for a in s.agents) == ["d2", "d3"]
    assert plan.period_s == pytest.approx(0.4, rel=0.05)  # the reported, batch-1 period
    assert plan.saturated_period_s == pytest.approx(0.1, rel=0.05)
    assert all(s.max_batch is None for s in plan.stages)


def test_latency_plans_ignore_batch_gains() -> None:
    model = _model([4.0] * 4 + [1.0] * 4)
    a = plan_partition(model, _devices(1), "latency", replicas=False)
    b = plan_partition(model, _devices(8), "latency", replicas=False)
    assert _cuts(a) == _cuts(b)
    assert a.latency_s == pytest.approx(b.latency_s)


def test_a_stage_that_batching_slows_down_is_told_not_to_batch() -> None:
    slow = _model([0.7] * 6)
    assert stage_gain(slow, 0, 6) == pytest.approx(0.7)
    assert stage_max_batch(slow, 0, 6) == 1
    assert stage_max_batch(_model([1.5] * 6), 0, 6) is None
    assert stage_max_batch(_model([0.7] * 6, batch_size=1), 0, 6) is None  # not measured
    plan = plan_partition(slow, _devices(8), "throughput", replicas=False)
    assert [s.max_batch for s in plan.stages] == [1] * len(plan.stages)
    # told not to batch, it is priced at batch 1, not slower
    assert plan.saturated_period_s == pytest.approx(plan.period_s)
    # mixed: the stage holding the losing segments is told not to batch, the other batches
    mixed = _model([0.5, 0.5, 0.5, 2.0, 2.0, 2.0])
    plan = plan_partition(mixed, _devices(8), "throughput", max_stages=2, replicas=False)
    assert [(s.start, s.end, s.max_batch) for s in plan.stages] == [(0, 3, 1), (3, 6, None)]


@dataclasses.dataclass
class _Artifact:
    sha256: str
    size: int = 10
    param_bytes: int = 0
    input_specs: tuple[Any, ...] = ()
    output_specs: tuple[Any, ...] = ()


def test_the_no_batch_word_reaches_plan_stages_and_assignments_on_the_wire() -> None:
    model = _model([0.5, 0.5, 0.5, 2.0, 2.0, 2.0])
    devices = _devices(8)
    plan = plan_partition(model, devices, "throughput", max_stages=2, replicas=False)
    arts = [_Artifact("a" * 64), _Artifact("b" * 64)]
    stages = plan_stages(plan, arts, model, devices, DEFAULT_PARAMS)
    assert [s.max_batch for s in stages] == [1, None]
    wanted = desired_assignments(plan, arts)
    desired = AssignmentDesired("x", "p", 1, stages=[wanted[plan.stages[0].agents[0]][0]])
    raw = msgpack.unpackb(codec.encode(desired))
    assert raw["stages"][0]["max_batch"] == 1
    assert codec.decode(msgpack.packb(raw), AssignmentDesired).stages[0].max_batch == 1
    # an older planner's assignment (no max_batch on the wire): the agent's own setting
    del raw["stages"][0]["max_batch"]
    assert codec.decode(msgpack.packb(raw), AssignmentDesired).stages[0].max_batch is None


def test_the_search_table_prices_the_saturated_period_of_the_reference() -> None:
    model = _model([1.0, 3.0, 1.5, 6.0, 1.0, 2.5])
    devices = [
        Device("fast", 20.0, 1 << 30, 1e8, 0.001, max_batch=8),
        Device("half", 5.0, 1 << 30, 1e8, 0.001, max_batch=4),
        Device("off", 10.0, 1 << 30, 1e8, 0.001, max_batch=1),
    ]
    plain, table = CostTable(model, devices), CostTable(model, devices, batched=True)
    for i in range(6):
        for j in range(i + 1, 7):
            for d, dev in enumerate(devices):
                want = saturated_period_s(model, i, j, dev)
                assert table.period(i, j, d) == pytest.approx(want, rel=1e-9)
                assert plain.period(i, j, d) == pytest.approx(stage_period_s(model, i, j, dev))
                assert table.latency(i, j, d) == pytest.approx(plain.latency(i, j, d), rel=1e-12)
    # a device batching 4 gets the gain interpolated between 1 (batch 1) and the gain at 8
    assert gain_at(model.segments[3], 8, 4) == pytest.approx(1 + 5.0 * 3 / 7)
    assert gain_at(model.segments[3], 8, 32) == pytest.approx(6.0)  # never extrapolated


def test_timed_cost_measures_a_gain_per_segment_of_a_batchable_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    inputs = (torch.randn(1, 64),)
    profile = profile_model(model, inputs)
    cost, _ = timed_cost(profile, inputs, repeats=2, calibrate_seconds=0.05, module=model)
    assert cost.batch_size == 8
    assert all(0.1 <= s.batch_gain <= 8.0 for s in cost.segments)
    assert any(s.batch_gain != 1.0 for s in cost.segments)
    unmeasured, _ = timed_cost(profile, inputs, repeats=1, calibrate_seconds=0.05)
    assert unmeasured.batch_size == 1
    assert all(s.batch_gain == 1.0 for s in unmeasured.segments)


def test_an_agent_told_not_to_batch_a_stage_runs_its_requests_one_at_a_time(
    tmp_path: Path,
) -> None:
    model, inputs = build_mlp()
    profile = profile_model(model, inputs)
    key = load_signing_key(key_file(tmp_path))
    (art,) = build_stages(model, inputs, profile, [0, len(profile.segments)], key)
    assert art.batchable

    async def scenario(max_batch: int | None) -> int:
        broker = MemoryBroker()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        service.fetcher.cache.put(art.sha256, art.data)
        planner = broker.client("planner")
        await planner.connect()
        async with running(service.run):
            await eventually(lambda: broker.retained_payload(T.info("a1")), what="info")
            stage = StageAssignment(0, art.sha256, size=art.size, max_batch=max_batch)
            desired = AssignmentDesired("a1", "p1", 1, model="mlp", stages=[stage])
            await planner.publish(
                T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True
            )

            def ready() -> bool:
                topic = T.assignment_reported("a1")
                payload = broker.retained_payload(topic)
                return bool(payload) and codec.decode(payload, AssignmentReported).state == "ready"

            await eventually(ready, what="ready")
            queue = service.dataplane.queue
            for _ in range(3):  # three requests of the stage, queued at once
                queue.put_nowait(
                    FakeJob(
                        FakeHeader({"route": [["a1", art.sha256]]}, plan_id="p1"), received_at=0.0
                    )
                )  # type: ignore[arg-type]
            return len(await queue.get_batch())

    assert asyncio.run(scenario(None)) == 3  # the agent's own --max-batch (8)
    assert asyncio.run(scenario(1)) == 1


def test_the_exact_search_finds_the_least_saturated_period_with_mixed_gains() -> None:
    """Brute force over every pipeline, priced by the batched table (CPU = the smaller of
    batch 1 and batched where a device batches): the exact DP finds its optimum, the
    heuristics a feasible plan no better than it."""
    rng = random.Random(7)
    for _ in range(12):
        gains = [rng.choice([0.5, 0.8, 1.0, 1.5, 3.0, 6.0]) for _ in range(6)]
        segs = tuple(
            Segment(rng.uniform(1e9, 2e10), 1000, rng.choice([1000, 10**6]), 1000, batch_gain=g)
            for g in gains
        )
        model = ModelCost("m", 1000, segs, batch_size=8)
        devices = [
            Device("a", 100.0, 1 << 30, 1e7, 0.001, max_batch=8),
            Device("b", 40.0, 1 << 30, 1e8, 0.001, max_batch=2),
            Device("c", 70.0, 1 << 30, 1e8, 0.001, max_batch=1),
        ]
        t = CostTable(model, devices, batched=True)
        best = math.inf
        for k in range(1, 4):
            for cuts in itertools.combinations(range(1, 6), k - 1):
                bounds = (0, *cuts, 6)
                for order in itertools.permutations(range(3), k):
                    period = max(
                        t.period(a, b, d)
                        for (a, b), d in zip(itertools.pairwise(bounds), order, strict=True)
                    )
                    best = min(best, max(period, t.client_period))
        for exact in (True, False):
            groups, _ = plan_groups(
                t, device_classes(devices, DEFAULT_PARAMS), "throughput", 3, exact, False
            )
            got = max([t.client_period] + [t.period(i, j, ds[0]) for i, j, ds in groups])
            if exact:
                assert got == pytest.approx(best, rel=1e-9), gains
            else:
                assert got >= best * (1 - 1e-9)


def test_the_plan_line_names_the_batched_period_and_the_stages_not_batched() -> None:
    plan = PlanMessage(
        model="m",
        plan_id="p",
        plan_version=2,
        objective="throughput",
        strategy="edgeslice",
        stages=[PlanStage(0, 0, 3, ["a"], max_batch=1), PlanStage(1, 3, 6, ["b"])],
        predicted_latency_s=0.05,
        predicted_period_s=0.02,
        predicted_saturated_period_s=0.012,
    )
    assert describe_plan(plan) == (
        "plan v2 for m: 2 stages [0-2 on a] [3-5 on b]; predicted 20.0 ms/req (12.0 batched), "
        "50.0 ms latency (throughput); stages 0 not batched (it slows them)"
    )


def test_registry_devices_carry_the_agents_max_batch() -> None:
    registry = Registry(T)
    for agent_id, max_batch in (("old", 0), ("off", 1), ("on", 8)):
        registry.apply(T.status(agent_id), codec.encode(Status(agent_id, ONLINE, 1)), 0.0)
        info = Info(agent_id, "p", gflops=2.0, memory_budget_bytes=1 << 20, session=1)
        info = dataclasses.replace(info, max_batch=max_batch)
        registry.apply(T.info(agent_id), codec.encode(info), 0.0)
    assert {d.agent_id: d.max_batch for d in registry.devices(0.0)} == {
        "off": 1,
        "old": 1,
        "on": 8,
    }
