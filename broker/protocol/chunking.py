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
    c    0         int        zlib.crc32 of the whole payload
    dl   0         float      deadline, unix seconds; 0.0 = none
    m    0         map        free metadata (tensor specs, route, reply-to, timings)
    d    all       bin        this chunk's slice of the payload, always the last key

Chunk 0 carries the header and as much payload as fits; chunks 1..n-1 carry only t, s, d.
Every encoded chunk is at most ``chunk_size`` bytes. Copies: one when sending (payload slice
into the chunk), one when receiving (the chunks' data, referenced in place, joined once).

:class:`Reassembler` policy: bounds are enforced by *refusing* the transfer that would break
them (never by silently evicting another); a transfer's full ``total_length`` is reserved when
its header arrives, so admitted transfers always have room to finish. A refused or completed
transfer leaves a tombstone for ``max_age_s``: its late chunks (MQTT QoS 1 redelivers) come
back as non-error ``"duplicate"``/``"ignored"`` refusals instead of opening an orphan.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker.protocol import PROTOCOL_MAJOR, PROTOCOL_MINOR
from broker.protocol.errors import ProtocolError, TransferError

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 256
KINDS = frozenset({"request", "activation", "result", "error", "artifact"})
NON_ERROR_REASONS = frozenset({"duplicate", "ignored"})
_MAX_SEQ = 2**32 - 1
_MAX_ID_LEN = 256
_MiB = 1024 * 1024
PART_COST = 128  # bytes of bookkeeping charged per buffered chunk


@dataclass(frozen=True)
class TransferHeader:
    """What chunk 0 says about the whole transfer."""

    transfer_id: str
    request_id: str
    kind: str
    plan_id: str
    plan_version: int
    stage: int
    total_chunks: int
    total_length: int
    checksum: int
    deadline: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedTransfer:
    """A transfer ready to publish: its header (for logs, retries) and its chunks in order."""

    header: TransferHeader
    chunks: list[bytes]


@dataclass(frozen=True)
class Completed:
    """A transfer whose chunks all arrived and whose checksum matches."""

    header: TransferHeader
    payload: bytearray  # owned by the receiver: unpack_tensors wraps it without a copy
    first_chunk_at: float = 0.0  # ``now`` of its first chunk: transfer time = done - this


@dataclass(frozen=True)
class Refused:
    """A chunk or a whole transfer that was dropped, and why (``reason`` is one short word)."""

    transfer_id: str
    reason: str
    detail: str
    header: TransferHeader | None = None

    @property
    def is_error(self) -> bool:
        """False for redeliveries ("duplicate", "ignored") that callers should just skip."""
        return self.reason not in NON_ERROR_REASONS


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
    for header_len, low, high in ((5, 65536, _MAX_SEQ), (3, 256, 65535), (2, 0, 255)):
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

    Raises ProtocolError for a bad kind, id or meta that msgpack cannot carry (e.g. non-str
    keys), TransferError(reason="too_large") when the header alone does not fit ``chunk_size``.
    """
    tid = transfer_id or new_transfer_id()
    if kind not in KINDS:
        raise ProtocolError(f"transfer kind {kind!r} is not one of {sorted(KINDS)}")
    if len(tid) > _MAX_ID_LEN:
        raise ProtocolError(f"transfer id is {len(tid)} chars; at most {_MAX_ID_LEN} allowed")
    if chunk_size < MIN_CHUNK_SIZE:
        raise TransferError(f"chunk_size {chunk_size} < {MIN_CHUNK_SIZE}", reason="too_large")
    meta = dict(meta or {})
    try:
        msgpack.unpackb(msgpack.packb(meta), raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"transfer meta cannot be sent as msgpack: {exc}") from exc
    view = memoryview(payload).cast("B")
    total = view.nbytes
    checksum = zlib.crc32(view)
    fields: dict[str, Any] = {
        "v": [PROTOCOL_MAJOR, PROTOCOL_MINOR],
        "t": tid,
        "s": 0,
        "r": request_id,
        "k": kind,
        "p": plan_id,
        "pv": plan_version,
        "st": stage,
        "n": _MAX_SEQ,  # worst-case encodings while sizing chunk 0
        "l": total,
        "c": 0xFFFFFFFF,
        "dl": float(deadline),
        "m": meta,
    }
    cap0 = _capacity(len(msgpack.packb({**fields, "d": b""})) - 2, chunk_size)
    packed_tid = msgpack.packb(tid)
    cap = _capacity(3 + len(packed_tid) + 2 + 5 + 2, chunk_size)  # fixmap, t, id, s, seq, d
    if cap0 < 0 or cap < 1:
        raise TransferError(
            f"header of transfer {tid} does not fit chunk_size={chunk_size}; "
            "shrink its meta or raise chunk_size",
            reason="too_large",
        )
    first = min(cap0, total)
    count = 1 + -(-(total - first) // cap)
    if count > _MAX_SEQ:
        raise TransferError(f"{total} bytes need {count} chunks; raise chunk_size", "too_large")
    fields["n"] = count
    fields["c"] = checksum
    prefix = b"\x83\xa1t" + packed_tid + b"\xa1s"

    def generate() -> Iterator[bytes]:
        yield msgpack.packb({**fields, "d": view[:first]})
        for seq, offset in enumerate(range(first, total, cap), start=1):
            piece = view[offset : offset + cap]
            yield b"".join((prefix, msgpack.packb(seq), b"\xa1d", _bin_header(len(piece)), piece))

    header = TransferHeader(
        tid, request_id, kind, plan_id, plan_version, stage, count, total, checksum, deadline, meta
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


_Piece = bytes | memoryview
_HEADER_FIELDS: tuple[tuple[str, type], ...] = (
    ("r", str), ("k", str), ("p", str), ("pv", int), ("st", int), ("n", int), ("l", int),
    ("c", int), ("m", dict),
)  # fmt: skip


def _parse_data_chunk(buf: bytes) -> tuple[str, int, memoryview] | None:
    """Fast path for the exact layout encode_transfer writes for chunks 1..n-1, without
    copying the data; None sends the chunk down the general (msgpack) path."""
    try:
        if buf[0] != 0x83 or buf[1:3] != b"\xa1t":
            return None
        tag, pos = buf[3], 4
        if 0xA1 <= tag <= 0xBF:
            size = tag & 0x1F
        elif tag == 0xD9:
            size, pos = buf[4], 5
        else:
            return None
        tid = str(buf[pos : pos + size], "utf-8")
        pos += size
        if not tid:
            return None
        if buf[pos : pos + 2] != b"\xa1s":
            return None
        tag, pos = buf[pos + 2], pos + 3
        widths = {0xCC: 1, 0xCD: 2, 0xCE: 4}
        if tag <= 0x7F:
            seq = tag
        elif tag in widths:
            seq = int.from_bytes(buf[pos : pos + widths[tag]], "big")
            pos += widths[tag]
        else:
            return None
        if seq == 0 or buf[pos : pos + 2] != b"\xa1d":
            return None
        tag, pos = buf[pos + 2], pos + 3
        widths = {0xC4: 1, 0xC5: 2, 0xC6: 4}
        if tag not in widths:
            return None
        size = int.from_bytes(buf[pos : pos + widths[tag]], "big")
        pos += widths[tag]
    except (IndexError, UnicodeDecodeError):
        return None
    if pos + size != len(buf):
        return None
    return tid, seq, memoryview(buf)[pos:]


def _parse_chunk(buf: bytes) -> tuple[str, int, _Piece, TransferHeader | None] | Refused:
    """Any chunk, through bounded msgpack: (transfer id, seq, data, header if seq 0)."""
    try:
        obj = msgpack.unpackb(
            buf, raw=False, strict_map_key=True, max_ext_len=0, max_map_len=10_000,
            max_array_len=100_000, max_str_len=_MiB,
        )  # fmt: skip
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ...
        return Refused("", "malformed", f"chunk is not msgpack: {type(exc).__name__}: {exc}")
    if not isinstance(obj, dict):
        return Refused("", "malformed", f"chunk is a msgpack {type(obj).__name__}, not a map")
    tid, seq, data = obj.get("t"), obj.get("s"), obj.get("d")
    if type(tid) is not str or not 0 < len(tid) <= _MAX_ID_LEN:
        return Refused("", "malformed", f"chunk field t (transfer id) is bad: {tid!r:.80}")
    if type(seq) is not int or not 0 <= seq <= _MAX_SEQ or not isinstance(data, bytes):
        return Refused(tid, "malformed", "chunk fields s (int seq) and d (bin data) are required")
    if seq > 0:
        return tid, seq, data, None
    version = obj.get("v")
    if not (isinstance(version, list) and len(version) >= 2 and type(version[0]) is int):
        return Refused(tid, "malformed", "header chunk (seq 0) lacks field v = [major, minor]")
    if version[0] != PROTOCOL_MAJOR:
        return Refused(
            tid, "version", f"sender speaks protocol major {version[0]}, this receiver "
            f"{PROTOCOL_MAJOR}; upgrade edgeslice on the older side",
        )  # fmt: skip
    for key, kind in _HEADER_FIELDS:
        value: Any = obj.get(key)
        if type(value) is not kind or (type(value) is int and value < 0):
            return Refused(tid, "malformed", f"header field {key} is {value!r:.80}, not {kind}")
    deadline = obj.get("dl", 0.0)
    if type(deadline) not in (int, float) or not 0.0 <= deadline < float("inf"):
        return Refused(tid, "malformed", f"header field dl (deadline) is {deadline!r:.80}")
    total_chunks, total_length = obj["n"], obj["l"]
    if not 1 <= total_chunks <= min(total_length + 1, _MAX_SEQ) or obj["c"] > 0xFFFFFFFF:
        return Refused(tid, "malformed", f"header claims {total_chunks} chunks, {total_length} B")
    header = TransferHeader(
        tid, obj["r"], obj["k"], obj["p"], obj["pv"], obj["st"], total_chunks, total_length,
        obj["c"], float(deadline), obj["m"],
    )  # fmt: skip
    return tid, 0, data, header


class _Open:
    """One transfer being reassembled: the parts received so far, keyed by seq."""

    __slots__ = ("charged", "first_seen", "header", "parts", "received")

    def __init__(self, now: float) -> None:
        self.header: TransferHeader | None = None
        self.parts: dict[int, _Piece] = {}
        self.received = 0  # data bytes held
        self.charged = 0  # bytes counted against max_buffered_bytes (total_length once known)
        self.first_seen = now


class Reassembler:
    """Turns chunks, in any order and with duplicates, back into payloads; never raises on input.

    ``feed`` returns Completed, Refused (``is_error`` False for redeliveries) or None (need
    more). Refusal reasons: malformed, version, too_large, stale_plan, expired (deadline past),
    checksum, too_many_open, buffer_full, timed_out (older than max_age_s), duplicate, ignored.
    Memory is bounded by ``max_buffered_bytes`` counting each part's bookkeeping
    (``PART_COST`` bytes) too, so a flood of tiny chunks cannot exhaust memory either.
    """

    def __init__(
        self,
        max_open: int = 64,
        max_buffered_bytes: int = 512 * _MiB,
        max_age_s: float = 60.0,
        max_transfer_bytes: int = 1024 * _MiB,
        max_chunk_bytes: int = 16 * _MiB,
    ) -> None:
        self.max_open = max_open
        self.max_buffered_bytes = max_buffered_bytes
        self.max_age_s = max_age_s
        self.max_transfer_bytes = max_transfer_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self._open: dict[str, _Open] = {}
        self._done: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (when, outcome)
        self._max_done = max(1024, 16 * max_open)
        self._min_version: dict[str, int] = {}
        self._charged = 0  # reserved against max_buffered_bytes
        self._buffered = 0

    @property
    def open_transfers(self) -> int:
        return len(self._open)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held right now (not counting reservations for bytes still to come)."""
        return self._buffered

    def feed(self, data: bytes | bytearray | memoryview, now: float) -> Completed | Refused | None:
        """Take one chunk (an MQTT payload) received at ``now``; None means "need more"."""
        buf = data if type(data) is bytes else bytes(data)  # keep no view of a caller's buffer
        if len(buf) > self.max_chunk_bytes:
            return Refused("", "too_large", f"chunk of {len(buf)} B > {self.max_chunk_bytes} B")
        fast = _parse_data_chunk(buf)
        parsed = (*fast, None) if fast is not None else _parse_chunk(buf)
        if isinstance(parsed, Refused):
            if parsed.transfer_id and parsed.transfer_id not in self._done:
                return self._drop(parsed.transfer_id, parsed.reason, parsed.detail, now)
            return parsed
        tid, seq, piece, header = parsed
        if tid in self._done:
            outcome = self._done[tid][1]
            if outcome == "completed":
                return Refused(tid, "duplicate", f"chunk {seq} of an already completed transfer")
            return Refused(tid, "ignored", f"chunk {seq} of a transfer refused as {outcome}")
        if seq > 0 and not piece:
            return self._drop(tid, "malformed", f"chunk {seq} carries no data", now)
        entry = self._open.get(tid)
        if entry is None:
            if len(self._open) >= self.max_open:
                detail = f"{len(self._open)} transfers open (max_open={self.max_open}); retry later"
                return self._drop(tid, "too_many_open", detail, now, header)
            entry = self._open[tid] = _Open(now)
        if seq in entry.parts:
            if header is not None and header != entry.header:
                return self._drop(tid, "malformed", "a second header chunk disagrees", now)
            return Refused(tid, "duplicate", f"chunk {seq} already received", entry.header)
        if header is not None and (refusal := self._admit(tid, entry, header, now)):
            return refusal
        known = entry.header
        if known is None:  # data before its header: buffer it, bounded (seq checked later)
            cost = len(piece) + PART_COST
            if entry.received + len(piece) > self.max_transfer_bytes:
                return self._drop(tid, "too_large", "chunks before the header exceed limit", now)
            if self._charged + cost > self.max_buffered_bytes:
                return self._drop(tid, "buffer_full", self._full_detail(cost), now)
            entry.charged += cost
            self._charged += cost
        elif seq >= known.total_chunks or entry.received + len(piece) > known.total_length:
            detail = f"chunk {seq} ({len(piece)} B) overflows the header's "
            detail += f"{known.total_chunks} chunks / {known.total_length} B"
            return self._drop(tid, "malformed", detail, now)
        elif 0.0 < known.deadline < now:
            return self._drop(
                tid, "expired", f"deadline passed {now - known.deadline:.3f}s ago", now
            )
        entry.parts[seq] = piece
        entry.received += len(piece)
        self._buffered += len(piece)
        if known is not None and len(entry.parts) == known.total_chunks:
            return self._complete(tid, entry, now)
        return None

    def set_min_plan_version(self, plan_id: str, version: int) -> list[Refused]:
        """Refuse transfers of ``plan_id`` older than ``version`` from now on; the open ones
        are dropped at once (and returned) so their memory is freed."""
        floor = self._min_version[plan_id] = max(version, self._min_version.get(plan_id, 0))
        stale = [
            (tid, entry.first_seen)
            for tid, entry in self._open.items()
            if entry.header and entry.header.plan_id == plan_id
            and entry.header.plan_version < floor
        ]  # fmt: skip
        detail = f"plan {plan_id} is now v{floor}"
        return [self._drop(tid, "stale_plan", detail, when) for tid, when in stale]

    def expire(self, now: float) -> list[Refused]:
        """Drop transfers past their deadline ("expired") or older than max_age_s ("timed_out")."""
        refused = []
        for tid, entry in list(self._open.items()):
            header, age = entry.header, now - entry.first_seen
            if header is not None and 0.0 < header.deadline < now:
                refused.append(self._drop(tid, "expired", f"deadline passed, {age:.1f}s old", now))
            elif age > self.max_age_s:
                total = header.total_chunks if header is not None else "?"
                detail = f"only {len(entry.parts)} of {total} chunks arrived in {age:.1f}s"
                refused.append(self._drop(tid, "timed_out", detail, now))
        while self._done and now - next(iter(self._done.values()))[0] > self.max_age_s:
            self._done.popitem(last=False)
        return refused

    def _admit(self, tid: str, entry: _Open, header: TransferHeader, now: float) -> Refused | None:
        """Check a header chunk against the limits, then reserve room for the whole transfer."""
        floor = self._min_version.get(header.plan_id, 0)
        if header.total_length > self.max_transfer_bytes:
            reason, detail = "too_large", f"{header.total_length} B > {self.max_transfer_bytes} B"
        elif header.plan_version < floor:
            reason = "stale_plan"
            detail = f"plan {header.plan_id} v{header.plan_version} < current v{floor}"
        elif 0.0 < header.deadline < now:
            reason, detail = "expired", f"deadline passed {now - header.deadline:.3f}s ago"
        elif (
            entry.received > header.total_length
            or max(entry.parts, default=0) >= header.total_chunks
        ):
            reason, detail = "malformed", "chunks that arrived before the header exceed it"
        else:
            extra = header.total_length + header.total_chunks * PART_COST - entry.charged
            if self._charged + extra <= self.max_buffered_bytes:
                self._charged += extra
                entry.charged += extra
                entry.header = header
                return None
            reason, detail = "buffer_full", self._full_detail(extra)
        return self._drop(tid, reason, detail, now, header)

    def _complete(self, tid: str, entry: _Open, now: float) -> Completed | Refused:
        header = entry.header
        assert header is not None
        if entry.received != header.total_length:
            detail = f"chunks carry {entry.received} B, header says {header.total_length} B"
            return self._drop(tid, "malformed", detail, now)
        if 0.0 < header.deadline < now:
            return self._drop(tid, "expired", "deadline passed while reassembling", now)
        # a bytearray, so unpack_tensors can wrap it without another copy
        payload = bytearray(header.total_length)
        view, offset = memoryview(payload), 0
        for seq in range(header.total_chunks):
            part = entry.parts[seq]
            view[offset : offset + len(part)] = part
            offset += len(part)
        view.release()
        crc = zlib.crc32(payload)
        if crc != header.checksum:
            detail = f"crc32 {crc:#010x} != {header.checksum:#010x}: corrupted in transit; resend"
            return self._drop(tid, "checksum", detail, now)
        self._release(tid, entry)
        self._tombstone(tid, "completed", now)
        return Completed(header, payload, entry.first_seen)

    def _drop(
        self, tid: str, reason: str, detail: str, now: float, header: TransferHeader | None = None
    ) -> Refused:
        entry = self._open.get(tid)
        if entry is not None:
            self._release(tid, entry)
            header = header or entry.header
        self._tombstone(tid, reason, now)
        log.debug("transfer=%s refused reason=%s: %s", tid, reason, detail)
        return Refused(tid, reason, detail, header)

    def _release(self, tid: str, entry: _Open) -> None:
        del self._open[tid]
        self._charged -= entry.charged
        self._buffered -= entry.received

    def _tombstone(self, tid: str, outcome: str, now: float) -> None:
        self._done[tid] = (now, outcome)
        while len(self._done) > self._max_done:
            self._done.popitem(last=False)

    def _full_detail(self, extra: int) -> str:
        return (
            f"{extra} B more would exceed max_buffered_bytes={self.max_buffered_bytes} "
            f"({self._charged} B reserved by {len(self._open)} transfers); retry later"
        )
