"""Chunked transfers: what a sender and a receiver on the data plane can rely on."""

from __future__ import annotations

import os
import random
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeslice.broker.protocol.chunking import (
    DEFAULT_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Completed,
    Reassembler,
    Refused,
    encode_transfer,
    split_payload,
)
from edgeslice.broker.protocol.chunkparse import crc32
from edgeslice.broker.protocol.errors import ProtocolError, TransferError

KNOWN_REASONS = {
    "malformed", "version", "too_large", "stale_plan", "expired", "checksum", "too_many_open",
    "buffer_full", "timed_out", "duplicate", "ignored",
}  # fmt: skip


def _encode(payload: bytes, chunk_size: int = 1024, **fields: object) -> list[bytes]:
    args: dict = {"request_id": "req-1", "kind": "activation", "plan_id": "mnv2"} | fields
    return split_payload(payload, chunk_size=chunk_size, **args)


def _feed_all(reassembler: Reassembler, chunks: list[bytes], now: float = 0.0) -> list:
    return [reassembler.feed(chunk, now) for chunk in chunks]


def _completed(results: list) -> list[Completed]:
    return [r for r in results if isinstance(r, Completed)]


def _errors(results: list) -> list[Refused]:
    return [r for r in results if isinstance(r, Refused) and r.is_error]


def _reencode(chunk: bytes, **changes: object) -> bytes:
    return msgpack.packb(msgpack.unpackb(chunk, raw=False) | changes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(0, 40_000),
    chunk_size=st.integers(512, 5000),  # MIN_CHUNK_SIZE: boundary test below
    meta=st.dictionaries(
        st.text(max_size=8), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10), max_size=3
    ),
    rng=st.randoms(use_true_random=False),
)
def test_any_order_with_duplicates_gives_back_the_same_payload(size, chunk_size, meta, rng):
    payload = rng.randbytes(size)
    encoded = encode_transfer(
        payload, request_id="r", kind="request", meta=meta, chunk_size=chunk_size, stage=2
    )
    assert all(len(chunk) <= chunk_size for chunk in encoded.chunks)
    arrivals = encoded.chunks + rng.sample(encoded.chunks, k=len(encoded.chunks) // 3)
    rng.shuffle(arrivals)
    reassembler = Reassembler()
    results = _feed_all(reassembler, arrivals)
    done = _completed(results)
    assert len(done) == 1 and not _errors(results)
    assert done[0].payload == payload
    assert done[0].header == encoded.header
    assert (done[0].header.meta, done[0].header.stage) == (meta, 2)
    assert reassembler.open_transfers == 0 and reassembler.buffered_bytes == 0


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_SIZE, 4096, DEFAULT_CHUNK_SIZE])
def test_payloads_at_chunk_boundaries_round_trip_and_fill_chunks(chunk_size):
    sizes = {0, 1}
    for multiple in (1, 2, 3):
        sizes |= {multiple * chunk_size + delta for delta in (-200, -1, 0, 1)}
    for size in sorted(sizes):
        payload = os.urandom(size)
        chunks = _encode(payload, chunk_size=chunk_size)
        assert all(len(chunk) <= chunk_size for chunk in chunks)
        # no chunk is wasted: all but the last are nearly full
        assert all(len(chunk) >= chunk_size - 8 for chunk in chunks[1:-1])
        (done,) = _completed(_feed_all(Reassembler(), chunks[::-1]))
        assert done.payload == payload


def test_multi_mib_payload_at_default_chunk_size():
    payload = os.urandom(5 * 1024 * 1024 + 12345)
    encoded = encode_transfer(memoryview(payload), request_id="r", kind="activation")
    assert len(encoded.chunks) == 21
    assert max(len(chunk) for chunk in encoded.chunks) <= DEFAULT_CHUNK_SIZE
    arrivals = encoded.chunks + encoded.chunks[3:6]
    random.Random(7).shuffle(arrivals)
    (done,) = _completed(_feed_all(Reassembler(), arrivals))
    assert done.payload == payload


