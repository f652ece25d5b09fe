"""The signed envelope around stage artifacts (pure: no torch, no I/O).

A stage artifact is a ``torch.export`` program plus weights. Loading one runs
``torch.export.load``, which may unpickle (sample inputs, tensor subclasses), so
an agent must never deserialize bytes that did not come from its planner. The
planner therefore seals every artifact with an HMAC-SHA256 under the *fleet key*
(a shared secret made by ``edgeslice keygen``), and agents verify before anything
else touches the body.

Envelope (one msgpack map)::

    {"v": 1, "meta": {...}, "body": <bin>, "sig": <bin 32>}

``sig = HMAC-SHA256(key, DOMAIN || v || len(meta) || canonical(meta) || body)`` where
``canonical`` is msgpack with dict keys sorted and tuples as lists, so a meta map
survives an unpack/re-pack round trip bit for bit. Artifacts are content-addressed
by :func:`artifact_id`, the sha256 of the whole sealed envelope.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from edgeslice.broker.protocol.errors import ConfigError, DecodeError, SignatureError, VersionError

ENVELOPE_VERSION = 1
STAGE_KIND = "edgeslice.stage"  # meta["kind"] of a stage artifact
STAGE_FORMAT = "torch.export.pt2"  # meta["format"]: the body is a torch.export.save archive
MAX_ARTIFACT_BYTES = 1 << 30  # 1 GiB: larger than any stage we expect on a small device
MAX_META_ITEMS = 4096
MIN_KEY_BYTES = 16
_DOMAIN = b"edgeslice/artifact\x00"
_KEY_HELP = (
    "check that the planner and every agent use the same fleet key "
    "(create one with `edgeslice keygen`, share it via EDGESLICE_FLEET_KEY_FILE)"
)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype (torch name without ``torch.``, e.g. ``float32``) of a stage input/output."""

    shape: tuple[int, ...]
    dtype: str
    name: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "name": self.name}

    @classmethod
    def from_wire(cls, data: Any) -> TensorSpec:
        """Parse a spec map; anything malformed is a :class:`DecodeError`."""
        if not isinstance(data, dict):
            raise DecodeError(f"tensor spec must be a map, got {type(data).__name__}")
        shape, dtype, name = data.get("shape"), data.get("dtype"), data.get("name", "")
        if not isinstance(shape, list | tuple) or not all(
            isinstance(d, int) and d >= 0 for d in shape
        ):
            raise DecodeError(f"tensor spec shape must be a list of sizes, got {shape!r}")
        if not isinstance(dtype, str) or not isinstance(name, str):
            raise DecodeError(f"tensor spec dtype/name must be strings, got {data!r}")
        return cls(tuple(shape), dtype, name)

    def describe(self) -> str:
        return f"{self.name or 'tensor'}:{self.dtype}{list(self.shape)}"


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"fleet key must be at least {MIN_KEY_BYTES} bytes; create one with `edgeslice keygen`"
        )


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    return obj


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(_canonical(meta), use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"artifact meta is not msgpack-serializable: {exc}") from exc
    return packed


def _mac(key: bytes, version: int, meta_bytes: bytes, body: bytes) -> bytes:
    mac = hmac.new(bytes(key), _DOMAIN, hashlib.sha256)
    mac.update(struct.pack(">IQ", version, len(meta_bytes)))
    mac.update(meta_bytes)
    mac.update(body)
    return mac.digest()


def seal(body: bytes, meta: dict[str, Any], key: bytes) -> bytes:
    """Wrap ``body`` and ``meta`` (string keys, msgpack types) in a signed envelope."""
    _check_key(key)
    if not all(isinstance(k, str) for k in meta):
        raise DecodeError("artifact meta keys must be strings")
    meta_bytes = _meta_bytes(meta)
    envelope = {
        "v": ENVELOPE_VERSION,
        "meta": _canonical(meta),
        "body": bytes(body),
        "sig": _mac(key, ENVELOPE_VERSION, meta_bytes, bytes(body)),
    }
    sealed: bytes = msgpack.packb(envelope, use_bin_type=True)
    return sealed


def _unpack_envelope(data: bytes, max_bytes: int) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"artifact must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DecodeError(f"artifact is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        envelope = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=1 << 20,
            max_array_len=MAX_META_ITEMS,
            max_map_len=MAX_META_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise DecodeError(f"artifact is not a msgpack envelope ({type(exc).__name__})") from exc
    if not isinstance(envelope, dict) or not {"v", "meta", "body"} <= set(envelope):
        raise DecodeError("artifact is not an edgeslice envelope (needs v, meta, body, sig)")
    return envelope


def open_sealed(
    data: bytes, key: bytes, max_bytes: int = MAX_ARTIFACT_BYTES
) -> tuple[dict[str, Any], bytes]:
    """Verify and unwrap an envelope; returns ``(meta, body)``.

    Raises :class:`SignatureError` when the signature is missing or does not verify
    (tampered bytes or a different fleet key), :class:`DecodeError` when the bytes are
    not an envelope at all, :class:`VersionError` for a newer envelope version.
    """
    _check_key(key)
    envelope = _unpack_envelope(data, max_bytes)
    version, meta, body, sig = (envelope.get(k) for k in ("v", "meta", "body", "sig"))
    if not isinstance(version, int) or not isinstance(meta, dict) or not isinstance(body, bytes):
        raise DecodeError("artifact envelope fields have the wrong types")
    if version > ENVELOPE_VERSION:
        raise VersionError(
            f"artifact envelope version {version} is newer than this edgeslice understands "
            f"({ENVELOPE_VERSION}); upgrade edgeslice on this device"
        )
    if not isinstance(sig, bytes) or not sig:
        raise SignatureError(f"artifact is unsigned; refusing to load it; {_KEY_HELP}")
    expected = _mac(key, version, _meta_bytes(meta), body)
    if not hmac.compare_digest(expected, sig):
        raise SignatureError(
            f"artifact signature does not verify (tampered, or signed with another fleet "
            f"key); refusing to load it; {_KEY_HELP}"
        )
    return meta, body


def peek_meta(data: bytes, max_bytes: int = MAX_ARTIFACT_BYTES) -> dict[str, Any]:
    """The meta map *without* verifying the signature: for display only, never for loading."""
    meta = _unpack_envelope(data, max_bytes).get("meta")
    if not isinstance(meta, dict):
        raise DecodeError("artifact envelope has no meta map")
    return meta


def artifact_id(data: bytes) -> str:
    """Content address of a sealed artifact: sha256 hex of the envelope bytes."""
    return hashlib.sha256(data).hexdigest()
