"""The simulator agrees with the cost model where the closed forms are exact."""

from __future__ import annotations

import pytest

from planner.costmodel import Device, ModelCost, Segment
from planner.partition import build_plan
from planner.simulate import simulate

MODEL = ModelCost(
    "m",
    input_bytes=100_000,
    segments=(Segment(2e9, 1000, 50_000, 50_000), Segment(2e9, 1000, 4_000, 4_000)),
)
FAST = Device("fast", gflops=20.0, memory_bytes=2**30, bandwidth_bps=100e6, rtt_s=0.001)
SLOW = Device("slow", gflops=2.0, memory_bytes=2**30, bandwidth_bps=100e6, rtt_s=0.001)
TWIN = Device("twin", gflops=20.0, memory_bytes=2**30, bandwidth_bps=100e6, rtt_s=0.001)


def test_one_request_at_a_time_takes_the_predicted_latency() -> None:
    plan = build_plan(
        MODEL,
        [FAST, SLOW],
        [(0, 1, ["fast"]), (1, 2, ["slow"])],
        objective="latency",
        strategy="edgeslice",
    )
    res = simulate(MODEL, plan, [FAST, SLOW], in_flight=1, requests=5, warmup=0)
    assert res.p50_s == pytest.approx(plan.latency_s, rel=1e-9)
    assert res.throughput_rps == pytest.approx(1 / plan.latency_s, rel=1e-9)


def test_a_saturated_pipeline_runs_at_its_slowest_stage() -> None:
    plan = build_plan(
        MODEL,
        [FAST, SLOW],
        [(0, 1, ["fast"]), (1, 2, ["slow"])],
        objective="throughput",
        strategy="edgeslice",
    )
    res = simulate(MODEL, plan, [FAST, SLOW], in_flight=8, requests=80)
    assert res.throughput_rps == pytest.approx(1 / plan.period_s, rel=0.02)
    assert res.utilisation["slow"] > 0.9 > res.utilisation["fast"]


def test_a_replica_doubles_a_compute_bound_stage() -> None:
    one = build_plan(
        MODEL, [FAST], [(0, 2, ["fast"])], objective="throughput", strategy="edgeslice"
    )
    two = build_plan(
        MODEL,
        [FAST, TWIN],
        [(0, 2, ["fast", "twin"])],
        objective="throughput",
        strategy="edgeslice",
    )
    r1 = simulate(MODEL, one, [FAST], in_flight=8, requests=80)
    r2 = simulate(MODEL, two, [FAST, TWIN], in_flight=8, requests=80)
    assert r2.throughput_rps == pytest.approx(2 * r1.throughput_rps, rel=0.05)


def test_rate_aware_dispatch_beats_balanced_scoring_beside_a_slow_replica() -> None:
    plan = build_plan(
        MODEL,
        [FAST, SLOW],
        [(0, 2, ["fast", "slow"])],
        objective="throughput",
        strategy="edgeslice",
    )
    ours = simulate(MODEL, plan, [FAST, SLOW], in_flight=8, requests=120)
    paper = simulate(MODEL, plan, [FAST, SLOW], in_flight=8, requests=120, dispatch="amp4ec")
    assert ours.throughput_rps > paper.throughput_rps
    assert simulate(MODEL, plan, [FAST, SLOW], in_flight=8, requests=120) == ours  # determinism
