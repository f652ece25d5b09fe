"""A tiled request on an agent: which tile a piece is for, its gather, and where outputs go.

A request of a tiled plan carries every stage's tiles in its envelope (``tiles``, protocol
1.4) and each transfer of it one *piece*: the part ``box`` of the activation entering stage
``st`` (broker/protocol/pieces.py has the rules). This module holds the agent's side as
plain functions over values; agent/dataplane.py calls them and performs the effects:

* :func:`tile_of` -- the one tile of stage ``st`` this agent runs, the piece boxes it waits
  for and the box it assembles (an agent holds at most one tile per stage, but may hold
  tiles of many stages: in an intra-layer plan every agent works in every block);
* :func:`gather_key` -- pieces are gathered per (client, request id, plan, send attempt,
  stage), so two sends of one request never mix and a client feeds only its own gathers;
* :func:`tile_inputs` -- once complete (the data plane's PieceBuffer), the pieces unpacked
  and assembled into the tile's input box (on the stage thread: it copies tensors);
* :func:`tile_outbounds` -- the tile's output cut for every tile of the next stage (the
  intersection of its ``out_box`` with theirs ``in_box``), or for the client after the last
  stage. A piece for this agent itself is handed back as a :class:`LocalPiece`, never sent
  through the broker;
* :class:`TileIntake` -- the data plane's front for pieces: decode and check, gather
  (bounded, expiring), and hand back a :class:`TileJob` or a :class:`Refusal` to answer;
  :func:`run_tile` -- one job on the stage thread.

Tiled stages run one request at a time (dynamic batching is off for them: their route is
empty, so agent/batching.py finds no batch key).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import Tensor

from edgeslice.agent.hops import Outbound
from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.boxes import Box, box_shape, box_to_wire
from edgeslice.broker.protocol.chunking import Completed, TransferHeader, encode_transfer
from edgeslice.broker.protocol.errors import (
    EdgesliceError,
    InferenceError,
    StageUnavailableError,
    TransferError,
)
from edgeslice.broker.protocol.messages import RequestEnvelope, StageTiming
from edgeslice.broker.protocol.pieces import (
    Gathered,
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
from edgeslice.broker.protocol.topics import Topics

GatherKey = tuple[str, str, str, int, int, int]  # client, request, plan id, version, attempt, st


def is_tiled(meta: Any) -> bool:
    """Does a transfer header's ``m`` belong to a tiled request (before decoding it)?"""
    return isinstance(meta, dict) and bool(meta.get("tiles"))


@dataclass(frozen=True)
class TileSpec:
    """This agent's tile of one stage of a request, decoded and checked."""

    stage: int
    artifact: str
    in_box: Box
    out_box: Box
    expected: tuple[Box, ...]  # the piece boxes it waits for
    want: Box  # what those pieces assemble into (its in_box, or the span for a whole tile)
    last: bool  # the request's last stage: outputs go to the client


def tile_of(env: RequestEnvelope, stage: int, agent_id: str, request_id: str) -> TileSpec:
    """This agent's tile of ``stage``; InferenceError naming the request when the envelope
    routes no (or more than one) tile of it here or carries a malformed box."""
    tiles = env.tiles
    where = f"request {request_id} stage {stage}"
    if not 0 <= stage < len(tiles):
        raise InferenceError(f"{where}: the envelope has tiles for {len(tiles)} stages only")
    mine = [t for t in tiles[stage] if t.agent_id == agent_id]
    if len(mine) != 1:
        raise InferenceError(
            f"{where} has {len(mine)} tiles for agent {agent_id} (of "
            f"{[t.agent_id for t in tiles[stage]]}); each agent runs at most one per stage"
        )
    try:
        in_box, out_box = tile_boxes(mine[0])
        senders = None if stage == 0 else [tile_boxes(t)[1] for t in tiles[stage - 1]]
        expected = expected_boxes(senders, in_box)
        for t in tiles[stage + 1] if stage + 1 < len(tiles) else ():
            piece_box(out_box, tile_boxes(t)[0])  # a bad box downstream fails before compute
        want = want_box(expected, in_box)
    except ValueError as exc:
        raise InferenceError(f"{where}: malformed tile box: {exc}") from None
    last = stage == len(tiles) - 1
    return TileSpec(stage, mine[0].artifact, in_box, out_box, tuple(expected), want, last)


