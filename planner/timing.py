"""Times each model segment on the planner's machine, in calibration-equivalent FLOPs.

FLOPs alone mis-price models: a depthwise convolution or a softmax runs several times
slower per FLOP than the matmul/convolution kernel devices calibrate with, so a plan
built on raw FLOPs under-predicts compute (by about 2x for MobileNetV2). FlexPie learns
per-operator cost estimators offline; we measure instead: run the traced graph a few
times here with one thread, take each node's fastest time, sum per segment, and
convert seconds into the FLOPs the shared calibration kernel (:mod:`broker.calibration`)
would do in that time on this machine. A device's predicted time for a segment is then
those equivalent FLOPs over the device's own calibrated rate, the same kernel on both
sides. Per-node timing goes through the same Python-level dispatch agents use to run an
exported stage, so its overhead is priced too.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import Tensor, fx

from edgeslice.broker.calibration import measure_gflops
from edgeslice.planner.costmodel import ModelCost
from edgeslice.planner.profile import ModelProfile


class _Timed(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seconds: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        start = time.perf_counter()
        out = super().run_node(n)
        elapsed = time.perf_counter() - start
        best = self.seconds.get(n)
        self.seconds[n] = elapsed if best is None else min(best, elapsed)
        return out


def node_seconds(
    profile: ModelProfile, inputs: tuple[Tensor, ...], repeats: int = 3, threads: int = 1
) -> dict[str, float]:
    """Fastest-of-``repeats`` seconds per graph node (by name) on this machine."""
    seconds = _node_times(profile, inputs, repeats, threads)
    return {node.name: t for node, t in seconds.items()}


def _node_times(
    profile: ModelProfile, inputs: tuple[Tensor, ...], repeats: int, threads: int
) -> dict[fx.Node, float]:
    graph = profile.graph
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timed = _Timed(graph.module)
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first run warms caches and kernels up
                timed.run(*inputs, enable_io_processing=False)
    finally:
        torch.set_num_threads(previous)
    return timed.seconds


def segment_seconds(
    profile: ModelProfile, inputs: tuple[Tensor, ...], repeats: int = 3, threads: int = 1
) -> list[float]:
    """Fastest-of-``repeats`` seconds per segment on this machine with ``threads`` threads."""
    seconds = _node_times(profile, inputs, repeats, threads)
    order = profile.graph.order
    return [
        sum(seconds.get(order[i], 0.0) for i in range(s.first, s.last + 1))
        for s in profile.segments
    ]


def timed_cost(
    profile: ModelProfile,
    inputs: tuple[Tensor, ...],
    repeats: int = 3,
    calibrate_seconds: float = 0.5,
) -> tuple[ModelCost, float]:
    """The profile's cost with each segment's FLOPs replaced by its measured, calibration-
    equivalent FLOPs; also returns this machine's one-thread calibration GFLOP/s."""
    seconds = segment_seconds(profile, inputs, repeats)
    reference = measure_gflops(calibrate_seconds, threads=1)
    cost = profile.to_cost()
    segments = tuple(
        dataclasses.replace(seg, flops=max(t, 1e-7) * reference * 1e9)
        for seg, t in zip(cost.segments, seconds, strict=True)
    )
    return dataclasses.replace(cost, segments=segments), reference
