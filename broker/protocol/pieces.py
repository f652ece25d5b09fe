"""Pieces of a tiled request: which box goes from each tile to the next stage's, and gathering.

A tiled stage (messages.py: :class:`Tile`) is computed by several agents, each producing one
*output box* from one *input box* (boxes.py). Between stage ``i`` and ``i+1`` every sender
tile sends every receiver tile the part of its output that the receiver's input box needs --
a *piece*: the intersection of the sender's ``out_box`` with the receiver's ``in_box`` -- and
the receiver runs once the pieces it expects have all arrived. The client is the sender of
stage 0's pieces (it crops the model input to each tile's ``in_box``) and the receiver after
the last stage (it assembles the output from the last tiles' ``out_box`` es). Agents and
clients both use these rules, so they live beside the wire format.

An empty box means *the whole* activation, however many tensors it has: a stage that is not
split is one tile with empty boxes. A whole sender crops its (single) output to a split
receiver's ``in_box``; a whole receiver after a split stage takes every sender's ``out_box``
and assembles the box they span from the origin.

:class:`PieceBuffer` keeps pieces until a receiver's set is complete: pure (takes the
clock), bounded (open gathers in total and per sender, bytes) and expiring (idle or old
gathers are dropped with a reason), refusing a piece whose box is not one the plan makes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.boxes import (
    Box,
    assemble,
    box_from_wire,
    covers,
    crop,
    full_box,
    intersect,
)
from edgeslice.broker.protocol.messages import RequestEnvelope, Tile

if TYPE_CHECKING:
    from torch import Tensor

WHOLE: Box = ()  # the empty box: the whole activation
V = TypeVar("V")
_MiB = 1024 * 1024


def wire_box(value: Sequence[Sequence[int]]) -> Box:
    """A box from its wire form; ``[]`` is :data:`WHOLE`. Raises ``ValueError`` if malformed."""
    return WHOLE if not value else box_from_wire(value)


def tile_boxes(tile: Tile) -> tuple[Box, Box]:
    """(in_box, out_box) of a tile; raises ``ValueError`` for a malformed box."""
    return wire_box(tile.in_box), wire_box(tile.out_box)


def piece_box(out_box: Box, in_box: Box) -> Box | None:
    """The box a sender with ``out_box`` sends a receiver with ``in_box`` (None: nothing).

    Split to split: their intersection. Whole sender to split receiver: the receiver's box
    (cropped from the whole output). Split sender to whole receiver: the sender's box.
    Whole to whole: the whole. Raises ``ValueError`` for boxes of different ranks.
    """
    if out_box == WHOLE:
        return in_box
    if in_box == WHOLE:
        return out_box
    return intersect(out_box, in_box)


def expected_boxes(sender_outs: Sequence[Box] | None, in_box: Box) -> list[Box]:
    """The piece boxes a receiver with ``in_box`` waits for from senders with ``sender_outs``
    (None: the client, which sends each stage-0 tile exactly its ``in_box``); distinct, in
    sender order. Raises ``ValueError`` for boxes of different ranks."""
    if sender_outs is None:
        return [in_box]
    out: list[Box] = []
    for sent in sender_outs:
        box = piece_box(sent, in_box)
        if box is not None and box not in out:
            out.append(box)
    return out


def want_box(expected: Sequence[Box], in_box: Box) -> Box:
    """What a receiver assembles: its ``in_box``; for a whole receiver of split pieces, the
    box they span from the origin; for whole pieces, the whole. Raises ``ValueError`` for
    pieces of different ranks."""
    if in_box != WHOLE or not expected or WHOLE in expected:
        return in_box
    rank = len(expected[0])
    if any(len(b) != rank for b in expected):
        raise ValueError(f"pieces of different ranks: {[list(b) for b in expected]}")
    return tuple((0, max(b[d][1] for b in expected)) for d in range(rank))


def complete_cover(expected: Sequence[Box], want: Box) -> str:
    """Why ``expected`` pieces cannot make ``want`` ("" when they can): a plan whose tiles do
    not cover a receiver's input, or that mixes whole and split boxes of different ranks."""
    if not expected:
        return f"no tile of the previous stage produces any part of box {list(want)}"
    if want == WHOLE:
        return "" if list(expected) == [WHOLE] else f"pieces {list(expected)} for a whole input"
    try:
        if covers(list(expected), want):
            return ""
    except ValueError as exc:
        return str(exc)
    return f"pieces {[list(b) for b in expected]} leave part of box {list(want)} uncovered"


