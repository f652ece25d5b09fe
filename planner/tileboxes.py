"""Owns how a block's output is cut into tile boxes: one box per device, sized by its share.

Torch-free (the DP of :mod:`planner.intradp` and the data plane use it without a model);
:mod:`planner.tiling` re-exports it. ``outc`` cuts channels (features of a 2-D output),
``inh`` rows, ``inw`` columns; ``grid`` cuts rows into bands, one per row of tiles, each
band weighted by the shares of its tiles and cut into columns by them, so every tile's
area follows its own share even when the shares are uneven.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgeslice.broker.protocol.boxes import Box, full_box, split_range

STRATEGIES = ("outc", "inh", "inw", "grid")
_SPLIT_DIM = {"outc": 0, "inh": 1, "inw": 2}  # box dimension (batch excluded)


def grid_shape(k: int, height: int, width: int) -> tuple[int, int]:
    """Near-square ``rows × cols = k``; the larger factor goes along the longer side."""
    small = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    big = k // small
    return (big, small) if height > width else (small, big)


def tile_boxes(out_shape: Sequence[int], strategy: str, shares: Sequence[float]) -> list[Box]:
    """One output box per share (same order), covering ``out_shape`` without overlap.

    Raises ``ValueError`` when the split dimension is shorter than the number of tiles.
    """
    whole = full_box(out_shape)
    if strategy in _SPLIT_DIM:
        dim = _SPLIT_DIM[strategy]
        if dim >= len(whole):
            raise ValueError(f"strategy {strategy!r} needs a 4-D output, got {tuple(out_shape)}")
        lo, hi = whole[dim]
        return [(*whole[:dim], part, *whole[dim + 1 :]) for part in split_range(lo, hi, shares)]
    if strategy != "grid":
        raise ValueError(f"unknown tiling strategy {strategy!r}; use one of {STRATEGIES}")
    if len(whole) != 3:
        raise ValueError(f"strategy 'grid' needs a 4-D output, got {tuple(out_shape)}")
    channels, (_, height), (_, width) = whole
    rows, cols = grid_shape(len(shares), height, width)
    row_shares = [shares[r * cols : (r + 1) * cols] for r in range(rows)]
    bands = split_range(0, height, [sum(g) for g in row_shares])
    boxes: list[Box] = []
    for band, group in zip(bands, row_shares, strict=True):
        boxes += [(channels, band, part) for part in split_range(0, width, group)]
    return boxes
