"""fleetbench.breakdown: predictions are checked replica by replica, at one request in flight."""

from __future__ import annotations

from edgeslice.benchmarks.fleetbench import breakdown
from edgeslice.broker.protocol.messages import PlanMessage, PlanStage
from edgeslice.client.requests import InferenceResult


def _result(*timings: tuple[str, float, int]) -> InferenceResult:
    return InferenceResult(
        request_id="r",
        outputs=[],
        latency_s=0.1,
        timings=[
            {"stage": 0, "agent": a, "compute_s": c, "batch": b, "queue_s": 0.0, "recv_s": 0.0}
            for a, c, b in timings
        ],
        route=["fast", "slow"],
        plan_version=1,
    )


def _plan() -> PlanMessage:
    stage = PlanStage(stage=0, start_segment=0, end_segment=3, agents=["fast", "slow"])
    stage = PlanStage(**{**stage.__dict__, "predicted_compute_s": 0.010})
    return PlanMessage(
        model="m", plan_id="p", plan_version=1, objective="throughput", strategy="x", stages=[stage]
    )


def test_replicas_on_unlike_devices_are_not_mixed_into_one_median() -> None:
    # the primary ("fast", predicted 10 ms) measured 10 ms; its slow replica took 30 ms
    single = [_result(("fast", 0.010, 1)), _result(("slow", 0.030, 1)), _result(("fast", 0.010, 1))]
    saturated = [_result(("fast", 0.040, 4)), _result(("slow", 0.090, 3))]
    (row,) = breakdown(_plan(), single, saturated)
    assert row["measured_compute_s"] == 0.010
    assert row["prediction_error_pct"] == 0.0
    assert row["replicas"]["slow"]["measured_compute_s"] == 0.030
    assert row["replicas"]["fast"]["saturated_compute_s"] == 0.040


def test_no_error_figure_without_a_batch_one_run_on_the_primary() -> None:
    (row,) = breakdown(_plan(), [], [_result(("fast", 0.040, 4))])
    assert "prediction_error_pct" not in row
    assert row["replicas"]["fast"]["saturated_compute_s"] == 0.040
