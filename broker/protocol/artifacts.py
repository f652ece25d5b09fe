"""The signed envelope around stage artifacts (pure: no torch, no I/O).

A stage artifact is a ``torch.export`` program plus weights. Loading one runs
``torch.export.load``, which may unpickle (sample inputs, tensor subclasses), so
an agent must never deserialize bytes that did not come from its planner. The
planner therefore signs every artifact with its **Ed25519 private key** (made by
``edgeslice keygen``, see :mod:`edgeslice.broker.fleetkey`), and agents, which hold
only the matching *public* key, verify before anything else touches the body. An
agent's key material cannot sign: a captured device cannot make an artifact the
rest of the fleet would load.

Envelope (one msgpack map, keys in this order)::

    {"v": 2, "alg": "ed25519", "kid": <str>, "meta": {...}, "body": <bin>, "sig": <bin 64>}

``kid`` is the signer's public key fingerprint (for error messages; it is signed too).
``sig = Ed25519-sign(DOMAIN || v || alg || kid || sha256(len(meta) || canonical(meta) ||
body))`` where ``canonical`` is msgpack with dict keys sorted and tuples as lists. The
envelope must itself be in canonical form (what :func:`seal` writes, byte for byte), so
one signed ``(meta, body)`` has exactly one encoding and one content address
(:func:`artifact_id`, the sha256 of the whole envelope): a signed artifact cannot be
re-packed to pass under another name.

Version 1 envelopes were sealed with an HMAC under a key every agent shared; they are
refused with a :class:`SignatureError` that names the migration (``edgeslice keygen
--migrate`` on the planner, then copy ``fleet.pub`` to the agents).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from edgeslice.broker.protocol.errors import ConfigError, DecodeError, SignatureError, VersionError

ENVELOPE_VERSION = 2
HMAC_ENVELOPE_VERSION = 1  # the shared-key envelope before Ed25519; refused
ALGORITHM = "ed25519"
STAGE_KIND = "edgeslice.stage"  # meta["kind"] of a stage artifact
STAGE_FORMAT = "torch.export.pt2"  # meta["format"]: the body is a torch.export.save archive
MAX_ARTIFACT_BYTES = 1 << 30  # 1 GiB: larger than any stage we expect on a small device
MAX_META_ITEMS = 4096
SIGNATURE_BYTES = 64
_DOMAIN = b"edgeslice/artifact/ed25519\x00"
_FIELDS = ("v", "alg", "kid", "meta", "body", "sig")
MIGRATE_HELP = (
    "run `edgeslice keygen --migrate` on the planner machine (it replaces the old shared "
    "fleet.key with an Ed25519 key pair), restart the planner, and copy its fleet.pub to "
    "every agent"
)
_KEY_HELP = (
    "check that every agent has the planner's public key (fleet.pub, made by `edgeslice "
    "keygen` next to the planner's fleet.key; give it with --fleet-key-file or "
    "EDGESLICE_FLEET_KEY_FILE)"
)

PublicKey = Ed25519PublicKey
PrivateKey = Ed25519PrivateKey


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


def public_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """First 16 hex digits of sha256 of the raw public key: how logs and errors name a key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(b"edgeslice-fleet-key\x00" + raw).hexdigest()[:16]


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


