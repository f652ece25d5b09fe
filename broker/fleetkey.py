"""The fleet's artifact signing key pair, how it is written, and where each side finds it.

The planner signs every stage artifact with an Ed25519 **private** key; agents verify
with the matching **public** key before loading (``torch.export.load`` may unpickle), and
cannot sign. ``edgeslice keygen`` writes both, as PEM (``openssl pkey`` reads them):

* ``fleet.key`` — the private key, mode 0600: keep it on the planner machine only;
* ``fleet.pub`` — the public key, next to it: copy it to every agent.

Both sides resolve their key the same way, first match wins:

1. an explicit path (``--fleet-key-file``);
2. ``EDGESLICE_FLEET_KEY`` — the key itself: PEM text, or the one-line
   ``ed25519-pub:<hex>`` form that ``edgeslice keygen`` prints (``ed25519-key:<hex>``
   for a private key);
3. ``EDGESLICE_FLEET_KEY_FILE`` — a path;
4. ``$XDG_CONFIG_HOME/edgeslice/`` (default ``~/.config/edgeslice/``): ``fleet.key`` for
   the planner; ``fleet.pub`` for an agent, else ``fleet.key``.

The planner needs the private key and says so when given only a public one. An agent
given a private key derives the public key but warns: agents need only ``fleet.pub``. A
key file holding one line of hex is the old shared HMAC key; it is refused with the
migration (:func:`migrate_key`, ``edgeslice keygen --migrate``). Use
:func:`key_fingerprint` to compare keys between devices in logs.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from edgeslice.broker.protocol.artifacts import MIGRATE_HELP, public_fingerprint
from edgeslice.broker.protocol.errors import ConfigError

log = logging.getLogger(__name__)

ENV_KEY = "EDGESLICE_FLEET_KEY"
ENV_KEY_FILE = "EDGESLICE_FLEET_KEY_FILE"
PUBLIC_PREFIX = "ed25519-pub:"
PRIVATE_PREFIX = "ed25519-key:"
OLD_SUFFIX = ".hmac-old"  # what `keygen --migrate` renames an old shared key to
_HEX_RE = re.compile(r"^[0-9a-fA-F]{32,}$")
_HELP = (
    "run `edgeslice keygen` on the planner machine, keep its fleet.key there and copy "
    "fleet.pub to every agent (or set EDGESLICE_FLEET_KEY_FILE)"
)

Key = Ed25519PrivateKey | Ed25519PublicKey


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/edgeslice/fleet.key``, falling back to ``~/.config``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeslice" / "fleet.key"


def public_path_for(private_path: str | Path) -> Path:
    """Where the public key of ``private_path`` goes: ``fleet.key`` -> ``fleet.pub``."""
    path = Path(private_path).expanduser()
    stem = path.stem if path.suffix == ".key" else path.name
    return path.with_name(f"{stem}.pub")


def generate_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def key_fingerprint(key: Key) -> str:
    """16 hex digits naming the key pair (same for its private and public half)."""
    return public_fingerprint(key)


def public_key_line(key: Key) -> str:
    """The one-line ``ed25519-pub:<hex>`` form of the public key (for EDGESLICE_FLEET_KEY)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return PUBLIC_PREFIX + public.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def _write_atomic(target: Path, data: bytes, mode: int) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_key(
    path: str | Path | None = None, key: Ed25519PrivateKey | None = None, force: bool = False
) -> Ed25519PrivateKey:
    """Write ``key`` (a new one by default) to ``path`` (mode 0600) and its public key to
    :func:`public_path_for` ``path`` (mode 0644); returns the private key.

    Refuses to overwrite an existing file unless ``force``: replacing the key invalidates
    every artifact already cached on the fleet's devices.
    """
    target = Path(path).expanduser() if path is not None else default_key_path()
    public = public_path_for(target)
    key = generate_key() if key is None else key
    for existing in (target, public):
        if existing.exists() and not force:
            hint = " or --migrate to replace an old shared HMAC key" if existing == target else ""
            raise ConfigError(
                f"fleet key file {str(existing)!r} already exists; use --force to replace "
                f"it{hint} (every agent will then need the new fleet.pub)"
            )
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(target, _private_pem(key), 0o600)
    _write_atomic(public, _public_pem(key), 0o644)
    log.info(
        "wrote fleet key pair private=%s public=%s fingerprint=%s",
        target,
        public,
        key_fingerprint(key),
    )
    return key