def cut(tensors: Sequence[Tensor], have: Box, box: Box) -> list[Tensor]:
    """The part ``box`` of a tile's outputs, which hold ``have`` (WHOLE: all of them).

    A whole box passes every tensor on; a split box needs exactly one tensor (a tiled block
    has one output) and crops it, ``have`` WHOLE meaning its full extent."""
    if box == WHOLE:
        return list(tensors)
    if len(tensors) != 1:
        raise ValueError(f"box {list(box)} of {len(tensors)} tensors: a split needs exactly one")
    (tensor,) = tensors
    return [crop(tensor, have or full_box(tensor.shape), box)]


def join(pieces: Sequence[tuple[Box, Sequence[Tensor]]], want: Box) -> list[Tensor]:
    """The inputs a receiver runs on, from its complete pieces (``want`` as from
    :func:`want_box`): the one whole piece's tensors, or one tensor assembled from the
    split pieces (boxes.assemble; raises ``ValueError`` when they do not cover ``want``)."""
    if want == WHOLE:
        if len(pieces) != 1:
            raise ValueError(f"{len(pieces)} pieces for a whole input; want exactly one")
        return list(pieces[0][1])
    parts = []
    for box, tensors in pieces:
        if len(tensors) != 1:
            raise ValueError(f"piece {list(box)} holds {len(tensors)} tensors; want one")
        parts.append((box, tensors[0]))
    return [assemble(parts, want)]


@dataclass(frozen=True)
class Gathered(Generic[V]):
    """A receiver's pieces, complete: ``want`` assembles from ``pieces`` (box, value)."""

    key: Hashable
    want: Box
    pieces: list[tuple[Box, V]]
    opened_at: float  # first piece
    completed_at: float  # last piece


@dataclass(frozen=True)
class PieceRefused:
    """A piece (or a whole gather, on expiry) refused: ``reason`` is a short word --
    malformed (a box the plan does not make), mismatch (another expected set for the same
    key), uncovered (the plan's pieces cannot make the input), too_many_open, buffer_full,
    timed_out -- and ``detail`` says what and where."""

    key: Hashable
    reason: str
    detail: str
    sender: str = ""
    context: Any = None  # what the caller attached to the gather (e.g. its first header)


@dataclass
class _Gather:
    want: Box
    expected: frozenset[Box]
    sender: str
    opened_at: float
    last_at: float
    context: Any
    pieces: dict[Box, Any] = field(default_factory=dict)
    sizes: dict[Box, int] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


