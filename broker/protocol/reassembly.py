"""Receiving chunked transfers: parse chunks, put payloads back together, bounded and safe.

Wire format and sending side: :mod:`broker.protocol.chunking` (which re-exports this module).
With the header's chunk capacity (``dc``) each data chunk is copied once, as it arrives, to its
offset in the final bytearray (grown in order, so pages are touched as data comes, not all at
the header) and crc32 runs over the in-order prefix meanwhile: completion is O(1), not a join
plus a checksum pass after the last chunk (CPU the receiver's paho thread would wait for).
Without ``dc`` (older senders) chunks are joined at completion.
Limits are enforced by *refusing* the transfer that would break them, never by evicting another.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from edgeslice.broker.protocol import PROTOCOL_MAJOR

log = logging.getLogger(__name__)

NON_ERROR_REASONS = frozenset({"duplicate", "ignored"})
PART_COST = 128  # bytes of bookkeeping charged per buffered chunk
MAX_SEQ, MAX_ID_LEN = 2**32 - 1, 256  # highest sequence number, longest transfer id
_MiB = 1024 * 1024


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
    chunk_capacity: int = 0  # data bytes in each of chunks 1..n-2 (field dc); 0 = not announced


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


_Piece = bytes | memoryview
_HEADER_FIELDS: tuple[tuple[str, type], ...] = (
    ("r", str), ("k", str), ("p", str), ("pv", int), ("st", int), ("n", int), ("l", int),
    ("c", int), ("m", dict),
)  # fmt: skip
_FIXSTR, _FIXINT, _NOFIX = range(0xA0, 0xC0), range(0x80), range(0)
_STR8, _UINT, _BIN = {0xD9: 1}, {0xCC: 1, 0xCD: 2, 0xCE: 4}, {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _field(buf: bytes, pos: int, key: bytes, fix: range, wide: dict[int, int]) -> tuple[int, int]:
    """Past the packed one-letter ``key`` at ``pos``: the length or uint there, as a fix-form
    tag in ``fix`` or a tag in ``wide`` (tag -> byte width), and where it ends; -1 if neither."""
    if buf[pos : pos + 2] != key:
        return -1, pos
    tag, width = buf[pos + 2], wide.get(buf[pos + 2], 0)
    if tag in fix:
        return tag - fix.start, pos + 3
    value = int.from_bytes(buf[pos + 3 : pos + 3 + width], "big") if width else -1
    return value, pos + 3 + width


def _parse_data_chunk(buf: bytes) -> tuple[str, int, memoryview] | None:
    """Fast path for the exact layout the sender writes for chunks 1..n-1 (t, s, d), without
    copying the data; None sends the chunk down the general (msgpack) path."""
    try:
        size, pos = _field(buf, 1, b"\xa1t", _FIXSTR, _STR8) if buf[0] == 0x83 else (-1, 0)
        tid = str(buf[pos : pos + size], "utf-8") if size > 0 else ""
        seq, pos = _field(buf, pos + size, b"\xa1s", _FIXINT, _UINT) if tid else (-1, 0)
        size, pos = _field(buf, pos, b"\xa1d", _NOFIX, _BIN) if seq > 0 else (-1, 0)
    except (IndexError, UnicodeDecodeError):
        return None
    if size < 0 or pos + size != len(buf):
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
    if type(tid) is not str or not 0 < len(tid) <= MAX_ID_LEN:
        return Refused("", "malformed", f"chunk field t (transfer id) is bad: {tid!r:.80}")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ or not isinstance(data, bytes):
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
    checks = (*_HEADER_FIELDS, ("dc", int)) if "dc" in obj else _HEADER_FIELDS  # dc: optional
    for key, kind in checks:
        value: Any = obj.get(key)
        if type(value) is not kind or (type(value) is int and value < 0):
            return Refused(tid, "malformed", f"header field {key} is {value!r:.80}, not {kind}")
    deadline = obj.get("dl", 0.0)
    if type(deadline) not in (int, float) or not 0.0 <= deadline < float("inf"):
        return Refused(tid, "malformed", f"header field dl (deadline) is {deadline!r:.80}")
    total_chunks, total_length = obj["n"], obj["l"]
    if not 1 <= total_chunks <= min(total_length + 1, MAX_SEQ) or obj["c"] > 0xFFFFFFFF:
        return Refused(tid, "malformed", f"header claims {total_chunks} chunks, {total_length} B")
    header = TransferHeader(
        tid, obj["r"], obj["k"], obj["p"], obj["pv"], obj["st"], total_chunks, total_length,
        obj["c"], float(deadline), obj["m"], obj.get("dc", 0),
    )  # fmt: skip
    return tid, 0, data, header


class _Open:
    """One transfer being reassembled: its data in ``parts`` (no layout known yet) or placed in
    ``payload`` (layout known), where ``crc`` covers the data of chunks ``0 .. crc_next-1``."""

    __slots__ = ("cap", "charged", "crc", "crc_next", "first", "first_seen", "header", "parts",
                 "payload", "received", "seen")  # fmt: skip

    def __init__(self, now: float) -> None:
        self.header: TransferHeader | None = None
        self.seen: set[int] = set()  # sequence numbers received
        self.parts: dict[int, _Piece] = {}  # data not placed into ``payload`` (yet)
        self.payload: bytearray | None = None  # the final buffer, once the layout is known
        self.first = self.cap = 0  # data bytes in chunk 0; in each later chunk (but the last)
        self.crc = self.crc_next = 0
        self.received = self.charged = 0  # data bytes held; bytes reserved (see Reassembler)
        self.first_seen = now

    def slot(self, seq: int, total: int) -> tuple[int, int]:
        start = 0 if seq == 0 else self.first + (seq - 1) * self.cap
        return start, self.first if seq == 0 else min(start + self.cap, total)

    def place(self, seq: int, piece: _Piece) -> str | None:
        """Copy ``piece`` into its slot of ``payload`` and extend the crc over the in-order
        prefix; a detail string if the piece does not fit its slot."""
        payload, header = self.payload, self.header
        assert payload is not None and header is not None
        start, end = self.slot(seq, header.total_length)
        if len(piece) != end - start:
            return f"chunk {seq} carries {len(piece)} B; the header's layout puts {end - start} B"
        if start > len(payload):  # ahead of the data so far: zeros until its gap is filled
            payload += bytes(start - len(payload))
        payload[start:end] = piece  # at the end this grows it: no page is touched before use
        self.seen.add(seq)
        with memoryview(payload) as view:
            while self.crc_next in self.seen:  # in order: just this piece, while it is hot
                start, end = self.slot(self.crc_next, len(view))
                self.crc = zlib.crc32(view[start:end], self.crc)
                self.crc_next += 1
        return None


class Reassembler:
    """Turns chunks, in any order and with duplicates, back into payloads; never raises on input.
    A transfer's ``total_length`` is reserved when its header arrives, so admitted transfers can
    always finish; refused and completed ones leave a tombstone for ``max_age_s``, so late chunks
    (QoS 1 redelivers) come back as non-error "duplicate"/"ignored" instead of opening orphans.

    ``feed`` returns Completed, Refused (``is_error`` False for redeliveries) or None (need
    more). Refusal reasons: malformed, version, too_large, stale_plan, expired (deadline past),
    checksum, too_many_open, buffer_full, timed_out (older than max_age_s), duplicate, ignored.
    Memory is bounded by ``max_buffered_bytes`` counting each part's bookkeeping
    (``PART_COST`` bytes) too, so a flood of tiny chunks cannot exhaust memory either.
    """

    def __init__(
        self, max_open: int = 64, max_buffered_bytes: int = 512 * _MiB, max_age_s: float = 60.0,
        max_transfer_bytes: int = 1024 * _MiB, max_chunk_bytes: int = 16 * _MiB,
    ) -> None:  # fmt: skip
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
        if seq in entry.seen:
            if header is not None and header != entry.header:
                return self._drop(tid, "malformed", "a second header chunk disagrees", now)
            return Refused(tid, "duplicate", f"chunk {seq} already received", entry.header)
        if header is not None and (refusal := self._admit(tid, entry, header, len(piece), now)):
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
            late = f"deadline passed {now - known.deadline:.3f}s ago"
            return self._drop(tid, "expired", late, now)
        if entry.payload is None:
            entry.parts[seq] = piece
            entry.seen.add(seq)
        elif misfit := entry.place(seq, piece):
            return self._drop(tid, "malformed", misfit, now)
        entry.received += len(piece)
        self._buffered += len(piece)
        if known is not None and len(entry.seen) == known.total_chunks:
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
                detail = f"only {len(entry.seen)} of {total} chunks arrived in {age:.1f}s"
                refused.append(self._drop(tid, "timed_out", detail, now))
        while self._done and now - next(iter(self._done.values()))[0] > self.max_age_s:
            self._done.popitem(last=False)
        return refused

    def _admit(
        self, tid: str, entry: _Open, header: TransferHeader, first: int, now: float
    ) -> Refused | None:
        """Check a header chunk (carrying ``first`` data bytes) against the limits, reserve room
        for the whole transfer and, if it announces its layout, allocate the final buffer."""
        floor = self._min_version.get(header.plan_id, 0)
        n, length, cap = header.total_chunks, header.total_length, header.chunk_capacity
        if length > self.max_transfer_bytes:
            reason, detail = "too_large", f"{length} B > {self.max_transfer_bytes} B"
        elif header.plan_version < floor:
            reason = "stale_plan"
            detail = f"plan {header.plan_id} v{header.plan_version} < current v{floor}"
        elif 0.0 < header.deadline < now:
            reason, detail = "expired", f"deadline passed {now - header.deadline:.3f}s ago"
        elif entry.received > length or max(entry.parts, default=0) >= n:
            reason, detail = "malformed", "chunks that arrived before the header exceed it"
        elif cap and first <= length and n != 1 + -(-(length - first) // cap):
            reason, detail = "malformed", f"dc={cap}, n={n}, l={length} disagree with chunk 0"
        else:
            extra = length + n * PART_COST - entry.charged
            if self._charged + extra <= self.max_buffered_bytes:
                self._charged += extra
                entry.charged += extra
                entry.header = header
                if cap and first <= length:  # the layout is known: allocate the final buffer
                    entry.payload, entry.first, entry.cap = bytearray(), first, cap
                    for seq, part in sorted(entry.parts.items()):  # data before the header
                        if misfit := entry.place(seq, part):
                            return self._drop(tid, "malformed", misfit, now)
                    entry.parts.clear()
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
        payload, crc = entry.payload, entry.crc  # placed as they came; crc ran alongside
        if payload is None:  # no layout: join now (a bytearray: unpack_tensors wraps it)
            payload = bytearray().join(entry.parts[seq] for seq in range(header.total_chunks))
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
