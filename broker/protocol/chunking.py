"""Chunked transfers: split a payload into msgpack chunks and reassemble them, bounded and safe.

Why chunks: brokers cap packet sizes and a multi-MiB activation in one MQTT message would hold
up every other message on the connection. Each chunk is one msgpack map (short keys: the
overhead is ~40 bytes per data chunk, ~120 + meta for the header chunk):

    key  in chunk  type       meaning
    v    0         [int,int]  protocol [major, minor]; a newer major is refused ("version")
    t    all       str        transfer id, unique per transfer (uuid4 hex by default)
    s    all       int        sequence number 0 .. n-1
    r    0         str        request id
    k    0         str        kind: request | activation | result | error | artifact
    p    0         str        plan id
    pv   0         int        plan version
    st   0         int        stage index
    n    0         int        total chunks
    l    0         int        total payload length in bytes
    c    0         int        zlib.crc32 of the whole payload: senders before 1.3 only (still
                              checked when present); 1.3 senders omit it
    x    all       int        zlib.crc32 of this chunk's d (since 1.3): checked on arrival, so
                              the sender needs no pass over the whole payload before chunk 0
    dl   0         float      deadline, unix seconds; 0.0 = none
    m    0         map        request/activation/result: a RequestEnvelope (route, reply-to,
                              tensor specs, timings), error: an ErrorReply, both as
                              codec.to_wire maps (messages.py); artifact: empty
    dc   0         int        data bytes in each of chunks 1..n-2 (optional: lets the receiver
                              copy each chunk straight to its offset; older senders omit it)
    d    all       bin        this chunk's slice of the payload, always the last key

Chunk 0 carries the header and as much payload as fits; chunks 1..n-1 carry only t, s, x, d
(in that order, x as a uint32: receivers parse that layout without msgpack). Every encoded
chunk is at most ``chunk_size`` bytes. Copies: one when sending (payload slice into the chunk),
one when receiving (each chunk's data into its place in the final buffer). Checksums are per
chunk (protocol 1.3): chunk 0 leaves as soon as it is cut, each chunk's crc32 is computed while
it is hot in cache, and a corrupted chunk is refused ("checksum", naming the transfer) when it
arrives instead of after the last one. Receivers still read 1.2 headers (whole-payload ``c``,
data chunks without ``x``); a 1.2 receiver refuses a 1.3 header (no ``c``): upgrade receivers
(agents, clients) before senders.

This module owns the wire format and the sending side; the receiving side (:class:`Reassembler`,
:class:`Completed`, :class:`Refused`, :class:`TransferHeader`) lives in
:mod:`broker.protocol.reassembly` and is re-exported here, so callers import both from one place.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from edgeslice.broker.protocol import PROTOCOL_MAJOR, PROTOCOL_MINOR
from edgeslice.broker.protocol.chunkparse import crc32
from edgeslice.broker.protocol.errors import ProtocolError, TransferError
from edgeslice.broker.protocol.reassembly import (
    MAX_ID_LEN,
    MAX_SEQ,
    NON_ERROR_REASONS,
    PART_COST,
    Completed,
    Reassembler,
    Refused,
    TransferHeader,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE", "KINDS", "MIN_CHUNK_SIZE", "NON_ERROR_REASONS", "PART_COST",
    "Completed", "EncodedTransfer", "Reassembler", "Refused", "TransferHeader",
    "encode_transfer", "new_transfer_id", "split_payload", "stream_transfer",
]  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 256
KINDS = frozenset({"request", "activation", "result", "error", "artifact"})


@dataclass(frozen=True)
class EncodedTransfer:
    """A transfer ready to publish: its header (for logs, retries) and its chunks in order."""

    header: TransferHeader
    chunks: list[bytes]


def new_transfer_id() -> str:
    """A fresh transfer id; a retry is a new transfer (the receiver tombstones old ids)."""
    return uuid.uuid4().hex


def _bin_header(length: int) -> bytes:
    if length < 256:
        return b"\xc4" + length.to_bytes(1, "big")
    if length < 65536:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def _capacity(fixed: int, chunk_size: int) -> int:
    """Largest data length L with ``fixed + len(_bin_header(L)) + L <= chunk_size`` (-1: none)."""
    for header_len, low, high in ((5, 65536, MAX_SEQ), (3, 256, 65535), (2, 0, 255)):
        cap = min(chunk_size - fixed - header_len, high)
        if cap >= low:
            return cap
    return -1


def stream_transfer(
    payload: bytes | bytearray | memoryview,
    *,
    request_id: str,
    kind: str,
    plan_id: str = "",
    plan_version: int = 0,
    stage: int = 0,
    deadline: float = 0.0,
    meta: dict[str, Any] | None = None,
    transfer_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[TransferHeader, Iterator[bytes]]:
    """Split ``payload`` into chunks of at most ``chunk_size`` encoded bytes (header in chunk 0),
    lazily: a sender publishes chunk k while chunk k+1 is still being cut, so the first bytes
    leave at once instead of after the whole payload is copied. ``payload`` must not change
    until the iterator is exhausted.

    ``meta`` is a plain map: for data-plane kinds ``codec.to_wire`` of the transfer's
    :class:`RequestEnvelope`/:class:`ErrorReply`, read back with ``codec.from_wire``.
    Raises ProtocolError for a bad kind, id or meta that msgpack cannot carry (e.g. non-str
    keys), TransferError(reason="too_large") when the header alone does not fit ``chunk_size``.
    """
    tid = transfer_id or new_transfer_id()
    if kind not in KINDS:
        raise ProtocolError(f"transfer kind {kind!r} is not one of {sorted(KINDS)}")
    if len(tid) > MAX_ID_LEN:
        raise ProtocolError(f"transfer id is {len(tid)} chars; at most {MAX_ID_LEN} allowed")
    if chunk_size < MIN_CHUNK_SIZE:
        raise TransferError(f"chunk_size {chunk_size} < {MIN_CHUNK_SIZE}", reason="too_large")
    meta = dict(meta or {})
    try:
        msgpack.unpackb(msgpack.packb(meta), raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"transfer meta cannot be sent as msgpack: {exc}") from exc
    view = memoryview(payload).cast("B")
    total = view.nbytes
    packed_tid = msgpack.packb(tid)
    # fixmap, "t", id, "s", seq (worst case), "x", crc (uint32), "d"
    cap = _capacity(3 + len(packed_tid) + 2 + 5 + 2 + 5 + 2, chunk_size)
    fields: dict[str, Any] = {
        "v": [PROTOCOL_MAJOR, PROTOCOL_MINOR],
        "t": tid,
        "s": 0,
        "r": request_id,
        "k": kind,
        "p": plan_id,
        "pv": plan_version,
        "st": stage,
        "n": MAX_SEQ,  # worst-case encodings while sizing chunk 0
        "l": total,
        "x": 0xFFFFFFFF,  # worst case while sizing chunk 0
        "dl": float(deadline),
        "m": meta,
        "dc": max(cap, 0),
    }
    cap0 = _capacity(len(msgpack.packb({**fields, "d": b""})) - 2, chunk_size)
    if cap0 < 0 or cap < 1:
        raise TransferError(
            f"header of transfer {tid} does not fit chunk_size={chunk_size}; "
            "shrink its meta or raise chunk_size",
            reason="too_large",
        )
    first = min(cap0, total)
    count = 1 + -(-(total - first) // cap)
    if count > MAX_SEQ:
        raise TransferError(f"{total} bytes need {count} chunks; raise chunk_size", "too_large")
    fields["n"] = count
    prefix = b"\x84\xa1t" + packed_tid + b"\xa1s"

    def generate() -> Iterator[bytes]:
        head = view[:first]  # packed as bin by hand: msgpack would copy it twice
        packed = msgpack.packb({**fields, "x": crc32(head), "d": b""})[:-2]  # d: c4 00
        yield b"".join((packed, _bin_header(first), head))
        for seq, offset in enumerate(range(first, total, cap), start=1):
            piece = view[offset : offset + cap]
            crc = b"\xa1x\xce" + crc32(piece).to_bytes(4, "big")
            yield b"".join(
                (prefix, msgpack.packb(seq), crc, b"\xa1d", _bin_header(len(piece)), piece)
            )

    header = TransferHeader(
        tid,
        request_id,
        kind,
        plan_id,
        plan_version,
        stage,
        count,
        total,
        None,  # no whole-payload crc since 1.3: each chunk carries its own (x)
        deadline,
        meta,
        cap,
    )
    return header, generate()


def encode_transfer(
    payload: bytes | bytearray | memoryview,
    *,
    request_id: str,
    kind: str,
    plan_id: str = "",
    plan_version: int = 0,
    stage: int = 0,
    deadline: float = 0.0,
    meta: dict[str, Any] | None = None,
    transfer_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> EncodedTransfer:
    """:func:`stream_transfer` with every chunk built up front (retries, tests, shuffling)."""
    header, chunks = stream_transfer(
        payload,
        request_id=request_id,
        kind=kind,
        plan_id=plan_id,
        plan_version=plan_version,
        stage=stage,
        deadline=deadline,
        meta=meta,
        transfer_id=transfer_id,
        chunk_size=chunk_size,
    )
    return EncodedTransfer(header, list(chunks))


def split_payload(
    payload: bytes | bytearray | memoryview,
    *,
    request_id: str,
    kind: str,
    plan_id: str = "",
    plan_version: int = 0,
    stage: int = 0,
    deadline: float = 0.0,
    meta: dict[str, Any] | None = None,
    transfer_id: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[bytes]:
    """The chunks of :func:`encode_transfer`, for callers that do not need the header back."""
    return encode_transfer(
        payload,
        request_id=request_id,
        kind=kind,
        plan_id=plan_id,
        plan_version=plan_version,
        stage=stage,
        deadline=deadline,
        meta=meta,
        transfer_id=transfer_id,
        chunk_size=chunk_size,
    ).chunks
