"""Per-request replica choice: rate-aware for edgeslice plans, AMP4EC's score for amp4ec."""

from __future__ import annotations

from collections import Counter

from edgeslice.broker.protocol.messages import PlanMessage, PlanStage
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient


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


def _dispatch(strategy: str, requests: int) -> Counter[str]:
    client = InferenceClient(parse_broker_url("mqtt://127.0.0.1:1"), "m")
    plan = _plan(strategy)
    counts: Counter[str] = Counter()
    for _ in range(requests):  # all stay in flight: the choice sees every earlier one
        (agent,) = client.choose_route(plan)
        client.agents[agent].in_flight += 1
        counts[agent] += 1
    return counts


def test_edgeslice_plans_send_work_in_proportion_to_replica_speed() -> None:
    counts = _dispatch("edgeslice", 22)
    # (n + 1) x 0.1 s vs (m + 1) x 1.0 s: ten to one, as the replicas' rates
    assert counts == {"fast": 20, "slow": 2}


def test_amp4ec_plans_keep_the_papers_balanced_scoring() -> None:
    counts = _dispatch("amp4ec", 22)
    assert counts == {"fast": 11, "slow": 11}  # the balance term dominates the score
