"""Receiving chunked transfers: put payloads back together, bounded per sender, and safe.

Wire format and sending side: :mod:`broker.protocol.chunking` (which re-exports this module);
parsing a received chunk: :mod:`broker.protocol.chunkparse`. Since protocol 1.3 every chunk
carries the crc32 of its own data (``x``), checked as it arrives: one corrupted chunk refuses
its transfer ("checksum") at once, and completion is O(1). With the header's chunk capacity
(``dc``) each data chunk is copied once, as it arrives, to its offset in the final bytearray
(grown in order, so pages are touched as data comes, not all at the header). Older senders:
without ``dc`` chunks are joined at completion; a whole-payload crc (``c``, before 1.3) runs
over the in-order prefix as chunks are placed, or over the joined payload.

Bounds: open transfers and reserved bytes, in total and per *sender* (the listener names the
sender from the topic it came on, never from the payload), so one flooding publisher cannot
block everyone else. A limit that is hit first evicts the least recently active transfer in
its scope when that one has been idle for ``evict_after_s`` (a half-finished transfer nobody
is finishing), and refuses the fresh transfer only when nothing is idle. ``expire`` drops
transfers idle for ``idle_s`` or older than ``max_age_s``, so everyone recovers within seconds
once a flood stops.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from edgeslice.broker.protocol.chunkparse import (
    MAX_ID_LEN,
    MAX_SEQ,
    NON_ERROR_REASONS,
    PART_COST,
    Completed,
    Piece,
    Refused,
    TransferHeader,
    crc32,
    parse_chunk,
    parse_data_chunk,
)

__all__ = [
    "MAX_ID_LEN", "MAX_SEQ", "NON_ERROR_REASONS", "PART_COST", "Completed", "Reassembler",
    "Refused", "TransferHeader",
]  # fmt: skip

log = logging.getLogger(__name__)
_MiB = 1024 * 1024
Accept = Callable[[TransferHeader], str | None]  # a header -> None to admit, else why not


class _Open:
    """One transfer being reassembled: its data in ``parts`` (no layout known yet) or placed in
    ``payload`` (layout known), where ``crc`` covers the data of chunks ``0 .. crc_next-1``
    (whole-payload crc of senders before 1.3); ``unchecked``: chunks without a crc of their own."""

    __slots__ = ("cap", "charged", "crc", "crc_next", "first", "first_seen", "header",
                 "last_seen", "parts", "payload", "received", "seen", "sender",
                 "unchecked")  # fmt: skip

    def __init__(self, now: float, sender: str) -> None:
        self.header: TransferHeader | None = None
        self.seen: set[int] = set()  # sequence numbers received
        self.parts: dict[int, Piece] = {}  # data not placed into ``payload`` (yet)
        self.payload: bytearray | None = None  # the final buffer, once the layout is known
        self.first = self.cap = 0  # data bytes in chunk 0; in each later chunk (but the last)
        self.crc = self.crc_next = self.unchecked = 0
        self.received = self.charged = 0  # data bytes held; bytes reserved (see Reassembler)
        self.first_seen = self.last_seen = now  # first chunk; latest chunk that added data
        self.sender = sender

    def slot(self, seq: int, total: int) -> tuple[int, int]:
        start = 0 if seq == 0 else self.first + (seq - 1) * self.cap
        return start, self.first if seq == 0 else min(start + self.cap, total)

    def place(self, seq: int, piece: Piece) -> str | None:
        """Copy ``piece`` into its slot of ``payload`` and extend a whole-payload crc over the
        in-order prefix; a detail string if the piece does not fit its slot."""
        payload, header = self.payload, self.header
        assert payload is not None and header is not None
        start, end = self.slot(seq, header.total_length)
        if len(piece) != end - start:
            return f"chunk {seq} carries {len(piece)} B; the header's layout puts {end - start} B"
        if start > len(payload):  # ahead of the data so far: zeros until its gap is filled
            payload += bytes(start - len(payload))
        payload[start:end] = piece  # at the end this grows it: no page is touched before use
        self.seen.add(seq)
        if header.checksum is None:  # 1.3: each chunk's own crc was checked on arrival
            return None
        with memoryview(payload) as view:
            while self.crc_next in self.seen:  # in order: just this piece, while it is hot
                start, end = self.slot(self.crc_next, len(view))
                self.crc = crc32(view[start:end], self.crc)
                self.crc_next += 1
        return None


class Reassembler:
    """Turns chunks, in any order and with duplicates, back into payloads; never raises on input.
    A transfer's ``total_length`` is reserved when its header arrives, so admitted transfers can
    always finish; refused and completed ones leave a tombstone for ``max_age_s``, so late chunks
    (QoS 1 redelivers) come back as non-error "duplicate"/"ignored" instead of opening orphans.

    ``feed(chunk, now, sender)`` returns Completed, Refused (``is_error`` False for
    redeliveries) or None (need more). Refusal reasons: malformed, version, too_large,
    stale_plan, expired (deadline past), checksum, too_many_open, buffer_full, timed_out (idle
    for ``idle_s`` or older than ``max_age_s``), evicted (idle, made room for a fresh one),
    unexpected (``accept`` said no), duplicate, ignored. Evictions happen inside ``feed``;
    their refusals are handed out by the next ``expire`` call (at most ``max_open`` kept).
    Memory is bounded by ``max_buffered_bytes`` counting each part's bookkeeping
    (``PART_COST`` bytes) too, so a flood of tiny chunks cannot exhaust memory either.
    Per-sender limits default to the totals: listeners that know their senders set them.
    """

    def __init__(
        self, max_open: int = 64, max_buffered_bytes: int = 512 * _MiB, max_age_s: float = 60.0,
        max_transfer_bytes: int = 1024 * _MiB, max_chunk_bytes: int = 16 * _MiB, *,
        max_open_per_sender: int | None = None, max_bytes_per_sender: int | None = None,
        idle_s: float = 5.0, evict_after_s: float = 1.0, accept: Accept | None = None,
    ) -> None:  # fmt: skip
        self.max_open = max_open
        self.max_buffered_bytes = max_buffered_bytes
        self.max_age_s = max_age_s
        self.max_transfer_bytes = max_transfer_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.max_open_per_sender = max_open_per_sender or max_open
        self.max_bytes_per_sender = max_bytes_per_sender or max_buffered_bytes
        self.idle_s = idle_s
        self.evict_after_s = evict_after_s
        self.accept = accept
        self._open: OrderedDict[str, _Open] = OrderedDict()  # least recently active first
        self._done: OrderedDict[str, tuple[float, str]] = OrderedDict()  # id -> (when, outcome)
        self._max_done = max(1024, 16 * max_open)
        self._min_version: dict[str, int] = {}
        self._charged = 0  # reserved against max_buffered_bytes
        self._buffered = 0
        self._sender_open: Counter[str] = Counter()
        self._sender_charged: Counter[str] = Counter()
        self._evicted: deque[Refused] = deque(maxlen=max(16, max_open))

    @property
    def open_transfers(self) -> int:
        return len(self._open)

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held right now (not counting reservations for bytes still to come)."""
        return self._buffered

    def held_by(self, sender: str) -> tuple[int, int]:
        """(open transfers, reserved bytes) of one sender right now."""
        return self._sender_open[sender], self._sender_charged[sender]

    def feed(
        self, data: bytes | bytearray | memoryview, now: float, sender: str = ""
    ) -> Completed | Refused | None:
        """Take one chunk (an MQTT payload) received at ``now`` from ``sender`` (named by the
        listener from the topic); None means "need more"."""
        buf = data if type(data) is bytes else bytes(data)  # keep no view of a caller's buffer
        if len(buf) > self.max_chunk_bytes:
            detail = f"chunk of {len(buf)} B > {self.max_chunk_bytes} B"
            return Refused("", "too_large", detail, sender=sender)
        parsed = parse_data_chunk(buf) or parse_chunk(buf)
        if isinstance(parsed, Refused):
            tid = parsed.transfer_id
            if tid and tid not in self._done and self._owned(tid, sender):
                return self._drop(tid, parsed.reason, parsed.detail, now, sender=sender)
            return Refused(tid, parsed.reason, parsed.detail, sender=sender)
        tid, seq, piece, crc, header = parsed
        if tid in self._done:
            outcome = self._done[tid][1]
            if outcome == "completed":
                detail = f"chunk {seq} of an already completed transfer"
                return Refused(tid, "duplicate", detail, sender=sender)
            return Refused(tid, "ignored", f"chunk {seq} of a transfer refused as {outcome}")
        if not self._owned(tid, sender):  # another sender's transfer id: not its to touch
            return Refused(
                tid, "malformed", "transfer id is in use by another sender", None, sender
            )
        if seq > 0 and not piece:
            return self._drop(tid, "malformed", f"chunk {seq} carries no data", now, sender=sender)
        entry = self._open.get(tid)
        if entry is None:
            if full := self._make_room(sender, 1, 0, now, ""):
                return self._drop(tid, *full, now, header, sender)
            entry = self._open[tid] = _Open(now, sender)
            self._sender_open[sender] += 1
        if seq in entry.seen:
            if header is not None and header != entry.header:
                return self._drop(tid, "malformed", "a second header chunk disagrees", now)
            return Refused(tid, "duplicate", f"chunk {seq} already received", entry.header, sender)
        if crc is None:
            entry.unchecked += 1
        elif (actual := crc32(piece)) != crc:
            detail = f"chunk {seq} of transfer {tid}: crc32 {actual:#010x} != {crc:#010x}, "
            return self._drop(tid, "checksum", detail + "corrupted in transit; resend", now, header)
        if header is not None and (refusal := self._admit(tid, entry, header, len(piece), now)):
            return refusal
        known = entry.header
        if known is None:  # data before its header: buffer it, bounded (seq checked later)
            cost = len(piece) + PART_COST
            if entry.received + len(piece) > self.max_transfer_bytes:
                return self._drop(tid, "too_large", "chunks before the header exceed limit", now)
            if full := self._make_room(sender, 0, cost, now, tid):
                return self._drop(tid, *full, now)
            self._charge(entry, cost)
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
        entry.last_seen = now
        self._open.move_to_end(tid)
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
        """Drop transfers past their deadline ("expired"), idle for ``idle_s`` or older than
        ``max_age_s`` ("timed_out"); also hands out the evictions made since the last call."""
        refused, self._evicted = list(self._evicted), deque(maxlen=self._evicted.maxlen)
        for tid, entry in list(self._open.items()):
            header, age, idle = entry.header, now - entry.first_seen, now - entry.last_seen
            total = header.total_chunks if header is not None else "?"
            if header is not None and 0.0 < header.deadline < now:
                refused.append(self._drop(tid, "expired", f"deadline passed, {age:.1f}s old", now))
            elif age > self.max_age_s or idle > self.idle_s:
                detail = f"only {len(entry.seen)} of {total} chunks arrived in {age:.1f}s"
                detail += f", none for {idle:.1f}s" if idle > self.idle_s else ""
                refused.append(self._drop(tid, "timed_out", detail, now))
        while self._done and now - next(iter(self._done.values()))[0] > self.max_age_s:
            self._done.popitem(last=False)
        return refused

    def _owned(self, tid: str, sender: str) -> bool:
        entry = self._open.get(tid)
        return entry is None or entry.sender == sender

    def _make_room(
        self, sender: str, transfers: int, size: int, now: float, keep: str
    ) -> tuple[str, str] | None:
        """Make room for ``transfers`` more open transfers and ``size`` more reserved bytes of
        ``sender``, evicting idle transfers (never ``keep``); (reason, detail) if it cannot."""
        while True:
            held_open, held_bytes = self.held_by(sender)
            scope: str | None = sender
            if held_open + transfers > self.max_open_per_sender < self.max_open:
                reason = "too_many_open"
                why = f"sender {sender!r} holds {held_open} open transfers "
                why += f"(max_open_per_sender={self.max_open_per_sender})"
            elif held_bytes + size > self.max_bytes_per_sender < self.max_buffered_bytes:
                reason = "buffer_full"
                why = f"sender {sender!r} has {held_bytes} B reserved; {size} B more exceeds "
                why += f"max_bytes_per_sender={self.max_bytes_per_sender}"
            elif len(self._open) + transfers > self.max_open:
                scope, reason = None, "too_many_open"
                why = f"{len(self._open)} transfers open (max_open={self.max_open})"
            elif self._charged + size > self.max_buffered_bytes:
                scope, reason, why = None, "buffer_full", self._full_detail(size)
            else:
                return None
            victim = self._idlest(scope, now, keep)
            if victim is None:
                return reason, f"{why}; none idle for {self.evict_after_s:g}s; retry later"
            entry = self._open[victim]
            detail = f"idle for {now - entry.last_seen:.1f}s, evicted to make room ({why})"
            self._evicted.append(self._drop(victim, "evicted", detail, now))

    def _idlest(self, scope: str | None, now: float, keep: str) -> str | None:
        """The least recently active transfer (of sender ``scope``; of anyone if None) when it
        has been idle for ``evict_after_s``, else None."""
        for tid, entry in self._open.items():  # least recently active first
            if tid == keep or (scope is not None and entry.sender != scope):
                continue
            return tid if now - entry.last_seen >= self.evict_after_s else None
        return None

    def _charge(self, entry: _Open, size: int) -> None:
        entry.charged += size
        self._charged += size
        self._sender_charged[entry.sender] += size

    def _admit(
        self, tid: str, entry: _Open, header: TransferHeader, first: int, now: float
    ) -> Refused | None:
        """Check a header chunk (carrying ``first`` data bytes) against the limits, reserve room
        for the whole transfer and, if it announces its layout, allocate the final buffer."""
        floor = self._min_version.get(header.plan_id, 0)
        n, length, cap = header.total_chunks, header.total_length, header.chunk_capacity
        extra = length + n * PART_COST - entry.charged
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
        elif self.accept is not None and (unwanted := self.accept(header)) is not None:
            reason, detail = "unexpected", unwanted
        elif full := self._make_room(entry.sender, 0, extra, now, tid):
            reason, detail = full
        else:
            self._charge(entry, extra)
            entry.header = header
            if cap and first <= length:  # the layout is known: allocate the final buffer
                entry.payload, entry.first, entry.cap = bytearray(), first, cap
                for seq, part in sorted(entry.parts.items()):  # data before the header
                    if misfit := entry.place(seq, part):
                        return self._drop(tid, "malformed", misfit, now)
                entry.parts.clear()
            return None
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
            crc = crc32(payload) if header.checksum is not None else 0
        if header.checksum is None and entry.unchecked:
            detail = f"{entry.unchecked} chunks carry no crc32 (x) and the header none (c)"
            return self._drop(tid, "malformed", detail, now)
        if header.checksum is not None and crc != header.checksum:
            detail = f"crc32 {crc:#010x} != {header.checksum:#010x} over transfer {tid}: "
            return self._drop(tid, "checksum", detail + "corrupted in transit; resend", now)
        self._release(tid, entry)
        self._tombstone(tid, "completed", now)
        return Completed(header, payload, entry.first_seen)

    def _drop(
        self, tid: str, reason: str, detail: str, now: float,
        header: TransferHeader | None = None, sender: str = "",
    ) -> Refused:  # fmt: skip
        entry = self._open.get(tid)
        if entry is not None:
            self._release(tid, entry)
            header, sender = header or entry.header, entry.sender
        self._tombstone(tid, reason, now)
        log.debug("transfer=%s sender=%s refused reason=%s: %s", tid, sender, reason, detail)
        return Refused(tid, reason, detail, header, sender)

    def _release(self, tid: str, entry: _Open) -> None:
        del self._open[tid]
        self._charged -= entry.charged
        self._buffered -= entry.received
        for counter, amount in ((self._sender_open, 1), (self._sender_charged, entry.charged)):
            counter[entry.sender] -= amount
            if counter[entry.sender] <= 0:
                del counter[entry.sender]

    def _tombstone(self, tid: str, outcome: str, now: float) -> None:
        self._done[tid] = (now, outcome)
        while len(self._done) > self._max_done:
            self._done.popitem(last=False)

    def _full_detail(self, extra: int) -> str:
        return (
            f"{extra} B more would exceed max_buffered_bytes={self.max_buffered_bytes} "
            f"({self._charged} B reserved by {len(self._open)} transfers)"
        )
