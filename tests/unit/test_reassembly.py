"""Reassembly: older senders (no chunk capacity in the header) and layouts that do not add up."""

from __future__ import annotations

import os
import zlib

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslice.broker.protocol.chunking import Completed, Reassembler, Refused, split_payload
from edgeslice.broker.protocol.chunkparse import unpack_header


def _chunks(payload: bytes, chunk_size: int = 1024) -> list[bytes]:
    return split_payload(payload, request_id="r", kind="activation", chunk_size=chunk_size)


def _rewrite(chunk: bytes, drop: tuple[str, ...] = (), **changes: object) -> bytes:
    fields = {k: v for k, v in msgpack.unpackb(chunk, raw=False).items() if k not in drop}
    return msgpack.packb(fields | changes)


def _feed(reassembler: Reassembler, chunks: list[bytes]) -> list[object]:
    return [reassembler.feed(chunk, 0.0) for chunk in chunks]


@settings(max_examples=100, deadline=None)
@given(size=st.integers(0, 12_000), rng=st.randoms(use_true_random=False))
def test_headers_without_chunk_capacity_still_reassemble_in_any_order(size, rng):
    payload = rng.randbytes(size)
    chunks = _chunks(payload)
    chunks[0] = _rewrite(chunks[0], drop=("dc",))  # what an older sender writes
    arrivals = chunks + rng.sample(chunks, k=len(chunks) // 3)
    rng.shuffle(arrivals)
    reassembler = Reassembler()
    results = _feed(reassembler, arrivals)
    done = [r for r in results if isinstance(r, Completed)]
    assert len(done) == 1 and done[0].payload == payload
    assert done[0].header.chunk_capacity == 0
    assert not [r for r in results if isinstance(r, Refused) and r.is_error]
    assert reassembler.open_transfers == 0 and reassembler.buffered_bytes == 0


def test_a_header_whose_capacity_disagrees_with_its_counts_is_malformed():
    chunks = _chunks(os.urandom(5000))
    lying = _rewrite(chunks[0], dc=100)
    refused = Reassembler().feed(lying, 0.0)
    assert isinstance(refused, Refused) and refused.reason == "malformed"
    assert "dc=100" in refused.detail


def test_a_data_chunk_cut_differently_from_the_header_layout_is_malformed():
    payload = os.urandom(5000)
    chunks = _chunks(payload)
    fields = msgpack.unpackb(chunks[1], raw=False)
    cut = fields["d"][:-1]  # with its own crc: intact, but cut to the wrong length
    short = msgpack.packb(fields | {"d": cut, "x": zlib.crc32(cut)})
    for order in ([chunks[0], short], [short, chunks[0]]):  # header first, and header last
        reassembler = Reassembler()
        results = _feed(reassembler, order)
        refused = [r for r in results if isinstance(r, Refused)]
        assert [r.reason for r in refused] == ["malformed"] and "layout" in refused[0].detail
        assert reassembler.open_transfers == 0 and reassembler.buffered_bytes == 0
        late = reassembler.feed(chunks[2], 0.0)
        assert isinstance(late, Refused) and late.reason == "ignored"


def test_a_second_transfer_reuses_nothing_from_the_first():
    reassembler = Reassembler()
    first, second = os.urandom(3000), os.urandom(3000)
    (done_first,) = [r for r in _feed(reassembler, _chunks(first)) if isinstance(r, Completed)]
    (done_second,) = [r for r in _feed(reassembler, _chunks(second)) if isinstance(r, Completed)]
    assert done_first.payload == first and done_second.payload == second
    done_first.payload[:10] = b"\x00" * 10  # the caller owns the buffer it was handed
    assert done_second.payload == second


def _as_protocol_1_2(chunks: list[bytes], payload: bytes) -> list[bytes]:
    """What a sender before 1.3 writes: a whole-payload crc in the header, none per chunk."""
    header = _rewrite(chunks[0], drop=("x",), v=[1, 2], c=zlib.crc32(payload))
    return [header, *(_rewrite(chunk, drop=("x",)) for chunk in chunks[1:])]


def test_one_corrupted_chunk_refuses_its_transfer_on_arrival_naming_it():
    chunks = _chunks(os.urandom(10_000))
    damaged = bytearray(chunks[3])
    damaged[-7] ^= 0x01
    reassembler = Reassembler()
    results = _feed(reassembler, [*chunks[:3], bytes(damaged)])
    assert results[:3] == [None] * 3  # refused at the bad chunk, not after the last one
    refused = results[3]
    assert isinstance(refused, Refused) and refused.reason == "checksum" and refused.is_error
    tid = msgpack.unpackb(chunks[0])["t"]
    assert refused.transfer_id == tid and tid in refused.detail and "chunk 3" in refused.detail
    assert refused.header is not None and refused.header.request_id == "r"
    assert reassembler.open_transfers == 0 and reassembler.buffered_bytes == 0
    late = _feed(reassembler, chunks[4:])
    assert all(isinstance(r, Refused) and r.reason == "ignored" for r in late)


def test_a_corrupted_header_chunk_or_early_data_chunk_is_refused_too():
    chunks = _chunks(os.urandom(5000))
    for index in (0, 2):
        damaged = bytearray(chunks[index])
        damaged[-1] ^= 0x80
        order = [bytes(damaged), *chunks[1:]] if index == 0 else [bytes(damaged), chunks[0]]
        refused = _feed(Reassembler(), order)[0]
        assert isinstance(refused, Refused) and refused.reason == "checksum"


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 12_000), rng=st.randoms(use_true_random=False))
def test_protocol_1_2_transfers_still_reassemble_and_their_crc_is_checked(size, rng):
    payload = rng.randbytes(size)
    old = _as_protocol_1_2(_chunks(payload), payload)
    arrivals = old + rng.sample(old, k=len(old) // 3)
    rng.shuffle(arrivals)
    done = [r for r in _feed(Reassembler(), arrivals) if isinstance(r, Completed)]
    assert len(done) == 1 and done[0].payload == payload
    assert done[0].header.checksum == zlib.crc32(payload)
    if size:  # the same chunks, one byte flipped: refused once all arrived
        fields = msgpack.unpackb(old[-1], raw=False)
        flipped = bytes([fields["d"][0] ^ 1]) + fields["d"][1:]
        bad = [*old[:-1], msgpack.packb(fields | {"d": flipped})]
        results = _feed(Reassembler(), bad)
        assert [r.reason for r in results if isinstance(r, Refused)] == ["checksum"]


def test_a_1_3_header_with_chunks_that_carry_no_crc_is_malformed():
    chunks = _chunks(os.urandom(5000))
    stripped = [chunks[0], *(_rewrite(chunk, drop=("x",)) for chunk in chunks[1:])]
    results = _feed(Reassembler(), stripped)
    refused = [r for r in results if isinstance(r, Refused)]
    assert [r.reason for r in refused] == ["malformed"] and "crc32" in refused[0].detail
    assert not [r for r in results if isinstance(r, Completed)]


@settings(max_examples=100, deadline=None)
@given(
    size=st.integers(0, 5000),
    meta=st.dictionaries(st.sampled_from("abcdx"), st.text("d\xa1", max_size=3)),
)
def test_header_chunks_unpack_as_msgpack_would_without_copying_their_data(size, meta):
    """unpack_header (the receiver's copy-free path for chunk 0) gives msgpack's own result,
    with d as a view into the chunk; meta strings that look like the d key change nothing."""
    payload = os.urandom(size)
    header = split_payload(
        payload, request_id="r", kind="activation", meta={"m": meta, "d": "d"}, chunk_size=1024
    )[0]
    fast = unpack_header(header)
    assert fast is not None and isinstance(fast["d"], memoryview) and fast["d"].obj is header
    assert fast | {"d": bytes(fast["d"])} == msgpack.unpackb(header, raw=False)


def test_header_layouts_other_than_the_senders_take_the_msgpack_path():
    payload = os.urandom(3000)
    header, *data = _chunks(payload)
    fields = msgpack.unpackb(header, raw=False)
    rest = {k: v for k, v in fields.items() if k != "d"}
    d_first = msgpack.packb({"d": fields["d"]} | rest)
    wide = msgpack.packb(rest | {f"extra{i}": i for i in range(3)} | {"d": fields["d"]})  # map 16
    for chunk in (d_first, header[:-1], header + b"\x00", b"\x81\xa1d\xc4\x05ab"):
        assert unpack_header(chunk) is None
    assert unpack_header(wide) == msgpack.unpackb(wide, raw=False)
    done = _feed(Reassembler(), [d_first, *data])
    assert isinstance(done[-1], Completed) and done[-1].payload == payload
