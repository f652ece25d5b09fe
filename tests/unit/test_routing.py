"""client.routing.Router: what the client learns from results steers the next requests."""

from __future__ import annotations

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol.messages import PlanMessage, PlanStage, StageTiming
from edgeslice.broker.protocol.topics import Topics
from edgeslice.client.routing import Router
from edgeslice.client.scoring import Weights


def _plan() -> PlanMessage:
    stage = PlanStage(
        stage=0,
        start_segment=0,
        end_segment=4,
        agents=["fast", "slow"],
        replica_period_s=[0.08, 0.20],
    )
    return PlanMessage(
        model="m",
        plan_id="p",
        plan_version=1,
        objective="latency",
        strategy="edgeslice",
        stages=[stage],
    )


def test_a_batched_run_counts_per_request_so_the_fast_replica_is_not_abandoned() -> None:
    router = Router(FleetState(Topics("t")), Weights())
    # a burst: the fast replica ran 4 requests as one batch (0.24 s for all four, 0.06 s
    # each); the slow one ran one alone in 0.20 s
    router.learn([StageTiming(stage=0, agent="fast", compute_s=0.24, batch=4)])
    router.learn([StageTiming(stage=0, agent="slow", compute_s=0.20, batch=1)])
    # one request at a time afterwards: the fast replica is the one to finish first
    assert router.choose_route(_plan()) == ["fast"]


def test_unbatched_times_are_compared_as_measured() -> None:
    router = Router(FleetState(Topics("t")), Weights())
    router.learn([StageTiming(stage=0, agent="fast", compute_s=0.30, batch=1)])  # a slow spell
    router.learn([StageTiming(stage=0, agent="slow", compute_s=0.20, batch=1)])
    assert router.choose_route(_plan()) == ["slow"]