def piece_of(env: RequestEnvelope, request_id: str) -> Box:
    """The box a transfer's tensors hold; InferenceError when malformed."""
    try:
        return wire_box(env.box)
    except ValueError as exc:
        raise InferenceError(f"request {request_id}: malformed piece box: {exc}") from None


def gather_key(client_id: str, header: TransferHeader, env: RequestEnvelope) -> GatherKey:
    return (
        client_id,
        header.request_id,
        header.plan_id,
        header.plan_version,
        env.attempt,
        header.stage,
    )


@dataclass(frozen=True)
class PieceData:
    """One buffered piece: packed bytes from the broker, or tensors from this agent itself.

    ``env`` has its tiles (decoded once per client and plan: :class:`TileCache`) but no
    timings: those travel as they came on the wire (``timings``, plain maps) and go on
    merged, never decoded here, so a piece late in a long plan costs no more to handle
    than an early one (the client decodes them once, with the result). ``tiles`` is the
    tiles' wire form, forwarded as received."""

    env: RequestEnvelope
    first_chunk_at: float
    tensors: list[Tensor] | None = None
    payload: bytes | bytearray | memoryview = b""
    timings: list[Any] = field(default_factory=list)
    tiles: Any = None


@dataclass(frozen=True)
class LocalPiece:
    """A piece this agent sends itself (the data plane feeds it back into its gather)."""

    header: TransferHeader
    data: PieceData
    box: Box
    client_id: str


@dataclass
class TileJob:
    """A tile whose pieces are all here, waiting for the stage thread (a queue item like
    agent/hops.py's ``Job``: ``header`` and ``received_at``)."""

    gathered: Gathered[PieceData]
    tile: TileSpec
    header: TransferHeader  # the last piece's (plan, deadline, request id, stage)
    client_id: str
    received_at: float

    @property
    def recv_s(self) -> float:
        return max(0.0, self.gathered.completed_at - self.gathered.opened_at)

    @property
    def transfer_s(self) -> float:
        """The longest send -> first-chunk time over its pieces (clocks of two hosts)."""
        waits = [
            d.first_chunk_at - d.env.sent_at for _b, d in self.gathered.pieces if d.env.sent_at
        ]
        return max(0.0, *waits) if waits else 0.0


def tile_inputs(job: TileJob) -> list[Tensor]:
    """The tile's inputs: every piece unpacked, then assembled into its input box."""
    pieces = []
    for box, data in job.gathered.pieces:
        if data.tensors is not None:
            tensors = data.tensors
        else:
            tensors = unpack_tensors(data.env.tensors, data.payload, share=True)
        pieces.append((box, tensors))
    try:
        return join(pieces, job.tile.want)
    except ValueError as exc:
        raise InferenceError(
            f"request {job.header.request_id} stage {job.tile.stage}: pieces do not assemble "
            f"its input box {list(job.tile.want)}: {exc}"
        ) from None


def merged_timings(job: TileJob) -> list[Any]:
    """The stage timings all pieces carry (each tile of earlier stages once), in order, in
    their wire form (maps with ``stage`` and ``agent``; anything else is dropped here and
    a malformed map is refused by the client when it decodes the result)."""
    seen: dict[tuple[Any, Any], Any] = {}
    for _box, data in job.gathered.pieces:
        for t in data.timings:
            if isinstance(t, dict):
                seen.setdefault((t.get("stage"), t.get("agent")), t)

    def order(t: dict[str, Any]) -> tuple[int, str]:
        stage = t.get("stage")
        return (stage if isinstance(stage, int) else -1, str(t.get("agent")))

    return sorted(seen.values(), key=order)


def destinations(env: RequestEnvelope, tile: TileSpec) -> list[tuple[str, Box]]:
    """(agent id, piece box) for every tile of the next stage this tile's output reaches;
    ``("", box)`` for the client after the last stage."""
    if tile.last:
        return [("", tile.out_box)]
    out = []
    for t in env.tiles[tile.stage + 1]:
        box = piece_box(tile.out_box, tile_boxes(t)[0])
        if box is not None:
            out.append((t.agent_id, box))
    return out