def test_chunks_rewritten_by_another_msgpack_writer_still_reassemble():
    payload = os.urandom(5000)
    chunks = _encode(payload, chunk_size=512)
    rewritten = [msgpack.packb(dict(reversed(msgpack.unpackb(c).items()))) for c in chunks]
    (done,) = _completed(_feed_all(Reassembler(), rewritten))
    assert done.payload == payload


def test_chunk_checksums_are_zlib_crc32_whichever_library_computes_them():
    """x is zlib's crc32 of the chunk's data (the wire format) also where ISA-L computes it,
    so peers with and without isal installed read each other's chunks."""
    payload = os.urandom(5000)
    for chunk in _encode(payload, chunk_size=1024):
        fields = msgpack.unpackb(chunk)
        assert fields["x"] == zlib.crc32(fields["d"])
    view = memoryview(payload)[7:]
    assert crc32(view) == zlib.crc32(view) and crc32(view, 12345) == zlib.crc32(view, 12345)


def test_a_missing_chunk_never_completes_and_then_times_out():
    reassembler = Reassembler(max_age_s=30.0, idle_s=60.0)
    chunks = _encode(os.urandom(10_000), chunk_size=1024)
    results = _feed_all(reassembler, chunks[:4] + chunks[5:], now=100.0)
    assert results == [None] * (len(chunks) - 1)
    assert reassembler.open_transfers == 1 and reassembler.buffered_bytes > 0
    assert reassembler.expire(now=120.0) == []
    (refused,) = reassembler.expire(now=131.0)
    assert refused.reason == "timed_out"
    assert f"{len(chunks) - 1} of {len(chunks)} chunks" in refused.detail
    assert refused.header is not None and refused.header.request_id == "req-1"
    assert reassembler.open_transfers == 0 and reassembler.buffered_bytes == 0
    # the late chunk is ignored, it does not reopen the transfer
    late = reassembler.feed(chunks[4], now=132.0)
    assert isinstance(late, Refused) and late.reason == "ignored" and not late.is_error
    assert reassembler.open_transfers == 0


def test_corrupted_data_is_refused_by_checksum():
    chunks = _encode(os.urandom(3000), chunk_size=1024)
    damaged = bytearray(chunks[1])
    damaged[-10] ^= 0xFF
    results = _feed_all(Reassembler(), [chunks[0], bytes(damaged), *chunks[2:]])
    (refused,) = _errors(results)
    assert refused.reason == "checksum" and "resend" in refused.detail
    assert not _completed(results)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_bytes_never_raise(data):
    result = Reassembler().feed(data, 0.0)
    assert result is None or (isinstance(result, Refused) and result.reason in KNOWN_REASONS)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(
        st.sampled_from([*"tsdvrkpnlcmx", "pv", "st", "dl", "dc"]), inner, max_size=8
    ),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_msgpack_values)
def test_valid_msgpack_of_the_wrong_shape_never_raises(value):
    result = Reassembler().feed(msgpack.packb(value), 0.0)
    assert result is None or (isinstance(result, Refused) and result.reason in KNOWN_REASONS)


def _header_chunk(**changes: object) -> bytes:
    return _reencode(_encode(b"x" * 100, chunk_size=1024)[0], **changes)


