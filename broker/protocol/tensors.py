"""Tensor packing for the data plane: torch tensors <-> (per-tensor meta, one raw byte payload).

Why raw bytes and not ``torch.save``: torch.save pickles, and unpickling bytes that arrived
from the network runs arbitrary code. Here the payload is the tensors' raw little-endian
C-contiguous bytes back to back, in order, unpadded; the meta list (one msgpack-able dict per
tensor, sent in the transfer header) says how to read them::

    {"dtype": "float32", "shape": [1, 3, 224, 224], "nbytes": 602112}
    {"dtype": "float32", "shape": [...], "nbytes": ..., "compression": "int8", "scale": 0.0123}

``dtype`` and ``shape`` are those of the tensor the receiver gets back; ``nbytes`` counts the
bytes on the wire (after compression). Unknown meta keys are ignored (a newer minor may add
some). Compression, chosen per transfer (the planner picks it per link):

* ``"fp16"``: float32/float64 travel as float16 (halves the bytes); values beyond ±65504
  saturate to ±65504 instead of becoming inf; NaN stays NaN.
* ``"int8"``: float tensors travel as int8 with one symmetric scale per tensor
  (``scale = max|x| / 127``, error <= scale / 2); NaN travels as 0 and ±inf saturates.
* ``None``: bit-exact.

Other dtypes (ints, bool, already-half floats under "fp16") travel unchanged. torch is
imported inside the functions so that ``broker.protocol`` stays importable without it.
Copies: one when packing (tensor memory into the payload), one when unpacking (payload slice
into memory the returned tensor owns, so it is writable and outlives the payload).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgeslice.broker.protocol.errors import DecodeError, ProtocolError

if TYPE_CHECKING:
    import torch

# wire name -> bytes per element; the torch dtype is ``getattr(torch, name)``
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
COMPRESSIONS = ("fp16", "int8")
_WIRE_DTYPE = {"fp16": "float16", "int8": "int8"}
_COMPRESSIBLE = {
    "fp16": frozenset({"float32", "float64"}),
    "int8": frozenset({"float32", "float64", "float16", "bfloat16"}),
}
_FP16_MAX = 65504.0
_MAX_DIMS = 64


def _check_byteorder() -> None:
    if sys.byteorder != "little":
        raise ProtocolError("edgeslice tensors travel little-endian; big-endian hosts unsupported")


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise ProtocolError(
            f"tensor dtype {dtype} cannot be sent; supported: {', '.join(DTYPE_SIZES)}"
        )
    return name


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (bfloat16 has no numpy dtype, and
    storages offer no buffer protocol, hence ctypes). Valid while ``tensor`` is alive."""
    return memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr()))


def _owned_view(tensor: torch.Tensor) -> memoryview:
    """Like :func:`_raw_bytes`, but the view keeps ``tensor`` alive (safe to return)."""
    array = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
    array._edgeslice_keepalive = tensor  # type: ignore[attr-defined]
    return memoryview(array).cast("B").toreadonly()


