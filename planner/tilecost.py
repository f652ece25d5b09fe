"""Owns how much slower per FLOP a tile program runs than its whole segment, measured here.

FLOPs (even timed, calibration-equivalent ones) price a tile at its share of the block: a
quarter of the rows costs a quarter. It does not: a tile of a 7x7x512 convolution computes
a 4x4 output from a 6x6 input, where the kernels run far below their rate on a 56x56 plane,
and every op of the program is dispatched once per tile whatever its size. So the planner
times, on this machine with one thread like :mod:`planner.timing`, each segment whole and
its first tile under each strategy that can split it over ``k`` equal devices (fastest of
``repeats`` runs of the exported-like tile program of :func:`planner.tiling.tile_module`),
and calls ``tile time / (whole time x the tile's share of the segment's FLOPs)`` the
segment's *tile factor* for that strategy. :class:`planner.tiling.ProfileBlocks` multiplies
a tile's share of a block's cost by its block's factor (the segments' factors weighted by
their cost). Measured once per (profile, k) and kept on the traced graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from edgeslice.broker.protocol.boxes import crop, full_box, volume
from edgeslice.planner.profile import ModelProfile

Factors = dict[tuple[int, str], float]  # (segment, strategy) -> tile factor


def _fastest(fn: Callable[[Tensor], Any], x: Tensor, repeats: int) -> float:
    fn(x)  # warm caches and kernels up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def tile_factors(
    profile: ModelProfile,
    inputs: tuple[Tensor, ...],
    k: int,
    strategies: Sequence[str],
    repeats: int = 3,
) -> Factors:
    """Per (segment, strategy) its tile factor for ``k`` equal tiles (module docstring);
    segments a strategy cannot split, or whose tensors are too small, have none."""
    from edgeslice.planner.tiling import (
        boundary_nodes,
        input_box,
        tile_boxes,
        tile_flops,
        tile_module,
        tileable,
    )
    from edgeslice.planner.tracing import reference_run

    cache: dict[Any, Factors] = profile.graph.cache.setdefault("tilecost", {})
    key = (k, tuple(strategies), repeats)
    if key in cache:
        return cache[key]
    n = len(profile.segments)
    cuts = [b for b in range(n + 1) if len(profile.crossing(b)) == 1]
    nodes = {b: boundary_nodes(profile, b)[0] for b in cuts}
    graph = profile.graph
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    factors: Factors = {}
    try:
        with torch.inference_mode():
            values = dict(zip(graph.placeholders, inputs, strict=True))
            values.update(
                reference_run(graph, inputs, keep=set(nodes.values()), count_flops=False).values
            )
            for seg in range(n):
                if seg not in nodes or seg + 1 not in nodes:
                    continue
                wanted = [s for s in strategies if s in tileable(profile, seg, seg + 1)]
                if not wanted:
                    continue
                src, dst = values[nodes[seg]], values[nodes[seg + 1]]
                whole_box = full_box(dst.shape)
                whole = _fastest(tile_module(profile, seg, seg + 1, whole_box), src, repeats)
                flops = tile_flops(profile, seg, seg + 1, whole_box)
                for strategy in wanted:
                    try:
                        box = tile_boxes(dst.shape, strategy, [1.0] * k)[0]
                    except ValueError:  # fewer rows (channels) than tiles
                        continue
                    x = crop(src, full_box(src.shape), input_box(profile, seg, seg + 1, box))
                    tile = _fastest(
                        tile_module(profile, seg, seg + 1, box), x.contiguous(), repeats
                    )
                    share = (
                        tile_flops(profile, seg, seg + 1, box) / flops
                        if flops > 0
                        else volume(box) / volume(whole_box)
                    )
                    factors[(seg, strategy)] = tile / max(whole * share, 1e-9)
    finally:
        torch.set_num_threads(previous)
    cache[key] = factors
    return factors


def block_factor(
    factors: Factors, costs: Sequence[float], start: int, end: int, strategy: str
) -> float:
    """The factor of a block ``[start, end)``: its segments' factors weighted by their cost
    ``costs`` (a segment with none measured counts as 1)."""
    total = sum(costs[start:end])
    if total <= 0:
        return 1.0
    weighted = sum(factors.get((s, strategy), 1.0) * costs[s] for s in range(start, end))
    return weighted / total


def strategy_of(box: tuple[tuple[int, int], ...], shape: Sequence[int]) -> str:
    """The split a tile box of a tensor of ``shape`` (batch first) comes from."""
    cut = {d for d, (r, full) in enumerate(zip(box, full_box(shape), strict=True)) if r != full}
    return {frozenset({0}): "outc", frozenset({1}): "inh", frozenset({2}): "inw"}.get(
        frozenset(cut), "grid"
    )
