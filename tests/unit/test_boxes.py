"""broker.protocol.boxes: the region arithmetic tiles, agents and the client share."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from edgeslice.broker.protocol.boxes import (
    assemble,
    box_from_wire,
    box_to_wire,
    covers,
    crop,
    full_box,
    intersect,
    split_range,
)


@given(
    n=st.integers(1, 300),
    shares=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8),
)
def test_split_range_partitions_and_follows_the_shares(n: int, shares: list[float]) -> None:
    if n < len(shares):
        with pytest.raises(ValueError):
            split_range(0, n, shares)
        return
    parts = split_range(3, 3 + n, shares)
    assert parts[0][0] == 3 and parts[-1][1] == 3 + n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    sizes = [hi - lo for lo, hi in parts]
    assert min(sizes) >= 1
    total = sum(shares)
    # largest remainder: each part within one element of its exact share, unless it had to
    # give one to a part the shares would have left empty
    empties = sum(1 for s in shares if n * s / total < 1)
    for size, s in zip(sizes, shares, strict=True):
        assert abs(size - n * s / total) < 1 + empties


def test_split_range_uses_the_whole_length_for_the_shares() -> None:
    assert split_range(0, 16, [1, 3]) == [(0, 4), (4, 16)]
    assert split_range(0, 4, [100, 1, 1, 1]) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_pieces_with_overlapping_halos_assemble_into_the_whole() -> None:
    x = torch.randn(2, 5, 7, 9)
    whole = full_box(x.shape)
    pieces = []
    for lo, hi in split_range(0, 7, [1, 2, 1]):
        box = ((0, 5), (max(0, lo - 1), min(7, hi + 1)), (0, 9))
        pieces.append((box, crop(x, whole, box)))
    assert covers([b for b, _ in pieces], whole)
    assert torch.equal(assemble(pieces, whole), x)
    inner = ((1, 4), (2, 6), (3, 8))
    assert torch.equal(assemble(pieces, inner), x[:, 1:4, 2:6, 3:8])


def test_a_gap_is_not_covered_and_not_assembled() -> None:
    x = torch.randn(1, 4, 6)
    whole = full_box(x.shape)
    halves = [((0, 4), (0, 3)), ((0, 4), (4, 6))]  # row 3 missing
    assert not covers(halves, whole)
    with pytest.raises(ValueError, match="do not cover"):
        assemble([(b, crop(x, whole, b)) for b in halves], whole)


def test_intersect_and_wire_round_trip() -> None:
    assert intersect(((0, 4), (2, 6)), ((3, 8), (0, 3))) == ((3, 4), (2, 3))
    assert intersect(((0, 4),), ((4, 8),)) is None
    box = ((0, 3), (5, 9))
    assert box_from_wire(box_to_wire(box)) == box
    for bad in ([], [[2, 2]], [[-1, 3]], [[0]]):
        with pytest.raises((ValueError, TypeError)):
            box_from_wire(bad)
    with pytest.raises(ValueError, match="not inside"):
        crop(torch.zeros(1, 4), ((0, 4),), ((2, 6),))
