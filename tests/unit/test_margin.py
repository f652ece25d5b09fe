"""The decision margin, and what it buys: adding a device never makes the predicted plan worse."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.costmodel import CostParams, Device, ModelCost, Segment, fit_correction
from edgeslice.planner.margin import (
    DEFAULT_MARGIN,
    MAX_MARGIN,
    MIN_MARGIN,
    decision_margin,
    gain,
    prediction_error,
    prefer,
    worth_switching,
)
from edgeslice.planner.partition import Plan, plan_partition

MB = 1_000_000
PARAMS = CostParams()


def test_gain_is_the_relative_time_saved() -> None:
    assert gain(0.8, 1.0) == pytest.approx(0.2)
    assert gain(1.2, 1.0) == pytest.approx(-0.2)
    assert gain(1.0, math.inf) == math.inf
    assert gain(0.0, 0.0) == 0.0


def test_switching_needs_a_gain_beyond_the_margin() -> None:
    assert worth_switching(0.85, 1.0, 0.10)
    assert not worth_switching(0.95, 1.0, 0.10)  # 5 % is inside a 10 % prediction error
    assert not worth_switching(0.90, 1.0, 0.10)  # strictly more than the margin
    assert worth_switching(0.99, 1.0, 0.0)


def test_a_deeper_pipeline_must_win_by_the_margin_a_shallower_one_just_win() -> None:
    assert not prefer(0.95, 3, 1.0, 1, 0.10)
    assert prefer(0.85, 3, 1.0, 1, 0.10)
    assert prefer(0.99, 1, 1.0, 3, 0.10)
    assert not prefer(1.0, 1, 1.0, 3, 0.10)


def test_the_margin_is_the_measured_error_of_the_corrected_model() -> None:
    assert decision_margin() == DEFAULT_MARGIN
    assert prediction_error([], {}) is None
    # Agent "a": two stages, 10 requests each, measured 1.2x and 0.8x the prediction; the
    # fitted factor is the weighted median (0.8, shrunk): residuals are what is left.
    samples = [("a", 0.1, 0.12, 10), ("a", 0.1, 0.08, 10)]
    correction = {"a": 1.0}
    assert prediction_error(samples, correction) == pytest.approx(0.2)
    assert decision_margin(samples, correction) == pytest.approx(0.2)
    # A model that fits to 1 % is trusted no further than the floor; a wild one is capped.
    assert decision_margin([("a", 0.1, 0.101, 50)], {"a": 1.0}) == MIN_MARGIN
    assert decision_margin([("a", 0.1, 1.0, 50)], {"a": 1.0}) == MAX_MARGIN
    # The fitted correction removes an agent-wide bias from the residuals.
    biased = [("b", 0.1, 0.2, 30), ("b", 0.2, 0.42, 30)]
    assert prediction_error(biased, fit_correction(biased, prior_samples=0)) < 0.06


# -- adding a device never makes the predicted plan worse -------------------------------


@st.composite
def equal_fleets(draw: st.DrawFn) -> tuple[ModelCost, list[Device]]:
    """A random model (≤ 7 segments) and four identical devices of a random spec."""
    segments = draw(
        st.lists(
            st.builds(
                Segment,
                flops=st.floats(1e6, 1e10),
                param_bytes=st.integers(0, 300 * MB),
                out_bytes=st.integers(0, 3 * MB),
                act_bytes=st.integers(0, 3 * MB),
            ),
            min_size=1,
            max_size=7,
        )
    )
    gflops = draw(st.floats(0.5, 200))
    memory = draw(st.integers(100 * MB, 1000 * MB))
    bandwidth = draw(st.floats(1e5, 1e8))
    rtt = draw(st.floats(0, 0.02))
    devices = [Device(f"d{k}", gflops, memory, bandwidth, rtt) for k in range(4)]
    return ModelCost("h", draw(st.integers(0, 3 * MB)), tuple(segments)), devices


@st.composite
def mixed_fleets(draw: st.DrawFn) -> tuple[ModelCost, list[Device]]:
    """The same models, four devices of different specs joining in a random order."""
    model, _ = draw(equal_fleets())
    spec = st.tuples(st.floats(0.5, 200), st.integers(100 * MB, 1000 * MB), st.floats(1e5, 1e8))
    specs = draw(st.lists(spec, min_size=4, max_size=4))
    return model, [Device(f"d{k}", g, m, b, 0.001) for k, (g, m, b) in enumerate(specs)]


def _grow(
    model: ModelCost, devices: list[Device], margin: float, chained: bool
) -> list[tuple[int, Plan]]:
    """Plans for 1..4 devices; ``chained``: each re-plan starts from the previous plan."""
    plans: list[tuple[int, Plan]] = []
    for n in range(1, len(devices) + 1):
        baseline = None
        if chained and plans:
            baseline = [(s.start, s.end, s.agents) for s in plans[-1][1].stages]
        try:
            plan = plan_partition(
                model, devices[:n], "throughput", PARAMS, margin=margin, baseline=baseline
            )
        except PlanningError:
            assert not plans, "a fleet that could be planned stopped being plannable"
            continue
        plans.append((n, plan))
    return plans


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(equal_fleets(), st.sampled_from([0.0, 0.05, 0.10, 0.25]))
def test_re_planning_as_devices_join_never_predicts_worse(instance, margin) -> None:
    model, devices = instance
    plans = _grow(model, devices, margin, chained=True)
    for (_, before), (_, after) in pairwise(plans):
        assert after.period_s <= before.period_s * (1 + 1e-9)
        if len(after.stages) > len(before.stages):  # deeper only for a gain beyond the margin
            assert after.period_s < before.period_s * (1 - margin)


@SETTINGS
@given(mixed_fleets(), st.sampled_from([0.0, 0.10]))
def test_re_planning_as_uneven_devices_join_never_predicts_worse(instance, margin) -> None:
    model, devices = instance
    plans = _grow(model, devices, margin, chained=True)
    for (_, before), (_, after) in pairwise(plans):
        assert after.period_s <= before.period_s * (1 + 1e-9)


@SETTINGS
@given(equal_fleets())
def test_from_scratch_one_more_equal_device_never_predicts_worse(instance) -> None:
    # Without a baseline and without a margin the search alone is monotonic: the plan for
    # n devices, with the new one as a replica or unused, is among its candidates.
    model, devices = instance
    plans = _grow(model, devices, 0.0, chained=False)
    for (_, before), (_, after) in pairwise(plans):
        assert after.period_s <= before.period_s * (1 + 1e-9)


def test_the_scaling_runs_third_device_stays_a_replica() -> None:
    # The measured failure: three equal boards, a model that fits each. Whole-model
    # replicas (period ~ T / 3) against a 3-stage pipeline predicted a little better: the
    # pipeline's gain is inside the margin, so the third device joins as a replica.
    model = ModelCost(
        "mnv2-like",
        600_000,
        tuple(Segment(2e8, 100_000, 400_000 // (k + 1), 400_000) for k in range(12)),
    )
    boards = [Device(f"rpi4-{k}", 9.0, 3000 * MB, 117e6, 0.0004) for k in range(1, 5)]
    one = plan_partition(model, boards[:1], "throughput")
    two = plan_partition(model, boards[:2], "throughput", baseline=_stages(one))
    three = plan_partition(model, boards[:3], "throughput", baseline=_stages(two))
    four = plan_partition(model, boards[:4], "throughput", baseline=_stages(three))
    assert [len(p.stages) for p in (one, two, three, four)] == [1, 1, 1, 1]
    assert [len(p.stages[0].agents) for p in (one, two, three, four)] == [1, 2, 3, 4]
    periods = [p.period_s for p in (one, two, three, four)]
    assert periods == sorted(periods, reverse=True)
    assert periods[3] == pytest.approx(periods[0] / 4)


def _stages(plan: Plan) -> list[tuple[int, int, tuple[str, ...]]]:
    return [(s.start, s.end, s.agents) for s in plan.stages]


def test_a_baseline_that_lost_its_agent_is_ignored_and_a_better_plan_replaces_it() -> None:
    model = ModelCost("m", 1000, (Segment(1e9, 0, 1000, 1000), Segment(1e9, 0, 1000, 1000)))
    a, b = Device("a", 10, 10**9, 1e8, 0.001), Device("b", 10, 10**9, 1e8, 0.001)
    gone = plan_partition(model, [a], "throughput", baseline=[(0, 2, ("x",))])
    assert gone.stages[0].agents == ("a",)
    # "slow" serves today; "fast" joins 10x faster. For throughput it joins as a replica
    # (the same period as any other use of the two); for latency, far beyond any margin,
    # the request moves to it.
    slow, fast = Device("slow", 1, 10**9, 1e8, 0.001), Device("fast", 10, 10**9, 1e8, 0.001)
    served = [(0, 2, ("slow",))]
    joined = plan_partition(model, [slow, fast], "throughput", baseline=served)
    assert joined.stages[0].agents == ("slow", "fast")
    moved = plan_partition(model, [slow, fast], "latency", baseline=served)
    assert moved.stages[0].agents[0] == "fast"
    kept = plan_partition(model, [a, b], "latency", baseline=[(0, 2, ("b",))])
    assert kept.stages[0].agents[0] == "b"  # "a" is exactly as good: no reason to move
