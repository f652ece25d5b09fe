"""Reassembly: older senders (no chunk capacity in the header) and layouts that do not add up."""

from __future__ import annotations

import os

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslice.broker.protocol.chunking import Completed, Reassembler, Refused, split_payload


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
    short = msgpack.packb(fields | {"d": fields["d"][:-1]})
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