@pytest.mark.parametrize(
    "chunk",
    [
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"t": 5, "s": 1, "d": b"x"}),
        msgpack.packb({"t": "x", "s": -1, "d": b"x"}),
        msgpack.packb({"t": "x", "s": True, "d": b"x"}),
        msgpack.packb({"t": "x", "s": 1, "d": "not bytes"}),
        msgpack.packb({"t": "x", "s": 1, "d": b""}),
        msgpack.packb({"t": "x", "s": 0, "d": b"x"}),
        msgpack.packb({"t": "", "s": 1, "d": b"x"}),
        msgpack.packb({"t": "x", "s": 1, "d": msgpack.ExtType(5, b"zz")}),
        msgpack.packb({"t": "x", "s": 1, "x": -1, "d": b"x"}),
        msgpack.packb({"t": "x", "s": 1, "x": 2**32, "d": b"x"}),
        msgpack.packb({"t": "x", "s": 1, "x": "crc", "d": b"x"}),
        _header_chunk(x=1.5),
        _header_chunk(n=0),
        _header_chunk(n=102),  # more chunks than bytes
        _header_chunk(l=10),  # header chunk carries 100 bytes
        _header_chunk(c=2**33),
        _header_chunk(pv="3"),
        _header_chunk(st=-1),
        _header_chunk(m=[1]),
        _header_chunk(dl=float("nan")),
        _header_chunk(v="1.0"),
        _header_chunk(s=0, r=None),
        _encode(os.urandom(3000))[1][:-5],  # truncated
        b"\x91" * 5000 + b"\x90",  # deeply nested
    ],
)
def test_malformed_chunks_are_refused_without_raising(chunk):
    result = Reassembler().feed(chunk, 0.0)
    assert isinstance(result, Refused) and result.reason == "malformed", result


def test_chunk_beyond_the_announced_count_drops_the_transfer():
    reassembler = Reassembler()
    chunks = _encode(os.urandom(3000), chunk_size=1024)
    assert reassembler.feed(chunks[0], 0.0) is None
    bogus = _reencode(chunks[1], s=len(chunks))
    refused = reassembler.feed(bogus, 0.0)
    assert isinstance(refused, Refused) and refused.reason == "malformed"
    assert "overflows" in refused.detail and reassembler.open_transfers == 0


def test_a_newer_protocol_major_is_refused_with_a_clear_reason():
    refused = Reassembler().feed(_header_chunk(v=[2, 0]), 0.0)
    assert isinstance(refused, Refused) and refused.reason == "version"
    assert "major 2" in refused.detail and "upgrade" in refused.detail


def test_a_newer_minor_with_extra_fields_is_accepted():
    chunks = _encode(b"hello", chunk_size=1024)
    newer = _reencode(chunks[0], v=[1, 7], future_field={"x": 1})
    done = Reassembler().feed(newer, 0.0)
    assert isinstance(done, Completed) and done.payload == b"hello"


def test_stale_plan_versions_are_dropped():
    reassembler = Reassembler()
    assert reassembler.set_min_plan_version("mnv2", 3) == []
    old = reassembler.feed(_encode(b"a" * 10, plan_version=2)[0], 0.0)
    assert (
        isinstance(old, Refused) and old.reason == "stale_plan" and "v2 < current v3" in old.detail
    )
    other_plan = reassembler.feed(_encode(b"b", plan_id="resnet", plan_version=1)[0], 0.0)
    assert isinstance(other_plan, Completed)
    assert isinstance(reassembler.feed(_encode(b"c", plan_version=3)[0], 0.0), Completed)


def test_raising_the_plan_version_drops_open_transfers_of_that_plan_at_once():
    reassembler = Reassembler()
    chunks = _encode(os.urandom(4000), chunk_size=1024, plan_version=4)
    reassembler.feed(chunks[0], 0.0)
    assert reassembler.buffered_bytes > 0
    (refused,) = reassembler.set_min_plan_version("mnv2", 5)
    assert refused.reason == "stale_plan" and refused.header is not None
    assert reassembler.open_transfers == 0 and reassembler.buffered_bytes == 0
    late = reassembler.feed(chunks[1], 1.0)
    assert isinstance(late, Refused) and not late.is_error


