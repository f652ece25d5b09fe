"""The simulator agrees with the cost model where the closed forms are exact."""

from __future__ import annotations

import dataclasses

import pytest

from edgeslice.broker.protocol.errors import ConfigError, PlanningError
from edgeslice.client.scoring import Candidate, pick_replica
from edgeslice.lab.simfleet import Workload
from edgeslice.lab.simulate import simulate
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    Segment,
    client_period_s,
    stage_period_s,
)
from edgeslice.planner.partition import Plan, build_plan, plan_partition

MODEL = ModelCost(
    "m",
    input_bytes=100_000,
    segments=(Segment(2e9, 1000, 50_000, 50_000), Segment(2e9, 1000, 4_000, 4_000)),
)
FAST = Device("fast", gflops=20.0, memory_bytes=2**30, bandwidth_bps=100e6, rtt_s=0.001)
SLOW = Device("slow", gflops=2.0, memory_bytes=2**30, bandwidth_bps=100e6, rtt_s=0.004)
TWINS = [dataclasses.replace(FAST, agent_id=f"twin{i}") for i in range(3)]


def _plan(
    devices: list[Device], stages: list[tuple[int, int, list[str]]], strategy: str = "x"
) -> Plan:
    return build_plan(MODEL, devices, stages, objective="throughput", strategy=strategy)


def test_one_stage_one_request_at_a_time_takes_the_predicted_latency() -> None:
    plan = _plan([SLOW], [(0, 2, ["slow"])])
    res = simulate(MODEL, plan, [SLOW], Workload(requests=5, warmup=0))
    assert res.p50_s == pytest.approx(plan.latency_s, abs=1e-9)
    assert all(lat == pytest.approx(plan.latency_s, abs=1e-9) for lat in res.latencies_s)
    assert res.throughput_rps == pytest.approx(1 / plan.latency_s, rel=1e-9)


def test_a_two_stage_pipeline_at_one_in_flight_takes_the_predicted_latency() -> None:
    plan = _plan([FAST, SLOW], [(0, 1, ["fast"]), (1, 2, ["slow"])])
    res = simulate(MODEL, plan, [FAST, SLOW], Workload(requests=4))
    assert res.p50_s == pytest.approx(plan.latency_s, abs=1e-9)
    assert res.stages[1].mean_queue_s == 0.0


def test_a_saturated_pipeline_runs_at_its_slowest_stage() -> None:
    plan = _plan([FAST, SLOW], [(0, 1, ["fast"]), (1, 2, ["slow"])])
    res = simulate(MODEL, plan, [FAST, SLOW], Workload(requests=80, in_flight=8))
    assert res.throughput_rps == pytest.approx(1 / plan.period_s, rel=0.01)
    assert res.devices["slow"].cpu > 0.9 > res.devices["fast"].cpu
    assert res.stages[1].mean_queue_s > res.stages[0].mean_queue_s  # requests wait at "slow"
    assert res.p50_s > plan.latency_s


def test_a_replica_doubles_a_compute_bound_stage() -> None:
    one = _plan(TWINS[:1], [(0, 2, ["twin0"])])
    two = _plan(TWINS[:2], [(0, 2, ["twin0", "twin1"])])
    r1 = simulate(MODEL, one, TWINS[:1], Workload(requests=80, in_flight=8))
    r2 = simulate(MODEL, two, TWINS[:2], Workload(requests=80, in_flight=8))
    # Compute-bound: the agent receives and sends while computing, so its CPU (the stage
    # plus both hop sides' pack/unpack) sets the pace -- the planner's period.
    assert r1.throughput_rps == pytest.approx(1 / one.period_s, rel=0.01)
    assert one.period_s > one.stages[0].compute_s
    assert r2.throughput_rps == pytest.approx(2 * r1.throughput_rps, rel=0.02)


def test_a_link_bound_stage_runs_at_bandwidth_over_bytes() -> None:
    model = ModelCost("wide", input_bytes=2_000_000, segments=(Segment(1e3, 10, 1_000, 10),))
    thin = Device("thin", gflops=100.0, memory_bytes=2**30, bandwidth_bps=1e6, rtt_s=0.01)
    params = CostParams(per_message_s=0.0, min_compute_s=0.0, client_bandwidth_bps=1e12)
    plan = build_plan(model, [thin], [(0, 1, ["thin"])], objective="x", strategy="x", params=params)
    res = simulate(model, plan, [thin], Workload(requests=40, in_flight=4), params)
    assert res.throughput_rps == pytest.approx(1e6 / 2_000_000, rel=1e-6)
    assert res.devices["thin"].downlink > 0.99


def test_amp4ec_scoring_spreads_requests_evenly_over_equal_replicas() -> None:
    plan = _plan(TWINS, [(0, 2, [t.agent_id for t in TWINS])], strategy="amp4ec")
    res = simulate(MODEL, plan, TWINS, Workload(requests=90, in_flight=6))
    counts = res.stages[0].tasks
    assert sum(counts.values()) == 90
    assert max(counts.values()) - min(counts.values()) <= 2
    rr = simulate(MODEL, plan, TWINS, Workload(requests=90, in_flight=6, dispatch="round-robin"))
    assert set(rr.stages[0].tasks.values()) == {30}


