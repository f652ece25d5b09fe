"""Parsing received chunks: bounded msgpack, a copy-free fast path for data chunks, the
:class:`TransferHeader` / :class:`Refused` values the parse produces, and the chunks' crc32.

Split off :mod:`broker.protocol.reassembly` (which owns the state of open transfers and
re-exports these names) so each module keeps one responsibility. Pure: bytes in, values out;
nothing here raises on input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from edgeslice.broker.protocol import PROTOCOL_MAJOR

try:  # ISA-L's crc32: bit-identical to zlib.crc32, ~15x faster (1 MiB: 20 us vs 280-600 us)
    from isal.isal_zlib import crc32
except ImportError:  # no isal wheel for this platform (e.g. 32-bit ARM): zlib's, same values
    from zlib import crc32

__all__ = [
    "MAX_ID_LEN", "MAX_SEQ", "NON_ERROR_REASONS", "PART_COST", "Completed", "Parsed", "Piece",
    "Refused", "TransferHeader", "crc32", "parse_chunk", "parse_data_chunk",
]  # fmt: skip

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
    # crc32 of the whole payload (field c, senders before 1.3); None since 1.3, where each
    # chunk carries the crc32 of its own data (field x), checked as it arrives
    checksum: int | None
    deadline: float
    meta: dict[str, Any] = field(default_factory=dict)
    chunk_capacity: int = 0  # data bytes in each of chunks 1..n-2 (field dc); 0 = not announced


@dataclass(frozen=True)
class Completed:
    """A transfer whose chunks all arrived and whose checksums match."""

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
    sender: str = ""  # who sent it, as the listener named it (from the topic), "" if unknown

    @property
    def is_error(self) -> bool:
        """False for redeliveries ("duplicate", "ignored") that callers should just skip."""
        return self.reason not in NON_ERROR_REASONS


Piece = bytes | memoryview
Parsed = tuple[str, int, Piece, int | None, TransferHeader | None]  # tid, seq, data, crc, header
_HEADER_FIELDS: tuple[tuple[str, type], ...] = (
    ("r", str), ("k", str), ("p", str), ("pv", int), ("st", int), ("n", int), ("l", int),
    ("m", dict),
)  # fmt: skip
_OPTIONAL_FIELDS = (("c", int), ("dc", int))  # c: senders before 1.3; dc: since 1.1
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


def parse_data_chunk(buf: bytes) -> Parsed | None:
    """Fast path for the exact layouts senders write for chunks 1..n-1 (t, s, x, d since 1.3;
    t, s, d before), without copying the data; None sends the chunk down the msgpack path."""
    try:
        size, pos = _field(buf, 1, b"\xa1t", _FIXSTR, _STR8) if buf[0] in (0x83, 0x84) else (-1, 0)
        tid = str(buf[pos : pos + size], "utf-8") if size > 0 else ""
        seq, pos = _field(buf, pos + size, b"\xa1s", _FIXINT, _UINT) if tid else (-1, 0)
        crc: int | None = None
        if seq > 0 and buf[0] == 0x84:
            crc, pos = _field(buf, pos, b"\xa1x", _FIXINT, _UINT)
            seq = seq if crc >= 0 else -1
        size, pos = _field(buf, pos, b"\xa1d", _NOFIX, _BIN) if seq > 0 else (-1, 0)
    except (IndexError, UnicodeDecodeError):
        return None
    if size < 0 or pos + size != len(buf):
        return None
    return tid, seq, memoryview(buf)[pos:], crc, None


def _unpack(buf: bytes) -> Any:
    """Bounded msgpack; raises on malformed input."""
    return msgpack.unpackb(
        buf, raw=False, strict_map_key=True, max_ext_len=0, max_map_len=10_000,
        max_array_len=100_000, max_str_len=_MiB,
    )  # fmt: skip


def unpack_header(buf: bytes) -> dict[str, Any] | None:
    """A header chunk as senders write it (a fixmap whose last key is d, a bin running to the
    end) unpacked without copying d: msgpack would copy chunk 0's data (up to a whole chunk)
    only for the reassembler to copy it again. The map before d is unpacked on its own and must
    be exactly the other keys, so the result equals msgpack's; None for any other layout."""
    if len(buf) > 3 and 0x81 <= buf[0] <= 0x8F:  # fixmap
        count, keys = buf[0] - 0x80, 1
        prefix = bytes((0x7F + count,))
    elif len(buf) > 3 and buf[0] == 0xDE:  # map 16 (a newer minor with more keys)
        count, keys = int.from_bytes(buf[1:3], "big"), 3
        prefix = b"\xde" + (count - 1).to_bytes(2, "big") if count else b""
    else:
        return None
    pos = buf.find(b"\xa1d", keys) if count else -1
    while pos >= 0:  # the first "d" key whose bin length reaches exactly to the end
        width = _BIN.get(buf[pos + 2], 0) if pos + 2 < len(buf) else 0
        start = pos + 3 + width
        if width and int.from_bytes(buf[pos + 3 : start], "big") == len(buf) - start:
            try:
                obj = _unpack(prefix + buf[keys:pos])  # the other count - 1 keys
            except Exception:
                return None
            if not isinstance(obj, dict) or "d" in obj:
                return None
            obj["d"] = memoryview(buf)[start:]
            return obj
        pos = buf.find(b"\xa1d", pos + 1)
    return None