def test_deadlines_are_checked_against_now():
    reassembler = Reassembler()
    late = reassembler.feed(_encode(b"x", deadline=50.0)[0], now=51.0)
    assert isinstance(late, Refused) and late.reason == "expired"
    chunks = _encode(os.urandom(3000), chunk_size=1024, deadline=100.0)
    assert reassembler.feed(chunks[0], now=99.0) is None
    assert reassembler.expire(now=99.5) == []
    (expired,) = reassembler.expire(now=100.5)
    assert expired.reason == "expired" and reassembler.open_transfers == 0
    in_time = _encode(b"ok", deadline=100.0)
    assert isinstance(reassembler.feed(in_time[0], now=99.0), Completed)


def test_too_many_open_transfers_refuses_new_ones_not_old_ones():
    reassembler = Reassembler(max_open=2)
    transfers = [_encode(os.urandom(2000), chunk_size=1024) for _ in range(3)]
    assert reassembler.feed(transfers[0][0], 0.0) is None
    assert reassembler.feed(transfers[1][0], 0.0) is None
    refused = reassembler.feed(transfers[2][0], 0.0)
    assert isinstance(refused, Refused) and refused.reason == "too_many_open"
    assert "max_open=2" in refused.detail
    later = reassembler.feed(transfers[2][1], 0.0)
    assert isinstance(later, Refused) and later.reason == "ignored"
    assert len(_completed(_feed_all(reassembler, transfers[0][1:] + transfers[1][1:]))) == 2


def test_buffer_full_and_too_large_transfers_are_refused():
    reassembler = Reassembler(max_buffered_bytes=50_000, max_transfer_bytes=40_000)
    big = reassembler.feed(_encode(os.urandom(40_001), chunk_size=4096)[0], 0.0)
    assert isinstance(big, Refused) and big.reason == "too_large"
    first = _encode(os.urandom(30_000), chunk_size=4096)
    second = _encode(os.urandom(30_000), chunk_size=4096)
    assert reassembler.feed(first[0], 0.0) is None  # reserves its whole length
    full = reassembler.feed(second[0], 0.0)
    assert isinstance(full, Refused) and full.reason == "buffer_full"
    assert "max_buffered_bytes=50000" in full.detail
    assert len(_completed(_feed_all(reassembler, first[1:]))) == 1
    again = _encode(os.urandom(30_000), chunk_size=4096)
    assert len(_completed(_feed_all(reassembler, again))) == 1


def test_data_before_its_header_is_buffered_within_bounds():
    payload = os.urandom(8000)
    chunks = _encode(payload, chunk_size=1024)
    reassembler = Reassembler()
    results = _feed_all(reassembler, chunks[1:] + chunks[:1])
    assert _completed(results)[0].payload == payload
    tight = Reassembler(max_buffered_bytes=3000)
    results = _feed_all(tight, chunks[1:])
    assert [r.reason for r in _errors(results)] == ["buffer_full"]
    assert tight.open_transfers == 0 and tight.buffered_bytes == 0


def test_duplicates_after_completion_do_not_reopen_the_transfer():
    reassembler = Reassembler()
    chunks = _encode(os.urandom(2000), chunk_size=1024)
    assert len(_completed(_feed_all(reassembler, chunks))) == 1
    again = reassembler.feed(chunks[1], 0.0)
    assert isinstance(again, Refused) and again.reason == "duplicate" and not again.is_error
    assert reassembler.open_transfers == 0


def test_oversized_chunk_is_refused():
    result = Reassembler(max_chunk_bytes=1000).feed(b"\x00" * 1001, 0.0)
    assert isinstance(result, Refused) and result.reason == "too_large"


def test_sender_errors_are_clear():
    with pytest.raises(ProtocolError, match="kind"):
        split_payload(b"x", request_id="r", kind="activations")
    with pytest.raises(ProtocolError, match="meta"):
        split_payload(b"x", request_id="r", kind="request", meta={"a": {1: 2}})
    with pytest.raises(TransferError, match="does not fit") as info:
        split_payload(b"x", request_id="r", kind="request", meta={"a": "y" * 500}, chunk_size=512)
    assert info.value.reason == "too_large"