def test_dispatch_beside_a_slow_replica_favours_the_fast_one() -> None:
    plan = _plan([FAST, SLOW], [(0, 2, ["fast", "slow"])])
    work = Workload(requests=200, in_flight=8)
    ours = simulate(MODEL, plan, [FAST, SLOW], work)
    paper = simulate(MODEL, plan, [FAST, SLOW], dataclasses.replace(work, dispatch="amp4ec"))
    rr = simulate(MODEL, plan, [FAST, SLOW], dataclasses.replace(work, dispatch="round-robin"))
    assert ours.throughput_rps > paper.throughput_rps > 3 * rr.throughput_rps
    assert ours.stages[0].tasks["fast"] > 4 * ours.stages[0].tasks["slow"]


def test_the_simulator_routes_with_the_clients_policy() -> None:
    plan = _plan([FAST, SLOW], [(0, 2, ["fast", "slow"])])
    n = 12  # all issued at t=0, before anything is measured: the plan's predictions decide
    res = simulate(MODEL, plan, [FAST, SLOW], Workload(requests=n, in_flight=n, warmup=0))
    in_flight = {"fast": 0, "slow": 0}
    for _ in range(n):
        cands = [
            Candidate(
                d.agent_id,
                resource_fit=1.0,
                load=0.0,
                recent_task_s=0.0,
                in_flight=in_flight[d.agent_id],
                latency_s=d.rtt_s,
                predicted_period_s=stage_period_s(MODEL, 0, 2, d, DEFAULT_PARAMS),
            )
            for d in (FAST, SLOW)
        ]
        in_flight[pick_replica(cands, plan.strategy)] += 1
    assert res.stages[0].tasks == in_flight
    assert 0 < in_flight["slow"] < in_flight["fast"]


def test_runs_are_deterministic_and_jitter_follows_the_seed() -> None:
    plan = _plan([FAST, SLOW], [(0, 1, ["fast"]), (1, 2, ["slow"])])
    work = Workload(requests=30, in_flight=3, jitter=0.2, seed=1)
    first = simulate(MODEL, plan, [FAST, SLOW], work)
    assert simulate(MODEL, plan, [FAST, SLOW], work) == first
    other = simulate(MODEL, plan, [FAST, SLOW], dataclasses.replace(work, seed=2))
    assert other.latencies_s != first.latencies_s
    assert len(set(first.latencies_s)) > 1


def test_bad_inputs_say_what_is_wrong() -> None:
    plan = _plan([FAST, SLOW], [(0, 1, ["fast"]), (1, 2, ["slow"])])
    with pytest.raises(PlanningError, match="slow"):
        simulate(MODEL, plan, [FAST])
    with pytest.raises(ConfigError, match="in_flight"):
        simulate(MODEL, plan, [FAST, SLOW], Workload(in_flight=0))
    with pytest.raises(ConfigError, match="dispatch"):
        simulate(MODEL, plan, [FAST, SLOW], Workload(dispatch="random"))


def test_many_replicas_run_at_the_clients_link_and_the_planner_knows_it() -> None:
    # 600 kB inputs over a 20 MB/s client link: 30 ms + 3 chunks x 0.56 ms per request,
    # while eight replicas of the whole model could serve one per 0.2 s / 8 = 25 ms.
    model = ModelCost("big-input", 600_000, (Segment(4e9, 1000, 4_000, 4_000),))
    fleet = [dataclasses.replace(FAST, agent_id=f"r{i}") for i in range(8)]
    params = CostParams(client_bandwidth_bps=20e6)
    plan = plan_partition(model, fleet, "throughput", params)
    client = client_period_s(model, params)
    assert client == pytest.approx(0.03 + 0.00168)
    assert plan.period_s == pytest.approx(client) == plan.client_period_s
    res = simulate(model, plan, fleet, Workload(requests=200, in_flight=16), params)
    assert res.throughput_rps == pytest.approx(1 / plan.period_s, rel=0.01)
    assert res.bottleneck()[0] == "client uplink"


def test_a_saturated_link_and_cpu_mix_matches_the_planners_period() -> None:
    # Stage 0 on a thin link (downlink 100 kB / 50 kB/s = 2 s, uplink 1 s, CPU 0.1 s), stage
    # 1 CPU-bound (1 s): the simulated rate is the planner's max over every device's CPU,
    # downlink, uplink and the client's -- here thin's downlink.
    thin = dataclasses.replace(FAST, agent_id="thin", bandwidth_bps=5e4)
    plan = _plan([thin, SLOW], [(0, 1, ["thin"]), (1, 2, ["slow"])])
    res = simulate(MODEL, plan, [thin, SLOW], Workload(requests=60, in_flight=6))
    assert res.throughput_rps == pytest.approx(plan.throughput_rps, rel=0.01)
    assert res.bottleneck()[0] == "downlink thin"
