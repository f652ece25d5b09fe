"""The signed artifact envelope and the fleet key: nothing unsigned or tampered gets through."""

from __future__ import annotations

import hashlib
import os
import stat

import msgpack
import pytest

from edgeslice.broker.fleetkey import (
    ENV_KEY,
    ENV_KEY_FILE,
    generate_key,
    key_fingerprint,
    load_key,
    write_key,
)
from edgeslice.broker.protocol.artifacts import (
    TensorSpec,
    artifact_id,
    open_sealed,
    peek_meta,
    seal,
)
from edgeslice.broker.protocol.errors import ConfigError, DecodeError, SignatureError, VersionError

KEY = b"\x01" * 32
OTHER = b"\x02" * 32
META = {"model": "m", "index": 1, "inputs": [TensorSpec((1, 3), "float32", "x").to_wire()]}


def test_round_trip_returns_meta_and_body() -> None:
    sealed = seal(b"program bytes", {**META, "shape": (1, 2)}, KEY)
    meta, body = open_sealed(sealed, KEY)
    assert body == b"program bytes"
    assert meta["shape"] == [1, 2] and meta["model"] == "m"
    assert TensorSpec.from_wire(meta["inputs"][0]) == TensorSpec((1, 3), "float32", "x")
    assert artifact_id(sealed) == hashlib.sha256(sealed).hexdigest()
    assert peek_meta(sealed)["index"] == 1


def test_tampered_body_byte_is_a_signature_error() -> None:
    sealed = bytearray(seal(b"A" * 64, META, KEY))
    at = bytes(sealed).index(b"A" * 64) + 10
    sealed[at] ^= 0x01
    with pytest.raises(SignatureError, match="fleet key"):
        open_sealed(bytes(sealed), KEY)


def test_tampered_meta_is_a_signature_error() -> None:
    envelope = msgpack.unpackb(seal(b"body", META, KEY), raw=False)
    envelope["meta"]["index"] = 2
    with pytest.raises(SignatureError):
        open_sealed(msgpack.packb(envelope, use_bin_type=True), KEY)


def test_no_single_flipped_byte_ever_opens() -> None:
    sealed = seal(b"body-bytes", META, KEY)
    for i in range(len(sealed)):
        broken = bytearray(sealed)
        broken[i] ^= 0x20
        with pytest.raises((SignatureError, DecodeError, VersionError)):
            open_sealed(bytes(broken), KEY)


def test_wrong_key_is_a_signature_error() -> None:
    with pytest.raises(SignatureError, match="edgeslice keygen"):
        open_sealed(seal(b"body", META, KEY), OTHER)


def test_unsigned_envelope_is_refused() -> None:
    unsigned = msgpack.packb({"v": 1, "meta": META, "body": b"x"}, use_bin_type=True)
    with pytest.raises(SignatureError, match="unsigned"):
        open_sealed(unsigned, KEY)


def test_not_an_envelope_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        open_sealed(b"PK\x03\x04 a bare zip archive", KEY)
    with pytest.raises(DecodeError):
        open_sealed(msgpack.packb([1, 2, 3]), KEY)
    with pytest.raises(DecodeError, match="limit"):
        open_sealed(seal(b"x" * 1000, META, KEY), KEY, max_bytes=100)


def test_newer_envelope_version_is_refused() -> None:
    envelope = msgpack.unpackb(seal(b"body", META, KEY), raw=False)
    envelope["v"] = 99
    with pytest.raises(VersionError, match="upgrade"):
        open_sealed(msgpack.packb(envelope, use_bin_type=True), KEY)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="keygen"):
        seal(b"body", META, b"short")


def test_write_key_is_private_and_does_not_overwrite(tmp_path) -> None:
    path = tmp_path / "conf" / "fleet.key"
    key = write_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(str(path)) == key
    with pytest.raises(ConfigError, match="already exists"):
        write_key(path)
    assert load_key(str(path)) == key
    new = write_key(path, force=True)
    assert new != key and load_key(str(path)) == new


def test_key_resolution_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    with pytest.raises(ConfigError, match="edgeslice keygen"):
        load_key()
    default = write_key(tmp_path / "xdg" / "edgeslice" / "fleet.key")
    assert load_key() == default
    from_file = write_key(tmp_path / "env.key")
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "env.key"))
    assert load_key() == from_file
    from_env = generate_key()
    monkeypatch.setenv(ENV_KEY, from_env.hex())
    assert load_key() == from_env
    explicit = write_key(tmp_path / "flag.key")
    assert load_key(str(tmp_path / "flag.key")) == explicit


def test_bad_keys_name_their_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_KEY, "not-hex")
    with pytest.raises(ConfigError, match=ENV_KEY):
        load_key()
    monkeypatch.setenv(ENV_KEY, "abcd")
    with pytest.raises(ConfigError, match="at least 16"):
        load_key()
    with pytest.raises(ConfigError, match="does not exist"):
        load_key(str(tmp_path / "missing.key"))


def test_fingerprint_identifies_without_revealing() -> None:
    key = generate_key()
    assert key_fingerprint(key) == key_fingerprint(bytes(key))
    assert key_fingerprint(key) != key_fingerprint(generate_key())
    assert key.hex()[:12] != key_fingerprint(key)
