"""Segment timing: measured, calibration-equivalent costs replace raw FLOP counts."""

from __future__ import annotations

import torch
from torch import nn

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