def parse_chunk(buf: bytes) -> Parsed | Refused:
    """Any chunk, through bounded msgpack: (transfer id, seq, data, its crc32 if it carries
    one, header if seq 0)."""
    try:
        obj = unpack_header(buf) or _unpack(buf)
    except Exception as exc:  # msgpack raises ValueError, TypeError, StackError, ...
        return Refused("", "malformed", f"chunk is not msgpack: {type(exc).__name__}: {exc}")
    if not isinstance(obj, dict):
        return Refused("", "malformed", f"chunk is a msgpack {type(obj).__name__}, not a map")
    tid, seq, data = obj.get("t"), obj.get("s"), obj.get("d")
    if type(tid) is not str or not 0 < len(tid) <= MAX_ID_LEN:
        return Refused("", "malformed", f"chunk field t (transfer id) is bad: {tid!r:.80}")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ or not isinstance(data, bytes | memoryview):
        return Refused(tid, "malformed", "chunk fields s (int seq) and d (bin data) are required")
    crc = obj.get("x")
    if crc is not None and (type(crc) is not int or not 0 <= crc <= 0xFFFFFFFF):
        return Refused(tid, "malformed", f"chunk field x (crc32 of d) is {crc!r:.80}")
    if seq > 0:
        return tid, seq, data, crc, None
    version = obj.get("v")
    if not (isinstance(version, list) and len(version) >= 2 and type(version[0]) is int):
        return Refused(tid, "malformed", "header chunk (seq 0) lacks field v = [major, minor]")
    if version[0] != PROTOCOL_MAJOR:
        return Refused(
            tid, "version", f"sender speaks protocol major {version[0]}, this receiver "
            f"{PROTOCOL_MAJOR}; upgrade edgeslice on the older side",
        )  # fmt: skip
    checks = (*_HEADER_FIELDS, *(field for field in _OPTIONAL_FIELDS if field[0] in obj))
    for key, kind in checks:
        value: Any = obj.get(key)
        if type(value) is not kind or (type(value) is int and value < 0):
            return Refused(tid, "malformed", f"header field {key} is {value!r:.80}, not {kind}")
    deadline = obj.get("dl", 0.0)
    if type(deadline) not in (int, float) or not 0.0 <= deadline < float("inf"):
        return Refused(tid, "malformed", f"header field dl (deadline) is {deadline!r:.80}")
    total_chunks, total_length = obj["n"], obj["l"]
    if not 1 <= total_chunks <= min(total_length + 1, MAX_SEQ) or obj.get("c", 0) > 0xFFFFFFFF:
        return Refused(tid, "malformed", f"header claims {total_chunks} chunks, {total_length} B")
    header = TransferHeader(
        tid, obj["r"], obj["k"], obj["p"], obj["pv"], obj["st"], total_chunks, total_length,
        obj.get("c"), float(deadline), obj["m"], obj.get("dc", 0),
    )  # fmt: skip
    return tid, 0, data, crc, header
