"""Tensor packing: what comes out of unpack_tensors is what went into pack_tensors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeslice.broker.protocol.chunking import Completed, Reassembler, encode_transfer
from edgeslice.broker.protocol.errors import DecodeError, ProtocolError
from edgeslice.broker.protocol.tensors import DTYPE_SIZES, pack_tensors, unpack_tensors

SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3), (2, 3, 4, 5)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape) + 17)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def _round_trip(tensors: list[torch.Tensor], compression: str | None = None) -> list[torch.Tensor]:
    meta, payload = pack_tensors(tensors, compression)
    assert isinstance(payload, bytes | memoryview)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "buffer is not writable"
        return unpack_tensors(meta, payload)


@pytest.mark.parametrize("dtype_name", list(DTYPE_SIZES))
def test_every_dtype_and_shape_round_trips_bit_exact(dtype_name):
    dtype = getattr(torch, dtype_name)
    tensors = [_sample(dtype, shape) for shape in SHAPES]
    restored = _round_trip(tensors)
    for before, after in zip(tensors, restored, strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(after, before)


def test_views_and_special_values_survive():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45], dtype=torch.float32)
    tensors = [base.t(), base[1:3, ::2], base.expand(2, 4, 6), special]
    restored = _round_trip(tensors)
    for before, after in zip(tensors[:3], restored[:3], strict=True):
        assert torch.equal(after, before)
    assert torch.equal(restored[3].view(torch.int32), special.view(torch.int32))  # bit for bit


def test_unpacked_tensors_are_writable_and_independent_of_the_payload():
    source = torch.arange(6, dtype=torch.int64)
    meta, payload = pack_tensors([source])
    buffer = bytearray(payload)
    (restored,) = unpack_tensors(meta, buffer)
    buffer[:8] = b"\xff" * 8
    restored += 1  # must not raise nor touch the payload
    assert restored.tolist() == [1, 2, 3, 4, 5, 6]


def test_fp16_halves_float32_bytes_within_half_precision():
    x = torch.randn(1000, dtype=torch.float32) * 10
    meta, payload = pack_tensors([x, torch.arange(3)], "fp16")
    assert meta[0]["compression"] == "fp16" and len(payload) == 1000 * 2 + 3 * 8
    assert "compression" not in meta[1]
    y, ints = unpack_tensors(meta, payload)
    assert y.dtype == torch.float32 and torch.equal(ints, torch.arange(3))
    assert torch.all((y - x).abs() <= x.abs() * 2**-11 + 2**-24)


def test_fp16_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, math.nan, 1.0], dtype=torch.float32)
    (y,) = _round_trip([x], "fp16")
    assert y[:2].tolist() == [65504.0, -65504.0]
    assert math.isnan(y[2]) and y[3] == 1.0


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=200),
    dtype_name=st.sampled_from(["float32", "float64"]),
)
def test_int8_error_is_at_most_half_a_step(values, dtype_name):
    x = torch.tensor(values, dtype=getattr(torch, dtype_name))
    meta, payload = pack_tensors([x], "int8")
    assert len(payload) == len(values) and meta[0]["compression"] == "int8"
    (y,) = unpack_tensors(meta, payload)
    scale = meta[0]["scale"]
    peak = float(x.abs().max())
    assert y.dtype == x.dtype
    assert float((y.double() - x.double()).abs().max()) <= scale / 2 + peak * 1e-6


def test_int8_handles_zeros_non_finite_and_half_floats():
    (zeros,) = _round_trip([torch.zeros(4)], "int8")
    assert torch.equal(zeros, torch.zeros(4))
    x = torch.tensor([math.nan, math.inf, -math.inf, 2.0, -1.0])
    (y,) = _round_trip([x], "int8")
    assert y.tolist() == pytest.approx([0.0, 2.0, -2.0, 2.0, -1.0], abs=0.01)
    half = torch.randn(50).to(torch.bfloat16)
    (z,) = _round_trip([half], "int8")
    assert z.dtype == torch.bfloat16
    assert float((z.float() - half.float()).abs().max()) <= float(half.abs().max()) / 127


def test_pack_refuses_what_it_cannot_carry():
    with pytest.raises(ProtocolError, match="complex64"):
        pack_tensors([torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(ProtocolError, match="compression"):
        pack_tensors([torch.zeros(2)], "zstd")
    with pytest.raises(ProtocolError, match="not a dense tensor"):
        pack_tensors([[1.0, 2.0]])  # type: ignore[list-item]


def _good() -> tuple[list[dict], bytes]:
    return pack_tensors([torch.ones(2, 3), torch.tensor([True, False])])


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda m, p: ({"dtype": "float32"}, p), "not a list"),
        (lambda m, p: ([m[0] | {"dtype": "complex64"}, m[1]], p), "unknown dtype"),
        (lambda m, p: ([m[0] | {"dtype": ["x"]}, m[1]], p), "unknown dtype"),
        (lambda m, p: ([m[0] | {"shape": [2, -3]}, m[1]], p), "shape"),
        (lambda m, p: ([m[0] | {"shape": "2x3"}, m[1]], p), "shape"),
        (lambda m, p: ([m[0] | {"nbytes": 25}, m[1]], p), "nbytes"),
        (lambda m, p: ([m[0] | {"shape": [3, 3]}, m[1]], p), "nbytes"),
        (lambda m, p: (m, p + b"\x00"), "payload has 27 B"),
        (lambda m, p: (m[:1], p), "payload has 26 B"),
        (lambda m, p: ([m[0], m[1] | {"compression": "int8"}], p), "does not apply"),
        (lambda m, p: ([m[0] | {"compression": "int8", "scale": -1.0}, m[1]], p), "scale"),
        (lambda m, p: ([m[0] | {"compression": "lz4"}, m[1]], p), "does not apply"),
        (lambda m, p: (m, p[:-1] + b"\x02"), "bool"),
        (lambda m, p: ([5, m[1]], p), "not a map"),
    ],
)
def test_bad_meta_is_a_decode_error(mangle, message):
    meta, payload = mangle(*_good())
    with pytest.raises(DecodeError, match=message):
        unpack_tensors(meta, payload)


def test_tensors_through_chunks_end_to_end():
    activation = torch.randn(1, 32, 56, 56)
    meta, payload = pack_tensors([activation, torch.tensor(7)], "fp16")
    encoded = encode_transfer(
        payload, request_id="r", kind="activation", meta={"tensors": meta}, chunk_size=16384
    )
    reassembler = Reassembler()
    results = [reassembler.feed(chunk, 0.0) for chunk in reversed(encoded.chunks)]
    done = results[-1]
    assert isinstance(done, Completed)
    restored, step = unpack_tensors(done.header.meta["tensors"], done.payload)
    assert step.item() == 7
    assert torch.allclose(restored, activation, rtol=2**-10, atol=1e-7)


def test_single_tensor_payload_is_a_zero_copy_view_that_keeps_its_tensor_alive():
    import gc

    tensor = torch.arange(1000, dtype=torch.float32)
    expected = tensor.numpy().tobytes()
    _meta, payload = pack_tensors([tensor * 1])  # the temporary is owned only by the view
    gc.collect()
    assert isinstance(payload, memoryview) and payload.readonly
    assert bytes(payload) == expected


def test_share_wraps_a_bytearray_payload_without_copying():
    meta, payload = pack_tensors([torch.arange(8, dtype=torch.int64)])
    buffer = bytearray(payload)
    (shared,) = unpack_tensors(meta, buffer, share=True)
    buffer[:8] = (41).to_bytes(8, "little")
    assert shared[0].item() == 41  # same memory
