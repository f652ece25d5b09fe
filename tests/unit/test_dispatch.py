"""Per-request replica choice: rate-aware for edgeslice plans, AMP4EC's score for amp4ec.

The policy is one pure function, ``pick_replica``; the client and the simulator feed it.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.broker.protocol.messages import Info, PlanMessage, PlanStage, Telemetry
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.client.requests import Measured
from edgeslice.client.scoring import Candidate, Weights, choose, pick_replica


def _plan(strategy: str) -> PlanMessage:
    stage = PlanStage(
        stage=0,
        start_segment=0,
        end_segment=4,
        agents=["fast", "slow"],
        replica_period_s=[0.1, 1.0],
    )
    return PlanMessage(
        model="m",
        plan_id="p",
        plan_version=1,
        objective="throughput",
        strategy=strategy,
        stages=[stage],
        ready=True,
    )


def _client() -> InferenceClient:
    return InferenceClient(parse_broker_url("mqtt://127.0.0.1:1"), "m")


def _dispatch(strategy: str, requests: int, client: InferenceClient | None = None) -> Counter[str]:
    client = client or _client()
    plan = _plan(strategy)
    counts: Counter[str] = Counter()
    for _ in range(requests):  # all stay in flight: the choice sees every earlier one
        (agent,) = client.choose_route(plan)
        client.measured[agent].in_flight += 1
        counts[agent] += 1
    return counts


def test_edgeslice_plans_send_work_in_proportion_to_replica_speed() -> None:
    counts = _dispatch("edgeslice", 22)
    # (n + 1) x 0.1 s vs (m + 1) x 1.0 s: ten to one, as the replicas' rates
    assert counts == {"fast": 20, "slow": 2}


def test_amp4ec_plans_keep_the_papers_balanced_scoring() -> None:
    counts = _dispatch("amp4ec", 22)
    assert counts == {"fast": 11, "slow": 11}  # the balance term dominates the score


# -- the client feeds the policy from the shared fleet-state fold ---------------------------


def _tell(client: InferenceClient, agent: str, msg: Info | Telemetry) -> None:
    kind = "info" if isinstance(msg, Info) else "telemetry"
    topic = getattr(client.topics, kind)(agent)
    client.fleet.apply(topic, codec.encode(msg), time.time())


def test_the_client_skips_a_replica_whose_link_is_too_slow() -> None:
    client = _client()
    _tell(client, "fast", Info(agent_id="fast", profile="p", link_rtt_s=0.9))
    assert _dispatch("edgeslice", 5, client) == {"slow": 5}


def test_the_client_scores_amp4ec_plans_on_telemetry_load() -> None:
    client = _client()
    _tell(client, "fast", Telemetry(agent_id="fast", ts=0.0, cpu_percent=5.0, busy=0.95))
    assert _dispatch("amp4ec", 4, client) == {"slow": 4}  # fast is over max_load


def test_the_clients_own_measured_stage_times_override_the_prediction() -> None:
    client = _client()
    client.measured["slow"] = Measured(compute={0: 0.1})  # as fast as "fast" after all
    assert _dispatch("edgeslice", 10, client) == {"fast": 5, "slow": 5}


# -- pick_replica on plain values --------------------------------------------------------------


def _cand(agent: str, **kw: float) -> Candidate:
    base: dict[str, float] = {
        "resource_fit": 1.0,
        "load": 0.0,
        "recent_task_s": 0.0,
        "in_flight": 0,
        "latency_s": 0.0,
        "compute_s": 0.0,
        "predicted_period_s": 1.0,
    }
    base.update(kw)
    return Candidate(agent, **base)  # type: ignore[arg-type]


def test_earliest_finish_counts_in_flight_at_the_measured_rate() -> None:
    fast = _cand("fast", in_flight=4, compute_s=0.1)  # (4 + 1) x 0.1 = 0.5 s
    slow = _cand("slow", in_flight=0, compute_s=0.6)  # (0 + 1) x 0.6 = 0.6 s
    assert pick_replica([fast, slow], "edgeslice") == "fast"
    fast = _cand("fast", in_flight=6, compute_s=0.1)  # 0.7 s
    assert pick_replica([fast, slow], "edgeslice") == "slow"


def test_the_prediction_is_used_until_the_client_has_measured() -> None:
    unmeasured = _cand("a", predicted_period_s=0.2)
    measured_slow = _cand("b", predicted_period_s=0.1, compute_s=0.5)
    assert pick_replica([unmeasured, measured_slow], "edgeslice") == "a"


def test_earliest_finish_ignores_load_but_not_link_latency() -> None:
    busy_fast = _cand("busy", load=1.0, predicted_period_s=0.1)
    far_fast = _cand("far", latency_s=0.6, predicted_period_s=0.01)
    idle_slow = _cand("idle", predicted_period_s=1.0)
    assert pick_replica([busy_fast, far_fast, idle_slow], "edgeslice") == "busy"
    assert pick_replica([far_fast, idle_slow], "edgeslice") == "idle"
    far_slow = _cand("far2", latency_s=0.7, predicted_period_s=1.0)
    assert pick_replica([far_fast, far_slow], "edgeslice") == "far"  # all far: all eligible


def test_the_latency_threshold_comes_from_the_weights() -> None:
    far_fast = _cand("far", latency_s=0.6, predicted_period_s=0.01)
    idle_slow = _cand("idle", predicted_period_s=1.0)
    assert pick_replica([far_fast, idle_slow], "edgeslice", Weights(max_latency_s=1.0)) == "far"


def test_equal_finishes_go_to_the_smallest_agent_id() -> None:
    assert pick_replica([_cand("z"), _cand("m")], "edgeslice") == "m"


@pytest.mark.parametrize("strategy", ["edgeslice", "amp4ec"])
def test_a_lone_replica_gets_the_request_whatever_it_looks_like(strategy: str) -> None:
    lone = _cand("lone", load=1.0, latency_s=5.0)
    assert pick_replica([lone], strategy) == "lone"


@pytest.mark.parametrize("strategy", ["edgeslice", "amp4ec"])
def test_no_replica_is_a_planning_error(strategy: str) -> None:
    with pytest.raises(PlanningError, match="no replica"):
        pick_replica([], strategy)


def test_amp4ec_strategy_is_the_papers_choice() -> None:
    cands = [
        _cand("a", in_flight=1, predicted_period_s=0.1),
        _cand("b", in_flight=0, predicted_period_s=1.0),
    ]
    assert pick_replica(cands, "amp4ec") == choose(cands).agent_id == "b"
    assert pick_replica(cands, "edgeslice") == "a"  # 2 x 0.1 < 1 x 1.0