def migrate_key(path: str | Path | None = None) -> tuple[Ed25519PrivateKey, Path]:
    """Replace the old shared HMAC key at ``path`` with a new key pair, in one step.

    The old key file is renamed to ``<name>.hmac-old`` (still mode 0600; delete it, and the
    copies on the agents, once the fleet runs on the new key). Returns the new private key
    and where the old key went. Refuses when ``path`` holds no old key.
    """
    target = Path(path).expanduser() if path is not None else default_key_path()
    try:
        text = target.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"--migrate found no fleet key at {str(target)!r}, so there is nothing to "
            "migrate; run `edgeslice keygen` without --migrate to create a key pair"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read fleet key file {str(target)!r}: {exc}") from exc
    if not _HEX_RE.match(text.strip()):
        raise ConfigError(
            f"{str(target)!r} is not an old shared HMAC key (one line of hex), so there is "
            "nothing to migrate; use --force to replace a key pair"
        )
    backup = target.with_name(target.name + OLD_SUFFIX)
    os.replace(target, backup)
    try:
        key = write_key(target, force=True)
    except BaseException:
        os.replace(backup, target)
        raise
    return key, backup


def _parse(text: str, source: str) -> Key:
    stripped = text.strip()
    try:
        if stripped.startswith("-----BEGIN") and "PRIVATE KEY" in stripped.split("\n", 1)[0]:
            key: object = load_pem_private_key(stripped.encode(), password=None)
        elif stripped.startswith("-----BEGIN") and "PUBLIC KEY" in stripped.split("\n", 1)[0]:
            key = load_pem_public_key(stripped.encode())
        elif stripped.startswith(PUBLIC_PREFIX):
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(stripped[len(PUBLIC_PREFIX) :]))
        elif stripped.startswith(PRIVATE_PREFIX):
            raw = bytes.fromhex(stripped[len(PRIVATE_PREFIX) :])
            key = Ed25519PrivateKey.from_private_bytes(raw)
        elif _HEX_RE.match(stripped):
            raise ConfigError(
                f"fleet key from {source} is an old shared HMAC key, which edgeslice no "
                f"longer uses (any device holding it could sign artifacts); {MIGRATE_HELP}"
            )
        else:
            raise ConfigError(
                f"fleet key from {source} is not a PEM key or an {PUBLIC_PREFIX}<hex> line; {_HELP}"
            )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"fleet key from {source} does not parse ({exc}); it must be an unencrypted "
            f"Ed25519 key as written by `edgeslice keygen`; {_HELP}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise ConfigError(
            f"fleet key from {source} is a {type(key).__name__}, not an Ed25519 key; {_HELP}"
        )
    return key


def _read_key_file(path: Path, source: str) -> Key:
    label = f"{source} {str(path)!r}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"fleet key file {label} does not exist; {_HELP}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read fleet key file {label}: {exc}") from exc
    key = _parse(text, label)
    mode = stat.S_IMODE(path.stat().st_mode)
    if isinstance(key, Ed25519PrivateKey) and mode & 0o077:
        log.warning("private fleet key %s is readable by others (mode %o); chmod 600", path, mode)
    return key


def _resolve(path: str | None, defaults: list[Path]) -> Key:
    if path:
        return _read_key_file(Path(path).expanduser(), "--fleet-key-file")
    env_key = os.environ.get(ENV_KEY)
    if env_key:
        return _parse(env_key, ENV_KEY)
    env_file = os.environ.get(ENV_KEY_FILE)
    if env_file:
        return _read_key_file(Path(env_file).expanduser(), ENV_KEY_FILE)
    for default in defaults:
        if default.exists():
            return _read_key_file(default, "default location")
    raise ConfigError(
        f"no fleet key: none given with --fleet-key-file, {ENV_KEY} or {ENV_KEY_FILE}, and "
        f"{' / '.join(repr(str(d)) for d in defaults)} does not exist; {_HELP}"
    )


def load_signing_key(path: str | None = None) -> Ed25519PrivateKey:
    """The planner's private key (see the module docstring); ``ConfigError`` if none or public."""
    key = _resolve(path, [default_key_path()])
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"the planner was given a public key (fingerprint {key_fingerprint(key)}), which "
            "can only verify: it signs artifacts and needs the private key, the fleet.key "
            "that `edgeslice keygen` wrote next to fleet.pub (--fleet-key-file fleet.key)"
        )
    return key


def load_verify_key(path: str | None = None) -> Ed25519PublicKey:
    """An agent's public key (see the module docstring); warns when given the private key."""
    default = default_key_path()
    key = _resolve(path, [public_path_for(default), default])
    if isinstance(key, Ed25519PrivateKey):
        log.warning(
            "this agent was given the planner's private signing key (fingerprint %s); agents "
            "need only the public key: copy fleet.pub here, point --fleet-key-file at it and "
            "delete the private key from this device (whoever holds it can sign artifacts)",
            key_fingerprint(key),
        )
        return key.public_key()
    return key