def _quantise_int8(tensor: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor int8: NaN -> 0, ±inf saturate, scale from the finite peak."""
    import torch

    work = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
    magnitude = work.abs().nan_to_num_(nan=0.0, posinf=0.0)
    peak = float(magnitude.max()) if work.numel() else 0.0
    scale = peak / 127.0 if peak > 0.0 else 1.0
    scaled = torch.mul(work, 1.0 / scale).nan_to_num_(nan=0.0, posinf=127.0, neginf=-127.0)
    return scaled.round_().clamp_(-127, 127).to(torch.int8), scale


def pack_tensors(
    tensors: Sequence[torch.Tensor], compression: str | None = None
) -> tuple[list[dict[str, Any]], bytes | memoryview]:
    """Pack tensors into (meta per tensor, payload). Raises ProtocolError for an unsupported
    dtype, a non-tensor, a sparse tensor or an unknown compression."""
    import torch

    _check_byteorder()
    if compression is not None and compression not in COMPRESSIONS:
        raise ProtocolError(f"unknown compression {compression!r}; use None, 'fp16' or 'int8'")
    metas: list[dict[str, Any]] = []
    wire_tensors: list[torch.Tensor] = []  # keeps the memory behind the views alive
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ProtocolError(f"item {index} to pack is not a dense tensor: {type(tensor)}")
        name = _dtype_name(tensor.dtype)
        wire = tensor.detach().cpu().resolve_conj().resolve_neg()
        meta: dict[str, Any] = {"dtype": name, "shape": list(wire.shape)}
        if compression == "fp16" and name in _COMPRESSIBLE["fp16"]:
            wire = wire.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
            meta["compression"] = "fp16"
        elif compression == "int8" and name in _COMPRESSIBLE["int8"]:
            wire, meta["scale"] = _quantise_int8(wire)
            meta["compression"] = "int8"
        wire = wire.contiguous()
        meta["nbytes"] = wire.numel() * wire.element_size()
        metas.append(meta)
        wire_tensors.append(wire)
    if len(wire_tensors) == 1 and wire_tensors[0].numel():
        return metas, _owned_view(wire_tensors[0])  # the common case: no copy at all
    payload = b"".join([_raw_bytes(wire) for wire in wire_tensors if wire.numel()])
    return metas, payload


def _check_meta(index: int, meta: Any) -> tuple[str, list[int], int, str | None, float]:
    """Validate one tensor's meta; returns (dtype, shape, nbytes, compression, scale)."""
    where = f"tensor {index} meta"
    if not isinstance(meta, dict):
        raise DecodeError(f"{where} is a {type(meta).__name__}, not a map")
    name, shape, nbytes = meta.get("dtype"), meta.get("shape"), meta.get("nbytes")
    compression, scale = meta.get("compression"), meta.get("scale", 1.0)
    if type(name) is not str or name not in DTYPE_SIZES:
        raise DecodeError(f"{where}: unknown dtype {name!r}; known: {', '.join(DTYPE_SIZES)}")
    if not (
        isinstance(shape, list)
        and len(shape) <= _MAX_DIMS
        and all(type(d) is int and 0 <= d < 2**62 for d in shape)
    ):
        raise DecodeError(f"{where}: shape {shape!r:.120} is not a list of sizes >= 0")
    if compression is not None and (
        compression not in COMPRESSIONS or name not in _COMPRESSIBLE[compression]
    ):
        raise DecodeError(f"{where}: compression {compression!r} does not apply to {name}")
    if type(scale) not in (int, float) or not 0.0 < scale < math.inf:
        raise DecodeError(f"{where}: int8 scale {scale!r} is not a positive finite number")
    wire_name = _WIRE_DTYPE[compression] if compression else name
    expected = math.prod(shape) * DTYPE_SIZES[wire_name]
    if type(nbytes) is not int or nbytes != expected:
        raise DecodeError(f"{where}: nbytes {nbytes!r} != {expected} for {wire_name}{shape}")
    return name, shape, nbytes, compression, float(scale)


def unpack_tensors(
    meta: list[dict[str, Any]], payload: bytes | bytearray | memoryview, share: bool = False
) -> list[torch.Tensor]:
    """Rebuild tensors from :func:`pack_tensors` output. The tensors own their memory.

    With ``share=True`` and a bytearray payload the caller hands the buffer over: tensors
    wrap it without a copy (the receive path does this with reassembled payloads).
    Raises DecodeError when the meta is malformed, names an unknown dtype or does not add up
    to exactly the payload's length, or a bool tensor holds bytes other than 0 and 1.
    """
    import torch

    _check_byteorder()
    if not isinstance(meta, list):
        raise DecodeError(f"tensor meta is a {type(meta).__name__}, not a list")
    specs = [_check_meta(index, entry) for index, entry in enumerate(meta)]
    view = memoryview(payload).cast("B")
    described = sum(spec[2] for spec in specs)
    if described != view.nbytes:
        raise DecodeError(
            f"tensor meta describes {described} B but the payload has {view.nbytes} B; "
            "sender and receiver disagree on the tensors (check compression and shapes)"
        )
    tensors: list[torch.Tensor] = []
    offset = 0
    for index, (name, shape, nbytes, compression, scale) in enumerate(specs):
        wire_dtype = getattr(torch, _WIRE_DTYPE[compression] if compression else name)
        try:
            if nbytes == 0:
                wire = torch.empty(shape, dtype=wire_dtype)
            else:
                itemsize = DTYPE_SIZES[_WIRE_DTYPE[compression] if compression else name]
                if share and isinstance(payload, bytearray) and offset % itemsize == 0:
                    # the caller hands the buffer over (Reassembler output): no copy
                    source: bytearray = payload
                    start = offset
                else:
                    source, start = bytearray(view[offset : offset + nbytes]), 0
                wire = torch.frombuffer(
                    source, dtype=wire_dtype, count=nbytes // itemsize, offset=start
                ).reshape(shape)
        except RuntimeError as exc:  # e.g. a shape torch cannot allocate
            raise DecodeError(f"tensor {index}: cannot build {name}{shape}: {exc}") from exc
        offset += nbytes
        if name == "bool" and nbytes and bool((wire.view(torch.uint8) > 1).any()):
            raise DecodeError(f"tensor {index}: bool tensor holds bytes other than 0 and 1")
        dtype = getattr(torch, name)
        if compression == "fp16":
            wire = wire.to(dtype)
        elif compression == "int8":
            # float32 unless the scale itself is below float32's normal range (a subnormal
            # peak): there float32 would flush scale to zero and every value with it
            tiny = scale < torch.finfo(torch.float32).tiny
            work = torch.float64 if name == "float64" or tiny else torch.float32
            wire = (wire.to(work) * scale).to(dtype)
        tensors.append(wire)
    return tensors
