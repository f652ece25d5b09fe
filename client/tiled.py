"""A tiled plan's requests on the client: the input cut into pieces, the output gathered.

A request of a tiled plan (protocol 1.4, broker/protocol/pieces.py) leaves the client as
one ``request`` transfer per tile of its first stage, each holding the part of the input
that tile's ``in_box`` names (the whole input for a tile with an empty box), and comes
back as one ``result`` transfer per tile of its last stage, each holding its ``out_box``.
:func:`scatter` makes the first, :class:`ResultGather` puts the second back together --
bounded and expiring like an agent's gather, keyed per request, plan and send attempt so
pieces of two sends never mix; the first send whose pieces are complete answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.boxes import box_to_wire
from edgeslice.broker.protocol.chunking import Completed
from edgeslice.broker.protocol.errors import DecodeError, EdgesliceError
from edgeslice.broker.protocol.messages import RequestEnvelope, Tile
from edgeslice.broker.protocol.pieces import (
    WHOLE,
    PieceBuffer,
    PieceRefused,
    TileCache,
    cut,
    expected_boxes,
    join,
    piece_box,
    tile_boxes,
    want_box,
    wire_box,
    wire_timings,
)
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.client.requests import GatheredResult


def is_tiled_plan(stages: Sequence[Any]) -> bool:
    """Does a plan (its stages) split any stage into tiles?"""
    return any(stage.tiles for stage in stages)


@dataclass(frozen=True)
class Scattered:
    """One piece of a request's input, for one tile of its first stage; ``meta`` is the
    envelope's wire form when made already (the tiles encoded once for all pieces)."""

    agent_id: str
    envelope: RequestEnvelope
    payload: bytes | memoryview
    meta: dict[str, Any] | None = None


def scatter(
    inputs: Sequence[Tensor], tiles: list[list[Tile]], base: RequestEnvelope
) -> list[Scattered]:
    """The input pieces of one send: ``base`` (reply_to, model, attempt, ...) with the
    tiles, and each first-stage tile's box and tensors. Raises ``ValueError`` for a box
    that does not fit the input."""
    out = []
    wire = codec.to_wire(replace(base, route=[], tiles=[]))
    wire["tiles"] = [[list(t) for t in stage] for stage in tiles]  # once for every piece
    for tile in tiles[0]:
        in_box, _ = tile_boxes(tile)
        box = piece_box(WHOLE, in_box)
        assert box is not None  # a whole sender reaches every tile
        meta, payload = pack_tensors(cut(inputs, WHOLE, box))
        env = replace(base, route=[], tensors=meta, tiles=tiles, box=box_to_wire(box))
        out.append(Scattered(tile.agent_id, env, payload, dict(wire, tensors=meta, box=env.box)))
    return out


def stage_agents(tiles: list[list[Tile]]) -> list[list[str]]:
    return [[t.agent_id for t in stage] for stage in tiles]


def route_of(tiles: list[list[Tile]]) -> list[str]:
    """Every agent a send reaches, once each, in stage order."""
    return list(dict.fromkeys(a for stage in stage_agents(tiles) for a in stage))


class ResultGather:
    """The client's gather of result pieces (module docstring)."""

    def __init__(self, max_open: int = 512, idle_s: float = 30.0, max_age_s: float = 300.0):
        self.buffer: PieceBuffer[tuple[list[Tensor], list[Any]]] = PieceBuffer(
            max_open=max_open, max_bytes=1024 * 1024 * 1024, idle_s=idle_s, max_age_s=max_age_s
        )
        self.tiles = TileCache()  # tiles checked once per plan; timings once per result

    def add(self, done: Completed, now: float) -> GatheredResult | str | None:
        """One result piece: the assembled answer when it was the last one missing, a reason
        (str) when it is unusable, None while pieces are still missing."""
        header = done.header
        try:
            env = self.tiles.envelope(header.meta, "", header.plan_id, header.plan_version)
            if not env.tiles:
                raise DecodeError("a result piece without the request's tiles")
            box = wire_box(env.box)
            expected = expected_boxes([tile_boxes(t)[1] for t in env.tiles[-1]], WHOLE)
            want = want_box(expected, WHOLE)
            tensors = unpack_tensors(env.tensors, done.payload, share=True)
        except (EdgesliceError, ValueError) as exc:
            return f"request {header.request_id}: unusable result piece: {exc}"
        key = (header.request_id, header.plan_id, header.plan_version, env.attempt)
        timings = wire_timings(header.meta)
        got = self.buffer.add(key, expected, want, box, (tensors, timings), len(done.payload), now)
        if isinstance(got, PieceRefused):
            return f"request {header.request_id}: result piece refused: {got.reason} ({got.detail})"
        if got is None:
            return None
        try:
            outputs = join([(b, v[0]) for b, v in got.pieces], want)
        except ValueError as exc:
            return f"request {header.request_id}: result pieces do not assemble: {exc}"
        merged: dict[tuple[Any, Any], Any] = {}
        for _box, (_tensors, piece_timings) in got.pieces:
            for t in piece_timings:
                if isinstance(t, dict):
                    merged.setdefault((t.get("stage"), t.get("agent")), t)
        try:  # every tile's timing, decoded (and checked) once, here
            check = {"route": [], "reply_to": env.reply_to, "timings": list(merged.values())}
            decoded = codec.from_wire(check, RequestEnvelope).timings
        except EdgesliceError as exc:
            return f"request {header.request_id}: unusable result timings: {exc}"
        ordered = sorted(decoded, key=lambda t: (t.stage, t.agent))
        return GatheredResult(header, outputs, ordered)

    def expire(self, now: float) -> None:
        self.buffer.expire(now)  # the request's own timeout says what happened

    def forget(self, request_id: str) -> None:
        self.buffer.discard(lambda key: key[0] == request_id)
