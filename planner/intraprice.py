"""Owns the price of a tiled plan: its tiles, the bytes each receives, and its latency.

A plan cuts the model's segments into consecutive *blocks*; each block either runs whole
on one device (``pipeline``) or is split by a strategy of :mod:`planner.tiling` over all
devices, tile sizes proportional to device speed. Blocks run one after another for one
request, so a plan's latency is::

    sum over blocks of  max over the block's tiles of  compute(device, tile FLOPs)
                                                     + transfer(bytes received, device)

plus the client gathering the output. A tile receives the part of its input box that
other devices (or, for the first block, the client) hold in the previous block's layout;
what it holds itself is local and free (``transfer`` is not called for zero bytes). A
device holds the parameters of every block and tile it runs. :func:`evaluate` is the
reference definition; the DP of :mod:`planner.intradp` prices its steps with the same
:class:`Pricer`. Torch-free: the model comes in as a :class:`BlockCosts`
(:class:`planner.tiling.ProfileBlocks` for a profile), the costs as functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edgeslice.broker.protocol.boxes import Box, full_box, intersect, volume
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.tileboxes import STRATEGIES, tile_boxes

PIPELINE = "pipeline"  # a block run whole on one device
TILED = STRATEGIES
WHOLE: Box = ()  # the box of a pipeline block: all of its input and output

ComputeFn = Callable[[str, float], float]  # (device name, FLOPs) -> seconds
TransferFn = Callable[[int, "str | None"], float]  # (bytes, receiver; None: client) -> seconds


class BlockCosts(Protocol):
    """What the DP needs to know about a model; blocks are segments ``[start, end)``."""

    @property
    def n_segments(self) -> int: ...

    def tileable(self, start: int, end: int) -> frozenset[str]: ...

    def out_shape(self, boundary: int) -> tuple[int, ...] | None:
        """Shape (batch first) of the one tensor crossing ``boundary``; None if several."""
        ...

    def boundary_bytes(self, boundary: int) -> int: ...

    def input_box(self, start: int, end: int, out_box: Box) -> Box: ...

    def flops(self, start: int, end: int, out_box: Box) -> float:
        """FLOPs of the tile computing ``out_box`` (:data:`WHOLE`: the whole block)."""
        ...

    def param_bytes(self, start: int, end: int, out_box: Box) -> int: ...


@dataclass(frozen=True)
class TileDevice:
    """A device as the DP sees it: tile shares follow ``speed``; parameters must fit."""

    name: str
    speed: float
    memory_bytes: float = float("inf")


@dataclass(frozen=True)
class BlockChoice:
    """One block of a plan: ``strategy`` over all devices, or PIPELINE on ``device``."""

    start: int
    end: int
    strategy: str
    device: str | None = None


@dataclass(frozen=True)
class PlacedTile:
    device: str
    out_box: Box  # WHOLE for a pipeline block
    in_box: Box
    flops: float
    param_bytes: int
    recv_bytes: int  # from other devices (or the client); local pieces are free
    seconds: float  # compute + transfer


@dataclass(frozen=True)
class PlannedBlock:
    start: int
    end: int
    strategy: str
    tiles: tuple[PlacedTile, ...]
    seconds: float  # the slowest tile


@dataclass(frozen=True)
class IntraPlan:
    """A priced plan: blocks in order, latency, bytes each sender sends (None: client)."""

    blocks: tuple[PlannedBlock, ...]
    latency_s: float  # blocks plus the gather to the client
    gather_s: float
    sent_bytes: dict[str | None, int] = field(default_factory=dict)
    memory_bytes: dict[str, int] = field(default_factory=dict)
    exact: bool = True  # False when the search dropped labels (Constraints.max_labels)

    @property
    def choices(self) -> list[BlockChoice]:
        return [
            BlockChoice(
                b.start, b.end, b.strategy, b.tiles[0].device if b.strategy == PIPELINE else None
            )
            for b in self.blocks
        ]


Piece = tuple["str | None", Box]  # holder (None: client) and box (WHOLE: everything)


class Pricer:
    """Tiles, received bytes and seconds of blocks; cached, shared by the DP and evaluate."""

    def __init__(
        self,
        model: BlockCosts,
        devices: Sequence[TileDevice],
        compute: ComputeFn,
        transfer: TransferFn,
    ) -> None:
        self.model, self.devices = model, list(devices)
        self.compute, self.transfer = compute, transfer
        self.shares = [d.speed for d in self.devices]
        self._tiles: dict[
            tuple[int, int, str, str | None], list[tuple[str, Box, Box, float, int]] | None
        ] = {}
        self._boxes: dict[tuple[int, str], list[Box] | None] = {}

    def out_boxes(self, boundary: int, strategy: str) -> list[Box] | None:
        """The tiled layout at ``boundary``, or None when the tensor is too small for it."""
        key = (boundary, strategy)
        if key not in self._boxes:
            shape = self.model.out_shape(boundary)
            try:
                self._boxes[key] = (
                    None if shape is None else tile_boxes(shape, strategy, self.shares)
                )
            except ValueError:
                self._boxes[key] = None
        return self._boxes[key]

    def layout(self, boundary: int, strategy: str, device: str | None) -> list[Piece]:
        if strategy == PIPELINE:
            return [(device, WHOLE)]
        boxes = self.out_boxes(boundary, strategy) or []
        return list(zip([d.name for d in self.devices], boxes, strict=True))

    def tiles(self, c: BlockChoice) -> list[tuple[str, Box, Box, float, int]] | None:
        """(device, out box, in box, FLOPs, param bytes) per tile; None if not possible."""
        key = (c.start, c.end, c.strategy, c.device)
        if key not in self._tiles:
            self._tiles[key] = self._make_tiles(c)
        return self._tiles[key]

    def _make_tiles(self, c: BlockChoice) -> list[tuple[str, Box, Box, float, int]] | None:
        m = self.model
        if c.strategy == PIPELINE:
            assert c.device is not None
            return [
                (
                    c.device,
                    WHOLE,
                    WHOLE,
                    m.flops(c.start, c.end, WHOLE),
                    m.param_bytes(c.start, c.end, WHOLE),
                )
            ]
        if c.strategy not in m.tileable(c.start, c.end):
            return None
        boxes = self.out_boxes(c.end, c.strategy)
        if boxes is None:
            return None
        return [
            (
                d.name,
                box,
                m.input_box(c.start, c.end, box),
                m.flops(c.start, c.end, box),
                m.param_bytes(c.start, c.end, box),
            )
            for d, box in zip(self.devices, boxes, strict=True)
        ]

    def piece_bytes(self, boundary: int, have: Box, need: Box) -> int:
        """Bytes of ``need`` (WHOLE: everything) found in piece ``have`` at ``boundary``."""
        total = self.model.boundary_bytes(boundary)
        if have == WHOLE and need == WHOLE:
            return total
        shape = self.model.out_shape(boundary)
        assert shape is not None, "a box on a boundary crossed by several tensors"
        per = total // max(1, volume(full_box(shape)))
        common = need if have == WHOLE else have if need == WHOLE else intersect(have, need)
        return 0 if common is None else volume(common) * per

    def received(
        self, boundary: int, pieces: Sequence[Piece], device: str, need: Box
    ) -> dict[str | None, int]:
        """Bytes ``device`` receives from each other holder to assemble ``need``."""
        out: dict[str | None, int] = {}
        for holder, have in pieces:
            if holder != device:
                n = self.piece_bytes(boundary, have, need)
                if n:
                    out[holder] = out.get(holder, 0) + n
        return out

    def tile_seconds(self, device: str, flops: float, recv: int) -> float:
        return self.compute(device, flops) + (self.transfer(recv, device) if recv else 0.0)

    def gather(self, pieces: Sequence[Piece]) -> tuple[float, dict[str | None, int]]:
        n = self.model.n_segments
        sent = {h: self.piece_bytes(n, box, WHOLE) for h, box in pieces}
        return self.transfer(sum(sent.values()), None), sent


def evaluate(
    model: BlockCosts,
    devices: Sequence[TileDevice],
    choices: Sequence[BlockChoice],
    compute: ComputeFn,
    transfer: TransferFn,
    *,
    exact: bool = True,
    pricer: Pricer | None = None,
) -> IntraPlan:
    """Price a plan given as block choices (the reference definition of the objective)."""
    pricer = pricer or Pricer(model, devices, compute, transfer)
    pieces: list[Piece] = [(None, WHOLE)]
    at, blocks = 0, []
    sent: dict[str | None, int] = {}
    memory = {d.name: 0 for d in devices}
    for c in choices:
        tiles = pricer.tiles(c)
        if c.start != at or c.end <= c.start or tiles is None:
            raise PlanningError(f"block {c} does not continue at segment {at} or cannot run")
        placed = []
        for device, out_box, in_box, flops, params in tiles:
            recv = pricer.received(c.start, pieces, device, in_box)
            for holder, n in recv.items():
                sent[holder] = sent.get(holder, 0) + n
            memory[device] += params
            seconds = pricer.tile_seconds(device, flops, sum(recv.values()))
            placed.append(
                PlacedTile(device, out_box, in_box, flops, params, sum(recv.values()), seconds)
            )
        blocks.append(
            PlannedBlock(c.start, c.end, c.strategy, tuple(placed), max(t.seconds for t in placed))
        )
        pieces, at = pricer.layout(c.end, c.strategy, c.device), c.end
    if at != model.n_segments:
        raise PlanningError(f"plan covers segments up to {at} of {model.n_segments}")
    gather_s, gathered = pricer.gather(pieces)
    for holder, n in gathered.items():
        sent[holder] = sent.get(holder, 0) + n
    latency = sum(b.seconds for b in blocks) + gather_s
    return IntraPlan(tuple(blocks), latency, gather_s, sent, memory, exact)
