"""The fleet key: the shared secret that signs stage artifacts, and where it is found.

The planner signs every stage artifact and agents verify before loading
(``torch.export.load`` may unpickle). Both sides resolve the key the same way,
first match wins:

1. an explicit path (``--fleet-key-file``);
2. ``EDGESLICE_FLEET_KEY`` — the key itself, hex;
3. ``EDGESLICE_FLEET_KEY_FILE`` — a path;
4. ``$XDG_CONFIG_HOME/edgeslice/fleet.key`` (default ``~/.config/edgeslice/fleet.key``).

Key files hold the key as one line of hex and are created with mode 0600. Use
:func:`key_fingerprint` to compare keys in logs without revealing them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

from edgeslice.broker.protocol.artifacts import MIN_KEY_BYTES
from edgeslice.broker.protocol.errors import ConfigError

log = logging.getLogger(__name__)

ENV_KEY = "EDGESLICE_FLEET_KEY"
ENV_KEY_FILE = "EDGESLICE_FLEET_KEY_FILE"
KEY_BYTES = 32
_HELP = "run `edgeslice keygen` and copy the key file to every device (or set EDGESLICE_FLEET_KEY)"


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/edgeslice/fleet.key``, falling back to ``~/.config``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeslice" / "fleet.key"


def generate_key() -> bytes:
    """A fresh random 256-bit key."""
    return secrets.token_bytes(KEY_BYTES)


def key_fingerprint(key: bytes) -> str:
    """First 12 hex digits of sha256(key): safe to log and compare between devices."""
    return hashlib.sha256(b"edgeslice-fleet-key\x00" + key).hexdigest()[:12]


def _parse_hex(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"fleet key from {source} is not hex; {_HELP}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"fleet key from {source} is {len(key)} bytes, need at least {MIN_KEY_BYTES}; {_HELP}"
        )
    return key


def write_key(
    path: str | Path | None = None, key: bytes | None = None, force: bool = False
) -> bytes:
    """Write ``key`` (a new one by default) as hex to ``path`` with mode 0600; returns the key.

    Refuses to overwrite an existing file unless ``force``: replacing the key
    invalidates every artifact already cached on the fleet's devices.
    """
    target = Path(path).expanduser() if path is not None else default_key_path()
    key = generate_key() if key is None else key
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"fleet key must be at least {MIN_KEY_BYTES} bytes")
    if target.exists() and not force:
        raise ConfigError(
            f"fleet key file {str(target)!r} already exists; use --force to replace it "
            "(every agent will then need the new key)"
        )
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(key.hex() + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote fleet key path=%s fingerprint=%s", target, key_fingerprint(key))
    return key


def _read_key_file(path: Path, source: str) -> bytes:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"fleet key file {str(path)!r} ({source}) does not exist; {_HELP}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read fleet key file {str(path)!r} ({source}): {exc}") from exc
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("fleet key file %s is readable by others (mode %o); chmod 600 it", path, mode)
    return _parse_hex(text, f"{source} {str(path)!r}")


def load_key(path: str | None = None) -> bytes:
    """Resolve the fleet key (see module docstring); ``ConfigError`` when there is none."""
    if path:
        return _read_key_file(Path(path).expanduser(), "--fleet-key-file")
    env_key = os.environ.get(ENV_KEY)
    if env_key:
        return _parse_hex(env_key, ENV_KEY)
    env_file = os.environ.get(ENV_KEY_FILE)
    if env_file:
        return _read_key_file(Path(env_file).expanduser(), ENV_KEY_FILE)
    default = default_key_path()
    if default.exists():
        return _read_key_file(default, "default location")
    raise ConfigError(
        f"no fleet key: none given with --fleet-key-file, {ENV_KEY} or {ENV_KEY_FILE}, and "
        f"{str(default)!r} does not exist; {_HELP}"
    )
