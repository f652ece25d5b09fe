"""Owns the agent's systemd unit: what ``edgeslice agent-service install`` writes, as text.

Rendering is pure (a :class:`ServiceSpec` in, file texts out) so tests check the unit
without root; :func:`write_files` is the only function that touches the disk.

Two files: the unit (``/etc/systemd/system/edgeslice-agent.service``, 0644) and the
environment file (``/etc/edgeslice/agent.env``, 0600, root's): every setting is an
``EDGESLICE_*`` variable the ``edgeslice agent`` options already read, so the unit's
``ExecStart`` is the bare ``edgeslice agent`` and the broker password lives only in the
file systemd reads as root before it drops to the ``edgeslice`` user. Hardening keeps
the agent to what it does (MQTT over the network, artifacts in its cache directory):
no new privileges, a read-only system (``ProtectSystem=strict``) with only
``/var/cache/edgeslice`` and ``/var/lib/edgeslice`` writable, no devices, no kernel
tunables, no capabilities. ``--emulate`` is deliberately absent: it needs root and
writable cgroups, which is what the hardening takes away (emulation is for the lab).
A stop is ``SIGTERM``: the agent drains (``--drain-timeout``) and finishes the requests
it holds, so ``TimeoutStopSec`` leaves it the time for that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

UNIT_NAME = "edgeslice-agent.service"
UNIT_DIR = "/etc/systemd/system"
ENV_FILE = "/etc/edgeslice/agent.env"
CACHE_DIR = "/var/cache/edgeslice"  # systemd's CacheDirectory=edgeslice
STATE_DIR = "/var/lib/edgeslice"  # StateDirectory=edgeslice: the user's home
FLEET_KEY_FILE = "/etc/edgeslice/fleet.pub"
SERVICE_USER = "edgeslice"
MASK = "********"


@dataclass(frozen=True)
class ServiceSpec:
    """What the unit runs and with which settings (None: the agent's own default)."""

    executable: str  # absolute path of the edgeslice console script
    broker: str
    agent_id: str | None = None
    profile: str = "auto"
    namespace: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    fleet_key_file: str | None = FLEET_KEY_FILE
    metrics_port: int | None = None
    metrics_host: str | None = None
    user: str = SERVICE_USER
    drain_timeout_s: float = 10.0


@dataclass(frozen=True)
class ServiceFile:
    """One file to write: absolute path on the target system, text, permission bits."""

    path: str
    text: str
    mode: int


def _env_value(value: str) -> str:
    """A value as systemd's EnvironmentFile reads it: quoted when it needs to be."""
    if value and all(c.isalnum() or c in "-_./:@+,=%" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def environment(spec: ServiceSpec) -> list[tuple[str, str]]:
    """The ``EDGESLICE_*`` settings of ``spec``, in the order the env file lists them."""
    pairs: list[tuple[str, str | int | float | None]] = [
        ("EDGESLICE_BROKER", spec.broker),
        ("EDGESLICE_NAMESPACE", spec.namespace),
        ("EDGESLICE_ID", spec.agent_id),
        ("EDGESLICE_PROFILE", spec.profile),
        ("EDGESLICE_FLEET_KEY_FILE", spec.fleet_key_file),
        ("EDGESLICE_CACHE_DIR", CACHE_DIR),
        ("EDGESLICE_DRAIN_TIMEOUT", f"{spec.drain_timeout_s:g}"),
        ("EDGESLICE_TLS_CA", spec.tls_ca),
        ("EDGESLICE_USERNAME", spec.username),
        ("EDGESLICE_PASSWORD", spec.password),
        ("EDGESLICE_METRICS_PORT", spec.metrics_port),
        ("EDGESLICE_METRICS_HOST", spec.metrics_host),
    ]
    return [(key, str(value)) for key, value in pairs if value is not None and value != ""]


def render_env(spec: ServiceSpec) -> str:
    """The environment file (mode 0600: it may hold the broker password)."""
    lines = [
        f"# edgeslice agent settings, read by {UNIT_NAME} (EnvironmentFile=) as root.",
        "# Each EDGESLICE_* variable is the `edgeslice agent` option of the same name",
        "# (`edgeslice agent --help`). Keep this file mode 0600: it may hold the broker",
        f"# password. After a change: systemctl restart {UNIT_NAME.removesuffix('.service')}",
    ]
    lines += [f"{key}={_env_value(value)}" for key, value in environment(spec)]
    return "\n".join(lines) + "\n"


def _protect_home(executable: str) -> str:
    """``yes`` hides /home and /root; an edgeslice installed there must stay readable."""
    home = executable.startswith(("/home/", "/root/"))
    return "read-only" if home else "yes"


def render_unit(spec: ServiceSpec) -> str:
    """The systemd unit text (see the module docstring for each choice)."""
    stop_s = int(spec.drain_timeout_s) + 75  # drain + finishing held requests (<= 60 s) + margin
    return f"""\
# Written by `edgeslice agent-service install`; settings live in {ENV_FILE}.
[Unit]
Description=edgeslice agent: runs model slices assigned by the planner, over MQTT
Wants=network-online.target
After=network-online.target time-sync.target
StartLimitIntervalSec=600
StartLimitBurst=20

[Service]
Type=simple
User={spec.user}
Group={spec.user}
EnvironmentFile={ENV_FILE}
ExecStart={spec.executable} agent
Restart=on-failure
RestartSec=5
# SIGTERM drains: the planner moves requests away, held ones finish (agent/drain.py)
KillSignal=SIGTERM
TimeoutStopSec={stop_s}
StandardOutput=journal
StandardError=journal
SyslogIdentifier=edgeslice-agent
# Writable: artifact cache (/var/cache/edgeslice) and home ({STATE_DIR}); the rest is read-only.
CacheDirectory=edgeslice
StateDirectory=edgeslice
Environment=HOME={STATE_DIR}
UMask=0077
# Hardening. No --emulate here: it needs root and writable cgroups (a lab feature).
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={_protect_home(spec.executable)}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def service_files(spec: ServiceSpec) -> list[ServiceFile]:
    """The unit and the environment file, at their paths on the target system."""
    return [
        ServiceFile(f"{UNIT_DIR}/{UNIT_NAME}", render_unit(spec), 0o644),
        ServiceFile(ENV_FILE, render_env(spec), 0o600),
    ]


def masked(spec: ServiceSpec) -> ServiceSpec:
    """``spec`` with the password hidden, for printing (``--dry-run``)."""
    return replace(spec, password=MASK) if spec.password else spec


def next_steps(spec: ServiceSpec, written: bool = True) -> str:
    """What an operator runs after the files are in place (as root)."""
    service = UNIT_NAME.removesuffix(".service")
    steps = [
        "Next steps, as root:",
        "  # the user the agent runs as (no login, home in its state directory)",
        f"  useradd --system --user-group --home-dir {STATE_DIR} --shell /usr/sbin/nologin "
        f"{spec.user}",
    ]
    if spec.fleet_key_file:
        steps += [
            "  # the planner's public key (fleet.pub from `edgeslice keygen`), readable by all",
            f"  install -m 0644 fleet.pub {spec.fleet_key_file}",
        ]
    steps += [
        "  systemctl daemon-reload",
        f"  systemctl enable --now {service}",
        f"  journalctl -u {service} -f      # its log",
    ]
    if not written:
        steps.insert(0, "(dry run: nothing written)")
    if _protect_home(spec.executable) != "yes":
        steps.append(
            f"Note: {spec.executable} is under a home directory; the {spec.user} user must be "
            "able to read it (or install edgeslice in /opt/edgeslice/venv and run this again)."
        )
    return "\n".join(steps)


def write_files(files: list[ServiceFile], prefix: str | os.PathLike[str] = "/") -> list[Path]:
    """Write ``files`` under ``prefix`` (``/`` for real); the env file is created 0600
    before any secret goes into it. Returns the paths written."""
    written = []
    for file in files:
        target = Path(prefix) / file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file.mode)
        os.fchmod(fd, file.mode)  # an existing file keeps its old mode otherwise
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(file.text)
        written.append(target)
    return written