def tile_outbounds(
    job: TileJob,
    outputs: Sequence[Tensor],
    timing: StageTiming,
    agent_id: str,
    topics: Topics,
    chunk_size: int,
    now: float,
) -> list[Outbound]:
    """The tile's output, cut into the next stage's pieces (module doc); a piece for this
    agent itself is an Outbound carrying a :class:`LocalPiece` and no chunks. Every piece is
    packed first, so ``timing`` goes on carrying the payload bytes the tile sent."""
    tile, header = job.tile, job.header
    env = job.gathered.pieces[-1][1].env
    compression = None if tile.last else (env.compression or None)
    parts: list[tuple[str, Box, list[Tensor], Any]] = []  # dest, box, tensors, packed
    for dest, box in destinations(env, tile):
        try:
            part = list(cut(outputs, tile.out_box, box))
        except ValueError as exc:
            raise InferenceError(
                f"request {header.request_id} stage {tile.stage}: cannot cut piece "
                f"{list(box)} from output box {list(tile.out_box)}: {exc}"
            ) from None
        packed = None if dest == agent_id else pack_tensors(part, compression=compression)
        parts.append((dest, box, part, packed))
    sent = sum(memoryview(p[3][1]).nbytes for p in parts if p[3] is not None)
    timings = [*merged_timings(job), asdict(replace(timing, sent_bytes=sent))]
    last = job.gathered.pieces[-1][1]
    tiles_wire = last.tiles if last.tiles is not None else [list(t) for t in env.tiles]
    out: list[Outbound] = []
    base: dict[str, Any] | None = None
    for dest, box, part, packed in parts:
        forward = replace(env, box=box_to_wire(box), timings=[], sent_at=now, tensors=[])
        if base is None:  # the envelope on the wire, once: pieces differ in box and tensors
            base = codec.to_wire(replace(forward, tiles=[]))  # tiles and timings as they are
            base.update(tiles=tiles_wire, timings=timings)
        if packed is None:  # for this agent itself
            meta = dict(base, box=forward.box)  # what an error reply reads timings from
            next_header = replace(header, stage=tile.stage + 1, transfer_id="local", meta=meta)
            data = PieceData(forward, now, tensors=part, timings=timings, tiles=tiles_wire)
            local = LocalPiece(next_header, data, box, job.client_id)
            out.append(Outbound("", [], header.request_id, local=local))
            continue
        tensor_meta, payload = packed
        topic = (
            topics.client_results(job.client_id)
            if tile.last
            else topics.inbox(dest, job.client_id)  # the client's segment, as for a hop
        )
        encoded = encode_transfer(
            payload,
            request_id=header.request_id,
            kind="result" if tile.last else "activation",
            plan_id=header.plan_id,
            plan_version=header.plan_version,
            stage=tile.stage + 1,
            deadline=header.deadline,
            meta=dict(base, box=forward.box, tensors=tensor_meta),
            chunk_size=chunk_size,
        )
        out.append(Outbound(topic, encoded.chunks, header.request_id))
    return out


@dataclass(frozen=True)
class Refusal:
    """A piece (or a gather) this agent will not use: the error goes to ``client_id``."""

    header: TransferHeader
    error: EdgesliceError
    client_id: str


