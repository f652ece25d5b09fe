"""Owns building and timing one :class:`~broker.layerspec.LayerSpec` with torch.

An agent times sweep layers on its own execution path (agent/sweep.py passes its pacer's
``run`` as ``runner``, so an emulated board is timed as the board); ``edgeslice calibrate``
times the same layers on its own host, unpaced, for the planner's timed baseline. Both
call the same functional ops the traced ATen graph runs (``aten.conv2d`` is
``F.conv2d``, ...), with seeded random weights.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeslice.broker.layerspec import LayerSpec

Runner = Callable[..., Any]  # runner(fn, *args) -> fn(*args), e.g. Pacer.run


def build(spec: LayerSpec, seed: int = 0) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
    """(function, its inputs) computing ``spec`` once at batch 1."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    s = spec
    image = rand(1, s.cin, s.h, s.w)
    if s.op == "conv2d":
        weight = rand(s.cout, s.cin // s.groups, s.k, s.k)
        bias = rand(s.cout)

        def conv(x: Tensor, wt: Tensor, b: Tensor) -> Tensor:
            return F.conv2d(x, wt, b, s.stride, s.padding, 1, s.groups)

        return conv, (image, weight, bias)
    if s.op == "linear":
        return F.linear, (rand(1, s.h * s.w, s.cin), rand(s.cout, s.cin), rand(s.cout))
    if s.op == "maxpool2d":
        return lambda x: F.max_pool2d(x, s.k, s.stride, s.padding), (image,)
    if s.op == "avgpool2d":
        return lambda x: F.avg_pool2d(x, s.k, s.stride, s.padding), (image,)
    if s.op == "gavgpool":
        return lambda x: F.adaptive_avg_pool2d(x, 1), (image,)
    if s.op == "batchnorm":
        stats = (rand(s.cin), rand(s.cin).abs() + 0.5, rand(s.cin), rand(s.cin))

        def bn(x: Tensor, mean: Tensor, var: Tensor, wt: Tensor, b: Tensor) -> Tensor:
            return F.batch_norm(x, mean, var, wt, b, False, 0.1, 1e-5)

        return bn, (image, *stats)
    rows = rand(1, s.h * s.w, s.cin)  # transformer-shaped for layernorm; any for elementwise
    if s.op == "layernorm":
        return lambda x, wt, b: F.layer_norm(x, (s.cin,), wt, b), (rows, rand(s.cin), rand(s.cin))
    if s.op == "relu":
        return F.relu, (image,)
    if s.op == "hardtanh":
        return lambda x: F.hardtanh(x, 0.0, 6.0), (image,)
    if s.op == "gelu":
        return F.gelu, (image,)
    if s.op == "add":
        return torch.add, (image, rand(1, s.cin, s.h, s.w))
    raise ValueError(f"no builder for layer op {s.op!r}")


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


MIN_RUN_S = 0.0005  # host time one timed run should last at least (tiny layers loop)
MAX_INNER = 64


def inner_count(warm_s: float, min_run_s: float = MIN_RUN_S) -> int:
    """How many back-to-back calls one timed run makes, from a warm-up call's host time.

    A tiny layer called once per run would be timed with the run's fixed costs (the
    timer, a pacer's hold and its sleep, which overshoots by tens of microseconds) that
    a layer inside a stage does not pay; so it runs several times in one run, as
    consecutive layers of a stage do, and its time is the run's over the count.
    """
    if warm_s <= 0:
        return MAX_INNER
    return max(1, min(MAX_INNER, math.ceil(min_run_s / warm_s)))


def time_layer(
    spec: LayerSpec, repeats: int = 3, runner: Runner | None = None, reduce: str = "median"
) -> float:
    """Seconds one call of ``spec`` takes through ``runner`` (default: directly): after an
    unmeasured warm-up at host speed, ``repeats`` timed runs of :func:`inner_count` calls
    each, the median (or ``"min"``) of their per-call time.

    Each run is timed around the whole ``runner`` call: for a pacer, that is the held
    (device) time, as a stage's ``compute_s`` is.
    """
    fn, args = build(spec)
    run = runner or _direct
    times = []
    with torch.inference_mode():
        start = time.perf_counter()
        fn(*args)  # warm-up: allocator, kernel choice
        fn(*args)
        count = inner_count((time.perf_counter() - start) / 2)

        def loop(*xs: Tensor) -> None:
            for _ in range(count):
                fn(*xs)

        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            run(loop, *args)
            times.append((time.perf_counter() - start) / count)
    return min(times) if reduce == "min" else statistics.median(times)
