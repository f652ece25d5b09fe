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

Batching: for a model that takes a dynamic batch (planner/batchdim.py), the graph traced
at batch ``B`` (:data:`GAIN_BATCH`, the agents' default ``--max-batch`` and the cap) is
timed the same way and each segment's gain ``B * t1 / tB`` recorded
(``Segment.batch_gain``, priced by planner/batchcost.py). It costs one more export and
``repeats + 1`` runs at batch ``B``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx

from edgeslice.broker.calibration import measure_gflops
from edgeslice.planner.batchcost import gains_from_times
from edgeslice.planner.costmodel import ModelCost
from edgeslice.planner.profile import ModelProfile
from edgeslice.planner.tracing import TracedGraph

log = logging.getLogger(__name__)

GAIN_BATCH = 8  # the batch segments are timed at for their gain (agents' default max batch)


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
    profile: ModelProfile | TracedGraph, inputs: tuple[Tensor, ...], repeats: int, threads: int
) -> dict[fx.Node, float]:
    graph = profile.graph if isinstance(profile, ModelProfile) else profile
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
    return _per_segment(profile, profile.graph.order, seconds)


def _per_segment(
    profile: ModelProfile, order: Sequence[fx.Node], seconds: dict[fx.Node, float]
) -> list[float]:
    return [
        sum(seconds.get(order[i], 0.0) for i in range(s.first, s.last + 1))
        for s in profile.segments
    ]


def batched_segment_seconds(
    module: torch.nn.Module,
    profile: ModelProfile,
    inputs: tuple[Tensor, ...],
    batch: int = GAIN_BATCH,
    repeats: int = 2,
) -> list[float] | None:
    """Fastest-of-``repeats`` seconds per segment for ``batch`` inputs at once (one thread),
    or None when the model cannot run batched (planner/batchdim.py says why, logged)."""
    from edgeslice.planner.batchdim import batch_literals, batch_of
    from edgeslice.planner.tracing import trace

    literals, why_not = batch_literals(module, inputs, profile.graph)
    if literals is None:
        log.info(
            "planner model=%s not batchable (%s): batch gains not measured", profile.name, why_not
        )
        return None
    big = tuple(batch_of(inputs, batch))
    try:
        twin = trace(module, big)
    except Exception as exc:
        log.info("planner model=%s does not trace at batch %d: %s", profile.name, batch, exc)
        return None
    order = profile.graph.order
    if len(twin.order) != len(order) or any(
        a.target != b.target for a, b in zip(order, twin.order, strict=True)
    ):
        log.info("planner model=%s: its graph changes at batch %d", profile.name, batch)
        return None
    try:
        seconds = _node_times(twin, big, repeats, 1)
    except Exception as exc:  # e.g. out of memory at batch B: plan without gains
        log.warning("planner model=%s fails at batch %d: %s", profile.name, batch, exc)
        return None
    return _per_segment(profile, twin.order, seconds)


def timed_cost(
    profile: ModelProfile,
    inputs: tuple[Tensor, ...],
    repeats: int = 3,
    calibrate_seconds: float = 0.5,
    module: torch.nn.Module | None = None,
    batch: int = GAIN_BATCH,
) -> tuple[ModelCost, float]:
    """The profile's cost with each segment's FLOPs replaced by its measured, calibration-
    equivalent FLOPs; also returns this machine's one-thread calibration GFLOP/s.

    With ``module`` (the model the profile traced) and ``batch`` > 1, each segment's
    batch gain is measured too (module docstring); without, gains stay 1."""
    seconds = segment_seconds(profile, inputs, repeats)
    reference = measure_gflops(calibrate_seconds, threads=1)
    cost = profile.to_cost()
    gains = [1.0] * len(seconds)
    started = time.perf_counter()
    batched = (
        batched_segment_seconds(module, profile, inputs, batch)
        if module is not None and batch > 1
        else None
    )
    if batched is not None:
        gains = gains_from_times(seconds, batched, batch)
        cost = dataclasses.replace(cost, batch_size=batch)
        log.info(
            "planner model=%s batch gains at %d measured in %.1fs: whole model x%.2f",
            profile.name,
            batch,
            time.perf_counter() - started,
            batch * sum(seconds) / max(sum(batched), 1e-9),
        )
    segments = tuple(
        dataclasses.replace(seg, flops=max(t, 1e-7) * reference * 1e9, batch_gain=g)
        for seg, t, g in zip(cost.segments, seconds, gains, strict=True)
    )
    return dataclasses.replace(cost, segments=segments), reference