class PieceBuffer(Generic[V]):
    """Gathers pieces per key until a receiver's expected set is complete (module doc).

    ``add`` returns :class:`Gathered` (and forgets the key), :class:`PieceRefused` or None
    (need more); ``expire`` drops gathers idle for ``idle_s`` or older than ``max_age_s``.
    A new gather beyond ``max_open`` (in total, or per sender) or a piece beyond the byte
    limits is refused; nothing is evicted to make room, so a flood cannot push out work
    that is nearly complete.
    """

    def __init__(
        self,
        max_open: int = 256,
        max_open_per_sender: int | None = None,
        max_bytes: int = 512 * _MiB,
        max_bytes_per_sender: int | None = None,
        idle_s: float = 30.0,
        max_age_s: float = 120.0,
    ) -> None:
        self.max_open = max_open
        self.max_open_per_sender = max_open_per_sender or max_open
        self.max_bytes = max_bytes
        self.max_bytes_per_sender = max_bytes_per_sender or max_bytes
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._open: OrderedDict[Hashable, _Gather] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self._open.values())

    def _sender_use(self, sender: str) -> tuple[int, int]:
        mine = [g for g in self._open.values() if g.sender == sender]
        return len(mine), sum(g.nbytes for g in mine)

    def add(
        self,
        key: Hashable,
        expected: Sequence[Box],
        want: Box,
        box: Box,
        value: V,
        nbytes: int,
        now: float,
        sender: str = "",
        context: Any = None,
    ) -> Gathered[V] | PieceRefused | None:
        """One piece ``box`` (its ``value``, ``nbytes`` big) for the receiver ``key``, which
        expects ``expected`` pieces to assemble ``want``."""
        wanted = frozenset(expected)
        gather = self._open.get(key)

        def refuse(reason: str, detail: str) -> PieceRefused:
            return PieceRefused(key, reason, detail, sender, context)

        if box not in wanted:
            return refuse(
                "malformed",
                f"piece {list(box)} is not one of the pieces this tile expects "
                f"{[list(b) for b in expected]} (another plan, or a forged box)",
            )
        if gather is None:
            why = complete_cover(list(expected), want)
            if why:
                return refuse("uncovered", why)
            count, held = self._sender_use(sender)
            if len(self._open) >= self.max_open or count >= self.max_open_per_sender:
                return refuse(
                    "too_many_open",
                    f"{len(self._open)} gathers open ({count} from {sender or '?'}); "
                    f"limits {self.max_open}/{self.max_open_per_sender}",
                )
            gather = _Gather(want, wanted, sender, now, now, context)
        elif gather.expected != wanted or gather.want != want:
            return refuse("mismatch", "pieces of one receiver disagree on what it expects")
        else:
            count, held = self._sender_use(sender)
        old = gather.sizes.get(box, 0)
        total = self.nbytes - old + nbytes
        if total > self.max_bytes or held - old + nbytes > self.max_bytes_per_sender:
            return refuse(
                "buffer_full",
                f"a {nbytes}-byte piece would hold {total} bytes of pieces "
                f"(limits {self.max_bytes}, {self.max_bytes_per_sender} per sender)",
            )
        gather.pieces[box] = value  # a repeat of a box (a re-sent piece) replaces it
        gather.sizes[box] = nbytes
        gather.last_at = now
        self._open[key] = gather
        self._open.move_to_end(key)
        if not wanted <= gather.pieces.keys():
            return None
        del self._open[key]
        ordered = [(b, gather.pieces[b]) for b in expected if b in gather.pieces]
        return Gathered(key, gather.want, ordered, gather.opened_at, now)

    def expire(self, now: float) -> list[PieceRefused]:
        """Drop gathers idle for ``idle_s`` or older than ``max_age_s``; say which."""
        out = []
        for key, g in list(self._open.items()):
            idle, age = now - g.last_at, now - g.opened_at
            if idle >= self.idle_s or age >= self.max_age_s:
                del self._open[key]
                missing = sorted(g.expected - g.pieces.keys())
                out.append(
                    PieceRefused(
                        key,
                        "timed_out",
                        f"waited {age:.1f} s ({idle:.1f} s idle) for pieces "
                        f"{[list(b) for b in missing]}; got {len(g.pieces)} of "
                        f"{len(g.expected)}",
                        g.sender,
                        g.context,
                    )
                )
        return out

    def discard(self, match: Any) -> int:
        """Drop every gather whose key satisfies ``match(key)``; how many."""
        keys = [k for k in self._open if match(k)]
        for k in keys:
            del self._open[k]
        return len(keys)


MAX_CACHED_PLANS = 64  # (client, plan, version) whose decoded tiles an agent keeps


class TileCache:
    """Decoded tiles per (client, plan id, plan version): a request's envelope carries
    every stage's tiles, the same for every request of one plan version, so an agent
    decodes (and checks) them once and after that only compares the wire form with the one
    it checked (a plain list comparison). Bounded, least recent out. The key includes the
    client, so one client's envelopes never decide another's."""

    def __init__(self, size: int = MAX_CACHED_PLANS) -> None:
        self.size = size
        # key -> (the tiles' wire form as checked, the decoded tiles)
        self._tiles: OrderedDict[tuple[str, str, int], tuple[Any, list[list[Any]]]] = OrderedDict()

    def envelope(self, meta: Any, client_id: str, plan_id: str, version: int) -> RequestEnvelope:
        """The envelope of a transfer's header ``m``: checked like ``codec.from_wire`` but
        for its timings (left on the wire, :class:`PieceData`), tiles from the cache."""
        if not isinstance(meta, dict):
            return codec.from_wire(meta, RequestEnvelope)  # raises the usual DecodeError
        rest = {k: v for k, v in meta.items() if k not in ("tiles", "timings")}
        env = codec.from_wire(rest, RequestEnvelope)
        raw = meta.get("tiles")
        key = (client_id, plan_id, version)
        known = self._tiles.get(key)
        if known is not None and known[0] == raw:  # the same wire form: checked already
            tiles = known[1]
        else:
            tiles = codec.from_wire({**rest, "tiles": raw}, RequestEnvelope).tiles
            self._tiles[key] = (raw, tiles)
            while len(self._tiles) > self.size:
                self._tiles.popitem(last=False)
        self._tiles.move_to_end(key)
        return replace(env, tiles=tiles)


def wire_timings(meta: Any) -> list[Any]:
    """A header's timings as they came (a list; anything else counts as none)."""
    timings = meta.get("timings") if isinstance(meta, dict) else None
    return timings if isinstance(timings, list) else []
