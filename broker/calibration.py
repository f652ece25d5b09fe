"""The shared GFLOP/s calibration kernel: agents report it, the planner prices time with it.

Agents publish the rate this kernel reaches on their device; the planner times each model
segment on its own machine and converts the time into "calibration-equivalent FLOPs" with
the same kernel, so a segment that runs slowly per FLOP (depthwise convolutions, attention
softmax, many small ops) costs accordingly on every device. One kernel for both sides is
what keeps the two sides' numbers comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def _timed_rate(
    step: Callable[[], None], flops_per_step: float, seconds: float
) -> tuple[float, float]:
    """Run ``step`` for about ``seconds``; returns (flops done, time taken)."""
    step()  # warm-up: first call allocates and picks kernels
    count, start = 0, time.perf_counter()
    while True:
        step()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * flops_per_step, elapsed


def measure_gflops(seconds: float = 0.5, threads: int | None = None) -> float:
    """Effective fp32 GFLOP/s over half matmul, half 3×3 convolution (a CNN-like mix)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(256, 256, generator=gen)
        b = torch.randn(256, 256, generator=gen)
        image = torch.randn(1, 64, 28, 28, generator=gen)
        weight = torch.randn(64, 64, 3, 3, generator=gen)

        def matmul() -> None:
            torch.mm(a, b)

        def conv() -> None:
            torch.nn.functional.conv2d(image, weight, padding=1)

        with torch.inference_mode():
            mm_flops, mm_time = _timed_rate(matmul, 2.0 * 256**3, seconds / 2)
            conv_flops, conv_time = _timed_rate(conv, 2.0 * 64 * 64 * 9 * 28 * 28, seconds / 2)
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    return (mm_flops + conv_flops) / (mm_time + conv_time) / 1e9
