"""Boxes: rectangular regions of an activation, for intra-layer (tiled) execution.

A *box* is one half-open ``(lo, hi)`` range per non-batch dimension of a tensor, in the
coordinates of the whole activation: ``((c0, c1), (h0, h1), (w0, w1))`` for an NCHW
feature map, ``((f0, f1),)`` for a ``(N, F)`` linear output. The batch dimension is never
split and never part of a box. A tile of a tiled stage computes one output box from one
input box; its neighbours' outputs arrive as *pieces* (box + tensor) that the receiver
assembles into its input box. The planner, the agents and the client all use these
functions, so they live here, beside the wire format, and need only torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Box = tuple[tuple[int, int], ...]


def full_box(shape: Sequence[int]) -> Box:
    """The box of a whole activation of ``shape`` (batch dimension first, excluded)."""
    return tuple((0, int(n)) for n in shape[1:])


def box_from_wire(value: Sequence[Sequence[int]]) -> Box:
    """A box from its msgpack form (a list of 2-lists); raises ``ValueError`` when malformed."""
    box = tuple((int(lo), int(hi)) for lo, hi in value)
    if not box or any(lo < 0 or hi <= lo for lo, hi in box):
        raise ValueError(f"malformed box {value!r}: want [[lo, hi], ...] with 0 <= lo < hi")
    return box


def box_to_wire(box: Box) -> list[list[int]]:
    return [[lo, hi] for lo, hi in box]


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def volume(box: Box) -> int:
    n = 1
    for lo, hi in box:
        n *= hi - lo
    return n


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes of the same rank, or None when they do not overlap."""
    if len(a) != len(b):
        raise ValueError(f"boxes of different rank: {a} and {b}")
    out = tuple((max(alo, blo), min(ahi, bhi)) for (alo, ahi), (blo, bhi) in zip(a, b, strict=True))
    return out if all(lo < hi for lo, hi in out) else None


def contains(outer: Box, inner: Box) -> bool:
    return len(outer) == len(inner) and all(
        olo <= ilo and ihi <= ohi for (olo, ohi), (ilo, ihi) in zip(outer, inner, strict=True)
    )


def crop(tensor: torch.Tensor, have: Box, want: Box) -> torch.Tensor:
    """The part ``want`` of ``tensor``, which holds region ``have`` (batch dimension first)."""
    if not contains(have, want):
        raise ValueError(f"box {want} is not inside the tensor's box {have}")
    pairs = zip(have, want, strict=True)
    index = [slice(None)] + [slice(wlo - hlo, whi - hlo) for (hlo, _), (wlo, whi) in pairs]
    return tensor[tuple(index)]


def assemble(pieces: Iterable[tuple[Box, torch.Tensor]], box: Box) -> torch.Tensor:
    """One tensor for ``box`` from pieces that cover it (overlaps: the later piece wins).

    Raises ``ValueError`` when the pieces leave part of ``box`` uncovered: a receiver calls
    this only once :func:`covers` says the pieces are complete.
    """
    pieces = list(pieces)
    if not pieces:
        raise ValueError(f"no pieces to assemble box {box}")
    if not covers([b for b, _ in pieces], box):
        raise ValueError(f"pieces {[b for b, _ in pieces]} do not cover box {box}")
    first = pieces[0][1]
    if len(pieces) == 1 and pieces[0][0] == box:
        return first
    import torch

    out = torch.empty((first.shape[0], *box_shape(box)), dtype=first.dtype)
    for piece_box, tensor in pieces:
        common = intersect(piece_box, box)
        if common is None:
            continue
        dst = [slice(None)] + [
            slice(lo - blo, hi - blo) for (blo, _), (lo, hi) in zip(box, common, strict=True)
        ]
        out[tuple(dst)] = crop(tensor, piece_box, common)
    return out


def covers(boxes: Sequence[Box], box: Box) -> bool:
    """True when the union of ``boxes`` covers ``box`` (exact, by coordinate compression)."""
    parts = [c for c in (intersect(b, box) for b in boxes) if c is not None]
    if not parts:
        return False
    # cut every dimension at all piece edges; each elementary cell must lie in some part
    edges = [
        sorted({lo, hi, *(p[d][0] for p in parts), *(p[d][1] for p in parts)})
        for d, (lo, hi) in enumerate(box)
    ]
    cells: list[Box] = [()]
    for cuts in edges:
        cells = [(*c, (a, b)) for c in cells for a, b in itertools.pairwise(cuts)]
    return all(any(contains(p, cell) for p in parts) for cell in cells)


def split_range(lo: int, hi: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """Cut ``[lo, hi)`` into ``len(shares)`` contiguous non-empty ranges sized by ``shares``.

    Sizes follow the shares by largest remainder over the whole length (16 at 1:3 gives
    4 and 12); a part the shares would leave empty gets one element, taken from the
    largest parts. ``hi - lo`` must be at least ``len(shares)``; shares must be positive.
    """
    n = hi - lo
    k = len(shares)
    if k == 0 or n < k:
        raise ValueError(f"cannot cut a range of {n} into {k} non-empty parts")
    if any(s <= 0 for s in shares):
        raise ValueError(f"shares must be positive, got {list(shares)}")
    total = float(sum(shares))
    exact = [n * s / total for s in shares]
    sizes = [int(e) for e in exact]
    for i in sorted(range(k), key=lambda i: (int(exact[i]) - exact[i], i))[: n - sum(sizes)]:
        sizes[i] += 1
    for i in range(k):
        if sizes[i] == 0:  # no part empty: one element from the largest part
            sizes[max(range(k), key=lambda j: (sizes[j], -j))] -= 1
            sizes[i] = 1
    out = []
    start = lo
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out
