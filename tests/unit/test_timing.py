"""Segment timing: measured, calibration-equivalent costs replace raw FLOP counts."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from edgeslice.planner.costmodel import CostParams, fit_correction
from edgeslice.planner.profile import profile_model
from edgeslice.planner.timing import segment_seconds, timed_cost


class _Mixed(nn.Module):
    """A dense layer (counted FLOPs) then elementwise work FlopCounterMode counts as zero."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        for _ in range(6):
            y = torch.sin(y) * 1.0001
            y = y.clone()
        return y


def test_timed_cost_keeps_the_profile_shape_and_prices_uncounted_work() -> None:
    torch.manual_seed(0)
    model, inputs = _Mixed().eval(), (torch.randn(64, 256),)
    profile = profile_model(model, inputs, name="mixed")
    cost, reference = timed_cost(profile, inputs, repeats=2, calibrate_seconds=0.1)
    raw = profile.to_cost()
    assert reference > 0
    assert len(cost.segments) == len(raw.segments)
    for timed, counted in zip(cost.segments, raw.segments, strict=True):
        assert timed.param_bytes == counted.param_bytes
        assert timed.out_bytes == counted.out_bytes
        assert timed.flops > 0  # every segment takes time, counted FLOPs or not
    assert sum(segment_seconds(profile, inputs, repeats=1)) > 0


# Stage compute times (s) recorded on this 2-core host under load from other jobs, two
# emulated rpi4-4gb agents (paced emulation) serving mobilenetv2 from a planner with
# --objective throughput: an even split over both (even-split strategy, two stages) and
# the planner's own plan (one stage, two replicas). Per request, in completion order;
# ``predicted`` is the uncorrected prediction the planner published.
RECORDED = {
    ("even-split", 0, 24, "rpi4-4gb-1"): (0.10917, [
        0.1622, 0.1661, 0.1284, 0.1738, 0.1756, 0.2048, 0.1597, 0.1314, 0.1282, 0.1227,
        0.1774, 0.1778, 0.1173, 0.2142, 0.2006, 0.2073, 0.1233, 0.1302, 0.2444, 0.1753,
        0.1449, 0.1665, 0.4197, 0.3066, 0.2246, 0.2984, 0.1694, 0.1559, 0.1413, 0.1422,
        0.1372, 0.1667, 0.1275, 0.1359, 0.1387, 0.1373, 0.1447, 0.1309, 0.1379, 0.1335,
    ]),
    ("even-split", 24, 48, "rpi4-4gb-2"): (0.1051, [
        0.0937, 0.0852, 0.0867, 0.085, 0.0908, 0.0848, 0.085, 0.0985, 0.0981, 0.0889,
        0.1017, 0.0827, 0.1064, 0.0913, 0.1134, 0.0872, 0.0884, 0.0882, 0.0884, 0.098,
        0.0959, 0.1035, 0.1115, 0.0985, 0.0988, 0.096, 0.0899, 0.0959, 0.0957, 0.0853,
        0.0995, 0.0917, 0.0926, 0.092, 0.0928, 0.1104, 0.0889, 0.0942, 0.0851, 0.0865,
    ]),
    ("replicas", 0, 48, "rpi4-4gb-1"): (0.16541, [
        0.3033, 0.156, 0.1579, 0.1577, 0.1571, 0.1728, 0.1567, 0.1573, 0.1555, 0.1548,
        0.1538, 0.1647, 0.1557, 0.157, 0.1592, 0.1607, 0.1543, 0.1562, 0.1737,
    ]),
    ("replicas", 0, 48, "rpi4-4gb-2"): (0.16541, [
        0.1501, 0.1519, 0.1519, 0.167, 0.1499, 0.1556, 0.1946, 0.158, 0.1545, 0.1551,
        0.1538, 0.1554, 0.1506, 0.1512, 0.1545, 0.1512, 0.1528, 0.1549, 0.1684, 0.1635,
        0.1699,
    ]),
}  # fmt: skip


def test_fitted_correction_predicts_later_stage_times_within_10_percent() -> None:
    # Fit on each stage's first half of requests, predict the second half's median: what
    # the planner's next plan would publish for the same (agent, segment range).
    min_compute = CostParams().min_compute_s
    for run in ("even-split", "replicas"):
        series = {k: v for k, v in RECORDED.items() if k[0] == run}
        samples = [
            (agent, predicted, t, 1)
            for (_, _, _, agent), (predicted, times) in series.items()
            for t in times[: len(times) // 2]
        ]
        correction = fit_correction(samples)
        for (_, start, end, agent), (predicted, times) in series.items():
            later = statistics.median(times[len(times) // 2 :])
            corrected = (predicted - min_compute) * correction[agent] + min_compute
            error = abs(corrected / later - 1)
            assert error < 0.10, (run, start, end, agent, error)
            assert error <= abs(predicted / later - 1)  # and never worse than uncorrected