class TileIntake:
    """Pieces in, complete :class:`TileJob` s out (module doc); never raises on input."""

    def __init__(self, agent_id: str, runtime: StageRuntime, buffer: PieceBuffer[PieceData]):
        self.agent_id = agent_id
        self.runtime = runtime
        self.buffer = buffer
        self.tiles = TileCache()

    def on_transfer(self, done: Completed, client_id: str, now: float) -> TileJob | Refusal | None:
        """A completed transfer of a tiled request (its client from the inbox topic)."""
        try:
            return self._on_transfer(done, client_id, now)
        except Exception as exc:  # a bug must not cost the client its answer
            return Refusal(done.header, _unexpected(done.header, exc), client_id)

    def on_local(self, local: LocalPiece, now: float) -> TileJob | Refusal | None:
        """A piece this agent cut for its own tile of the next stage."""
        try:
            nbytes = sum(t.numel() * t.element_size() for t in local.data.tensors or [])
            data, header = local.data, local.header
            return self._gather(header, data.env, local.box, data, local.client_id, nbytes, now)
        except Exception as exc:
            return Refusal(local.header, _unexpected(local.header, exc), local.client_id)

    def _on_transfer(self, done: Completed, client_id: str, now: float) -> TileJob | Refusal | None:
        header = done.header
        try:
            env = self.tiles.envelope(header.meta, client_id, header.plan_id, header.plan_version)
            if env.reply_to != client_id:
                raise InferenceError(
                    f"request {header.request_id} came from client {client_id!r} but asks "
                    f"for its result to go to {env.reply_to!r}; refused"
                )
            box = piece_of(env, header.request_id)
        except EdgesliceError as exc:
            return Refusal(header, exc, client_id)
        timings, tiles = wire_timings(header.meta), header.meta.get("tiles")
        data = PieceData(
            env, done.first_chunk_at, payload=done.payload, timings=timings, tiles=tiles
        )
        return self._gather(header, env, box, data, client_id, len(done.payload), now)

    def _gather(
        self,
        header: TransferHeader,
        env: RequestEnvelope,
        box: Box,
        data: PieceData,
        client_id: str,
        nbytes: int,
        now: float,
    ) -> TileJob | Refusal | None:
        try:
            tile = tile_of(env, header.stage, self.agent_id, header.request_id)
            if self.runtime.get(tile.artifact) is None:
                raise StageUnavailableError(
                    f"agent {self.agent_id} has no tile of stage {tile.stage} loaded for "
                    f"artifact {tile.artifact[:12]} (plan {header.plan_id} "
                    f"v{header.plan_version}); the plan changed: retry"
                )
        except EdgesliceError as exc:
            return Refusal(header, exc, client_id)
        key = gather_key(client_id, header, env)
        got = self.buffer.add(
            key, tile.expected, tile.want, box, data, nbytes, now, client_id, header
        )
        if isinstance(got, PieceRefused):
            return self.refusal(got)
        return None if got is None else TileJob(got, tile, header, client_id, now)

    def expire(self, now: float) -> list[Refusal]:
        gone = (self.refusal(r) for r in self.buffer.expire(now))
        return [r for r in gone if r is not None]

    def refusal(self, refused: PieceRefused) -> Refusal | None:
        header = refused.context
        if not isinstance(header, TransferHeader):
            return None
        error = TransferError(
            f"agent {self.agent_id} refused a piece of stage {header.stage} of request "
            f"{header.request_id}: {refused.reason} ({refused.detail})",
            reason=refused.reason,
        )
        return Refusal(header, error, refused.sender)


def _unexpected(header: TransferHeader, exc: Exception) -> InferenceError:
    return InferenceError(
        f"request {header.request_id} stage {header.stage}: piece not usable "
        f"({type(exc).__name__}: {exc})"
    )


def run_tile(
    job: TileJob, runtime: StageRuntime, agent_id: str, started: float
) -> tuple[list[Tensor], StageTiming, str]:
    """Stage thread: assemble the tile's input, run it; (outputs, timing, artifact sha).
    Raises on any failure (the data plane answers the client)."""
    tile = job.tile
    loaded = runtime.get(tile.artifact)
    if loaded is None:
        raise StageUnavailableError(
            f"agent {agent_id} unloaded the tile of stage {tile.stage} (artifact "
            f"{tile.artifact[:12]}) before request {job.header.request_id} ran; retry"
        )
    inputs = tile_inputs(job)
    start = time.perf_counter()
    outputs = loaded.run(inputs)
    if tile.out_box and [tuple(o.shape[1:]) for o in outputs] != [box_shape(tile.out_box)]:
        raise InferenceError(
            f"request {job.header.request_id} stage {tile.stage}: artifact "
            f"{tile.artifact[:12]} on agent {agent_id} made {[list(o.shape) for o in outputs]}, "
            f"not the out box {list(tile.out_box)} its tile names"
        )
    timing = StageTiming(
        stage=tile.stage,
        agent=agent_id,
        recv_s=job.recv_s,
        transfer_s=job.transfer_s,
        queue_s=max(0.0, started - job.received_at),
        compute_s=time.perf_counter() - start,
    )
    return outputs, timing, loaded.sha256
