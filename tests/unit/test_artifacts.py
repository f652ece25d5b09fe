"""The signed artifact envelope and the fleet key pair: nothing unsigned, tampered,
re-packed or signed by anyone but the planner gets through."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat

import msgpack
import pytest
from click.testing import CliRunner

from edgeslice.broker.fleetkey import (
    ENV_KEY,
    ENV_KEY_FILE,
    generate_key,
    key_fingerprint,
    load_signing_key,
    load_verify_key,
    migrate_key,
    public_key_line,
    public_path_for,
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
from edgeslice.planner.cli import keygen_cmd

KEY = generate_key()  # the planner's
PUBLIC = KEY.public_key()  # what agents hold
OTHER = generate_key()  # another planner's
META = {"model": "m", "index": 1, "inputs": [TensorSpec((1, 3), "float32", "x").to_wire()]}


def _unpack(sealed: bytes) -> dict:
    return msgpack.unpackb(sealed, raw=False)


def _pack(envelope: dict) -> bytes:
    return msgpack.packb(envelope, use_bin_type=True)


def test_round_trip_returns_meta_and_body() -> None:
    sealed = seal(b"program bytes", {**META, "shape": (1, 2)}, KEY)
    meta, body = open_sealed(sealed, PUBLIC)
    assert body == b"program bytes"
    assert meta["shape"] == [1, 2] and meta["model"] == "m"
    assert TensorSpec.from_wire(meta["inputs"][0]) == TensorSpec((1, 3), "float32", "x")
    assert artifact_id(sealed) == hashlib.sha256(sealed).hexdigest()
    assert peek_meta(sealed)["index"] == 1
    assert _unpack(sealed)["kid"] == key_fingerprint(PUBLIC)


def test_bodies_of_every_length_class_open() -> None:
    for n in (0, 255, 256, 65535, 65536):  # msgpack bin8 / bin16 / bin32 boundaries
        assert open_sealed(seal(b"b" * n, META, KEY), PUBLIC)[1] == b"b" * n


def test_flipped_payload_byte_is_a_signature_error() -> None:
    sealed = bytearray(seal(b"A" * 64, META, KEY))
    at = bytes(sealed).index(b"A" * 64) + 10
    sealed[at] ^= 0x01
    with pytest.raises(SignatureError, match="bytes were altered"):
        open_sealed(bytes(sealed), PUBLIC)


def test_changed_meta_is_a_signature_error() -> None:
    envelope = _unpack(seal(b"body", META, KEY))
    envelope["meta"]["index"] = 2
    with pytest.raises(SignatureError, match="does not verify"):
        open_sealed(_pack(envelope), PUBLIC)


def test_no_single_flipped_byte_ever_opens() -> None:
    sealed = seal(b"body-bytes", META, KEY)
    for i in range(len(sealed)):
        broken = bytearray(sealed)
        broken[i] ^= 0x20
        with pytest.raises((SignatureError, DecodeError, VersionError)):
            open_sealed(bytes(broken), PUBLIC)


def test_signed_by_another_key_is_a_signature_error_naming_both_keys() -> None:
    with pytest.raises(SignatureError, match=r"fleet\.pub") as refused:
        open_sealed(seal(b"body", META, OTHER), PUBLIC)
    assert key_fingerprint(OTHER) in str(refused.value)
    assert key_fingerprint(PUBLIC) in str(refused.value)


def test_agent_material_cannot_sign() -> None:
    with pytest.raises(SignatureError, match="only the planner's private key"):
        seal(b"body", META, PUBLIC)  # type: ignore[arg-type]
    # what a captured agent could try with what it holds: the public key bytes as a MAC
    # key, a signature lifted from another artifact, or claiming the planner's key id
    genuine = _unpack(seal(b"other body", META, KEY))
    raw = bytes.fromhex(public_key_line(PUBLIC).split(":")[1])
    forged = _unpack(seal(b"evil", META, OTHER))
    forged["kid"] = key_fingerprint(PUBLIC)
    for sig in (hmac.new(raw, b"evil", hashlib.sha512).digest(), genuine["sig"], forged["sig"]):
        with pytest.raises(SignatureError):
            open_sealed(_pack({**forged, "sig": sig}), PUBLIC)


def test_replayed_under_a_new_name_is_a_signature_error() -> None:
    sealed = seal(b"old stage", META, KEY)
    envelope = _unpack(sealed)
    renamed = [
        _pack({**envelope, "note": "v2"}),  # an extra field
        _pack({k: envelope[k] for k in reversed(envelope)}),  # fields in another order
        _pack({**envelope, "meta": dict(reversed(envelope["meta"].items()))}),  # meta order
        sealed.replace(b"\xc4\x09old stage", b"\xc6\x00\x00\x00\x09old stage"),  # bin32
    ]
    for data in renamed:
        assert artifact_id(data) != artifact_id(sealed)
        with pytest.raises(SignatureError):
            open_sealed(data, PUBLIC)
    body = _unpack(seal(b"new stage", META, KEY))
    with pytest.raises(SignatureError):  # an old signature over a new body
        open_sealed(_pack({**body, "sig": envelope["sig"]}), PUBLIC)


def test_old_hmac_artifact_is_refused_naming_the_migration() -> None:
    old = _pack({"v": 1, "meta": META, "body": b"x", "sig": b"\x00" * 32})
    with pytest.raises(SignatureError, match="keygen --migrate"):
        open_sealed(old, PUBLIC)


def test_unsigned_envelope_is_refused() -> None:
    envelope = _unpack(seal(b"x", META, KEY))
    envelope["sig"] = b""
    with pytest.raises(SignatureError, match="unsigned"):
        open_sealed(_pack(envelope), PUBLIC)


def test_not_an_envelope_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        open_sealed(b"PK\x03\x04 a bare zip archive", PUBLIC)
    with pytest.raises(DecodeError):
        open_sealed(msgpack.packb([1, 2, 3]), PUBLIC)
    with pytest.raises(DecodeError, match="limit"):
        open_sealed(seal(b"x" * 1000, META, KEY), PUBLIC, max_bytes=100)


def test_newer_envelope_version_is_refused() -> None:
    envelope = _unpack(seal(b"body", META, KEY))
    envelope["v"] = 99
    with pytest.raises(VersionError, match="upgrade"):
        open_sealed(_pack(envelope), PUBLIC)


def test_an_old_shared_key_cannot_seal_or_verify() -> None:
    with pytest.raises(ConfigError, match="keygen --migrate"):
        seal(b"body", META, b"\x01" * 32)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="keygen --migrate"):
        open_sealed(seal(b"body", META, KEY), b"\x01" * 32)  # type: ignore[arg-type]


# -- key files ------------------------------------------------------------------------
def test_write_key_writes_a_private_key_and_its_public_key(tmp_path) -> None:
    path = tmp_path / "conf" / "fleet.key"
    key = write_key(path)
    public = tmp_path / "conf" / "fleet.pub"
    assert public_path_for(path) == public
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in public.read_text()
    assert key_fingerprint(load_signing_key(str(path))) == key_fingerprint(key)
    assert key_fingerprint(load_verify_key(str(public))) == key_fingerprint(key)
    with pytest.raises(ConfigError, match="already exists"):
        write_key(path)
    assert key_fingerprint(load_signing_key(str(path))) == key_fingerprint(key)
    new = write_key(path, force=True)
    assert key_fingerprint(new) != key_fingerprint(key)
    assert key_fingerprint(load_verify_key(str(public))) == key_fingerprint(new)


def test_planner_needs_the_private_key(tmp_path) -> None:
    write_key(tmp_path / "fleet.key")
    with pytest.raises(ConfigError, match="needs the private key"):
        load_signing_key(str(tmp_path / "fleet.pub"))


def test_agent_given_the_private_key_warns_and_verifies(tmp_path, caplog) -> None:
    key = write_key(tmp_path / "fleet.key")
    with caplog.at_level(logging.WARNING):
        public = load_verify_key(str(tmp_path / "fleet.key"))
    assert "need only the public key" in caplog.text
    assert open_sealed(seal(b"b", META, key), public)[1] == b"b"


def test_key_resolution_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    with pytest.raises(ConfigError, match="edgeslice keygen"):
        load_verify_key()
    with pytest.raises(ConfigError, match="edgeslice keygen"):
        load_signing_key()
    default = write_key(tmp_path / "xdg" / "edgeslice" / "fleet.key")
    assert key_fingerprint(load_signing_key()) == key_fingerprint(default)
    assert key_fingerprint(load_verify_key()) == key_fingerprint(default)  # from fleet.pub
    from_file = write_key(tmp_path / "env.key")
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "env.pub"))
    assert key_fingerprint(load_verify_key()) == key_fingerprint(from_file)
    from_env = generate_key()
    monkeypatch.setenv(ENV_KEY, public_key_line(from_env))
    assert key_fingerprint(load_verify_key()) == key_fingerprint(from_env)
    explicit = write_key(tmp_path / "flag.key")
    assert key_fingerprint(load_verify_key(str(tmp_path / "flag.pub"))) == key_fingerprint(explicit)


def test_bad_keys_name_their_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_KEY, "not-a-key")
    with pytest.raises(ConfigError, match=ENV_KEY):
        load_verify_key()
    monkeypatch.setenv(ENV_KEY, "ed25519-pub:abcd")
    with pytest.raises(ConfigError, match="does not parse"):
        load_verify_key()
    with pytest.raises(ConfigError, match="does not exist"):
        load_verify_key(str(tmp_path / "missing.pub"))


def test_an_old_shared_key_file_names_the_migration(tmp_path, monkeypatch) -> None:
    old = tmp_path / "fleet.key"
    old.write_text(os.urandom(32).hex() + "\n")
    for load in (load_signing_key, load_verify_key):
        with pytest.raises(ConfigError, match=r"old shared HMAC key.*keygen --migrate"):
            load(str(old))
    monkeypatch.setenv(ENV_KEY, os.urandom(32).hex())
    with pytest.raises(ConfigError, match="keygen --migrate"):
        load_verify_key()


def test_migrate_replaces_an_old_shared_key_in_one_step(tmp_path) -> None:
    path = tmp_path / "fleet.key"
    secret = os.urandom(32).hex() + "\n"
    path.write_text(secret)
    os.chmod(path, 0o600)
    key, backup = migrate_key(path)
    assert backup == tmp_path / "fleet.key.hmac-old" and backup.read_text() == secret
    assert key_fingerprint(load_signing_key(str(path))) == key_fingerprint(key)
    assert key_fingerprint(load_verify_key(str(tmp_path / "fleet.pub"))) == key_fingerprint(key)
    with pytest.raises(ConfigError, match="nothing to migrate"):
        migrate_key(path)  # already a key pair
    with pytest.raises(ConfigError, match="nothing to migrate"):
        migrate_key(tmp_path / "missing.key")


def test_keygen_says_what_to_copy_where(tmp_path) -> None:
    out = tmp_path / "fleet.key"
    result = CliRunner().invoke(keygen_cmd, ["--out", str(out)])
    assert result.exit_code == 0, result.output
    fingerprint = key_fingerprint(load_signing_key(str(out)))
    assert fingerprint in result.output
    assert "keep it on the planner machine only" in result.output
    assert "copy fleet.pub to every agent" in result.output
    again = CliRunner().invoke(keygen_cmd, ["--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    out.write_text(os.urandom(32).hex())
    migrated = CliRunner().invoke(keygen_cmd, ["--out", str(out), "--migrate"])
    assert migrated.exit_code == 0, migrated.output
    assert "fleet.key.hmac-old" in migrated.output
    assert key_fingerprint(load_signing_key(str(out))) != fingerprint


def test_fingerprint_names_the_pair_and_differs_between_keys() -> None:
    key = generate_key()
    assert key_fingerprint(key) == key_fingerprint(key.public_key())
    assert key_fingerprint(key) != key_fingerprint(generate_key())