def _message(version: int, alg: str, kid: str, meta_bytes: bytes, body: bytes) -> bytes:
    """What the signature covers: the header fields and a digest of meta and body."""
    digest = hashlib.sha256(struct.pack(">Q", len(meta_bytes)))
    digest.update(meta_bytes)
    digest.update(body)
    header = b"".join(_lp(f.encode()) for f in (alg, kid))
    return _DOMAIN + struct.pack(">I", version) + header + digest.digest()


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 1 << 16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def seal(body: bytes, meta: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """Wrap ``body`` and ``meta`` (string keys, msgpack types) in an envelope signed by ``key``.

    Only the planner's private key signs; a public key (what agents hold) is a
    :class:`SignatureError`, anything else (an old shared HMAC key) a :class:`ConfigError`.
    """
    if isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            "cannot sign an artifact with a public key (fleet.pub): only the planner's "
            "private key (fleet.key) signs; agents can only verify"
        )
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"artifacts are signed with an Ed25519 private key, got {type(key).__name__}; "
            f"{MIGRATE_HELP}"
        )
    if not all(isinstance(k, str) for k in meta):
        raise DecodeError("artifact meta keys must be strings")
    meta_bytes = _meta_bytes(meta)
    kid = public_fingerprint(key)
    message = _message(ENVELOPE_VERSION, ALGORITHM, kid, meta_bytes, bytes(body))
    envelope = {
        "v": ENVELOPE_VERSION,
        "alg": ALGORITHM,
        "kid": kid,
        "meta": _canonical(meta),
        "body": bytes(body),
        "sig": key.sign(message),
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


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _is_canonical(data: bytes, envelope: dict[str, Any], meta_bytes: bytes) -> bool:
    """Whether ``data`` is byte for byte what :func:`seal` writes (the body is not copied)."""
    if tuple(envelope) != _FIELDS:
        return False
    body: bytes = envelope["body"]
    head = [b"\x86"]  # a msgpack fixmap of the six fields, in _FIELDS order
    for field in ("v", "alg", "kid"):
        head += [_pack(field), _pack(envelope[field])]
    head += [_pack("meta"), meta_bytes, _pack("body"), _bin_header(len(body))]
    prefix = b"".join(head)
    tail = _pack("sig") + _pack(envelope["sig"])
    split = len(prefix) + len(body)
    view = memoryview(data)
    return (
        len(data) == split + len(tail)
        and view[: len(prefix)] == prefix
        and view[len(prefix) : split] == body
        and view[split:] == tail
    )


def open_sealed(
    data: bytes, key: Ed25519PublicKey | Ed25519PrivateKey, max_bytes: int = MAX_ARTIFACT_BYTES
) -> tuple[dict[str, Any], bytes]:
    """Verify and unwrap an envelope with the planner's public key; returns ``(meta, body)``.

    Raises :class:`SignatureError` when the signature is missing or does not verify
    (tampered bytes, another planner's key, re-packed, or an old HMAC-sealed artifact),
    :class:`DecodeError` when the bytes are not an envelope at all, :class:`VersionError`
    for a newer envelope version.
    """
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"artifacts are verified with the planner's Ed25519 public key, got "
            f"{type(key).__name__}; {MIGRATE_HELP}"
        )
    envelope = _unpack_envelope(data, max_bytes)
    version, alg, kid, meta, body, sig = (envelope.get(k) for k in _FIELDS)
    if not isinstance(version, int) or not isinstance(meta, dict) or not isinstance(body, bytes):
        raise DecodeError("artifact envelope fields have the wrong types")
    if version > ENVELOPE_VERSION:
        raise VersionError(
            f"artifact envelope version {version} is newer than this edgeslice understands "
            f"({ENVELOPE_VERSION}); upgrade edgeslice on this device"
        )
    if version <= HMAC_ENVELOPE_VERSION:
        raise SignatureError(
            f"artifact envelope version {version} is sealed with the old shared HMAC fleet "
            f"key, which agents no longer trust; refusing to load it; {MIGRATE_HELP}"
        )
    if not isinstance(sig, bytes) or not sig:
        raise SignatureError(f"artifact is unsigned; refusing to load it; {_KEY_HELP}")
    if alg != ALGORITHM or not isinstance(kid, str) or len(sig) != SIGNATURE_BYTES:
        raise SignatureError(
            f"artifact signature is not an {ALGORITHM} signature (alg {alg!r}); refusing "
            f"to load it; {_KEY_HELP}"
        )
    meta_bytes = _meta_bytes(meta)
    mine = public_fingerprint(key)
    try:
        key.verify(sig, _message(version, alg, kid, meta_bytes, body))
    except InvalidSignature:
        signer = (
            f"it names signer key {kid}, this device trusts key {mine}"
            if kid != mine
            else f"signer key {kid} is this device's key, so the bytes were altered"
        )
        raise SignatureError(
            f"artifact signature does not verify ({signer}); refusing to load it; {_KEY_HELP}"
        ) from None
    if not _is_canonical(bytes(data), envelope, meta_bytes):
        raise SignatureError(
            "artifact envelope was re-packed after signing (not the planner's encoding, so "
            "its name is not the planner's); refusing to load it"
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
