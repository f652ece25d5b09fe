"""AMP4EC replica scoring: worked examples by hand, thresholds, choice, weight parsing."""

from __future__ import annotations

import pytest

from edgeslice.broker.protocol.errors import ConfigError, PlanningError
from edgeslice.client.scoring import (
    Candidate,
    Weights,
    choose,
    eligible,
    finish_s,
    parse_weights,
    pick_replica,
    rank,
    score,
)

W = Weights()  # 0.2 resource, 0.2 load, 0.1 performance, 0.5 balance; max load 0.8, 0.5 s

A = Candidate("a", resource_fit=0.9, load=0.3, recent_task_s=0.25, in_flight=1, latency_s=0.01)
B = Candidate("b", resource_fit=0.5, load=0.6, recent_task_s=1.0, in_flight=0, latency_s=0.02)
HOT = Candidate("hot", resource_fit=1.0, load=0.85, recent_task_s=0.0, in_flight=0, latency_s=0.0)


def test_score_worked_examples() -> None:
    # a: S_R 0.9, S_L 1 - 0.3 = 0.7, S_P 1 / 1.25 = 0.8, S_B 1 / (1 + 2) = 1/3
    #    0.2 * 0.9 + 0.2 * 0.7 + 0.1 * 0.8 + 0.5 / 3 = 0.18 + 0.14 + 0.08 + 0.1667 = 0.5667
    assert score(A, W) == pytest.approx(0.18 + 0.14 + 0.08 + 0.5 / 3)
    # b: S_R 0.5, S_L 0.4, S_P 1 / 2 = 0.5, S_B 1 -> 0.1 + 0.08 + 0.05 + 0.5 = 0.73
    assert score(B, W) == pytest.approx(0.73)
    # hot: 0.2 + 0.2 * 0.15 + 0.1 + 0.5 = 0.83 -- the best score, but overloaded
    assert score(HOT, W) == pytest.approx(0.83)


def test_an_idle_replica_beats_a_busy_one_because_balance_weighs_most() -> None:
    assert choose([A, B, HOT], W) is B


def test_eligibility_thresholds_are_inclusive() -> None:
    at_limits = Candidate("x", 0.5, load=0.8, recent_task_s=0.1, in_flight=0, latency_s=0.5)
    assert eligible(at_limits, W)
    assert not eligible(HOT, W)  # load 0.85 > 0.8
    far = Candidate("far", 1.0, load=0.0, recent_task_s=0.0, in_flight=0, latency_s=0.6)
    assert not eligible(far, W)  # 0.6 s > 0.5 s
    assert choose([far, A], W) is A


def test_when_nothing_is_eligible_the_least_loaded_still_gets_the_request() -> None:
    busy = Candidate("busy", 1.0, load=0.95, recent_task_s=0.0, in_flight=0, latency_s=0.0)
    assert choose([busy, HOT], W) is HOT  # 0.85 < 0.95


def test_ties_go_to_the_smallest_agent_id() -> None:
    twin_z = Candidate("z", 0.5, 0.5, 0.5, 0, 0.01)
    twin_m = Candidate("m", 0.5, 0.5, 0.5, 0, 0.01)
    assert choose([twin_z, twin_m], W) is twin_m


def test_rank_is_the_retry_order() -> None:
    assert [c.agent_id for c in rank([A, HOT, B], W)] == ["b", "a", "hot"]


def test_finish_worked_examples() -> None:
    # a: 1 in flight, nothing measured, no prediction given -> (1 + 1) x 1.0 s
    assert finish_s(A) == pytest.approx(2.0)
    measured = Candidate("m", 1.0, 0.0, 0.0, in_flight=3, latency_s=0.0, compute_s=0.25)
    assert finish_s(measured) == pytest.approx(1.0)  # (3 + 1) x 0.25 s
    predicted = Candidate("p", 1.0, 0.0, 0.0, in_flight=0, latency_s=0.0, predicted_period_s=0.4)
    assert finish_s(predicted) == pytest.approx(0.4)


def test_pick_replica_scores_amp4ec_plans_and_finishes_the_others() -> None:
    assert pick_replica([A, B, HOT], "amp4ec", W) == choose([A, B, HOT], W).agent_id == "b"
    # edgeslice: a (2 x 1.0) vs b (1 x 1.0) vs hot (1 x 1.0, load not filtered) -> b by id
    assert pick_replica([A, B, HOT], "edgeslice", W) == "b"
    quick = Candidate("quick", 1.0, 0.9, 0.0, in_flight=2, latency_s=0.0, compute_s=0.1)
    assert pick_replica([A, B, HOT, quick], "edgeslice", W) == "quick"  # 3 x 0.1 s


def test_no_candidates_is_a_planning_error() -> None:
    with pytest.raises(PlanningError, match="no replica"):
        choose([], W)


def test_out_of_range_inputs_are_clamped_into_sub_scores() -> None:
    odd = Candidate(
        "odd", resource_fit=3.0, load=-1.0, recent_task_s=-2.0, in_flight=-4, latency_s=0
    )
    # Clamped to S_R 1, S_L 1, S_P 1, S_B 1: the weights' sum.
    assert score(odd, W) == pytest.approx(1.0)


def test_parse_weights_accepts_the_flag_format() -> None:
    text = "resource=0.2,load=0.2,performance=0.1,balance=0.5,max_load=0.8"
    assert parse_weights(text) == Weights()
    assert parse_weights(" balance = 0.7 , max_latency_s=1.5 ") == Weights(
        balance=0.7, max_latency_s=1.5
    )
    assert parse_weights("") == Weights()


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("speed=1", "speed=1"),
        ("load=abc", "load='abc'"),
        ("load=0.1,load=0.2", "'load' is given twice"),
        ("balance=-1", "balance=-1"),
        ("load=nan", "load=nan"),
        ("max_load=1.5", "max_load=1.5"),
        ("resource", "'resource' is not key=value"),
        ("resource=0,load=0,performance=0,balance=0", "all 0"),
    ],
)
def test_parse_weights_errors_name_the_key(text: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(")):
        parse_weights(text)
