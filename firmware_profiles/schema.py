"""Owns the firmware-profile schema: the FirmwareProfile value, its validation, and loading.

A firmware profile describes a *device class* (a Raspberry Pi 4 with 4 GB on
gigabit Ethernet, a Jetson Nano, an old laptop) as data, one TOML file per
class. Agents announce their profile in their birth message, the planner reads
its memory budget and nominal speed before any calibration has run, and the
testbed scales an emulated device's CPU quota by ``gflops_fp32`` relative to
the host. Keeping classes as data means a user adds a board by copying a file,
not by writing code.

File format (every field required, unknown fields refused so typos surface)::

    name = "rpi4-4gb"            # must equal the file name without .toml
    description = "..."          # one line for humans
    arch = "aarch64"             # aarch64 | armv7l | x86_64 | riscv64
    cpu = "4x Cortex-A72"        # core type, for humans
    cores = 4                    # CPU cores torch may use
    clock_mhz = 1500             # nominal sustained clock
    ram_mb = 4096                # installed RAM, MiB
    gflops_fp32 = 10.0           # fp32 GFLOP/s torch reaches on the CPU
    gflops_source = "estimate: ..."  # where that number comes from
    thermal_limit_c = 80.0       # temperature at which the board throttles
    memory_reserved_mb = 512     # RAM kept for the OS and the agent itself

    [link]                       # the board's typical network link
    kind = "ethernet"            # ethernet | wifi
    bandwidth_mbit = 940.0       # usable throughput, Mbit/s
    latency_ms = 0.2             # one-way delay, ms
    loss_pct = 0.0               # packet loss, percent

"MB" means MiB (2**20 bytes) throughout, as ``free`` and ``/proc/meminfo`` count.
Every problem in a file is reported at once, each naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from edgeslice.broker.protocol.errors import ProfileError

PACKAGE = __name__.rpartition(".")[0]  # "edgeslice.firmware_profiles" when installed
LINK_KINDS: tuple[str, ...] = ("ethernet", "wifi")
ARCHES: tuple[str, ...] = ("aarch64", "armv7l", "x86_64", "riscv64")
MIB = 1024 * 1024
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class LinkProfile:
    """The typical network link of a device class (what link emulation reproduces)."""

    kind: str
    bandwidth_mbit: float
    latency_ms: float
    loss_pct: float


@dataclass(frozen=True)
class FirmwareProfile:
    """One device class; build it with :func:`load_profile`, never by hand, so it is valid."""

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    clock_mhz: int
    ram_mb: int
    gflops_fp32: float
    gflops_source: str
    thermal_limit_c: float
    memory_reserved_mb: int
    link: LinkProfile

    @property
    def memory_budget_mb(self) -> int:
        """RAM the planner may fill with stages: installed RAM minus the OS/agent reserve."""
        return self.ram_mb - self.memory_reserved_mb

    @property
    def memory_budget_bytes(self) -> int:
        """:attr:`memory_budget_mb` in bytes."""
        return self.memory_budget_mb * MIB


@dataclass(frozen=True)
class _Spec:
    """How one field is checked; ``doc`` goes into error messages so they explain the field."""

    kind: type
    doc: str
    low: float | None = None
    low_open: bool = False  # True: value must be > low, else >= low
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] = ()


_TOP: dict[str, _Spec] = {
    "name": _Spec(str, "profile name, equal to the file name without .toml"),
    "description": _Spec(str, "one-line description"),
    "arch": _Spec(str, "CPU architecture", choices=ARCHES),
    "cpu": _Spec(str, "CPU core type"),
    "cores": _Spec(int, "CPU cores torch may use", low=1, high=1024),
    "clock_mhz": _Spec(int, "nominal sustained clock in MHz", low=1, high=10_000),
    "ram_mb": _Spec(int, "installed RAM in MiB", low=1, high=16 * 1024 * 1024),
    "gflops_fp32": _Spec(float, "fp32 GFLOP/s torch reaches", low=0, low_open=True, high=1e6),
    "gflops_source": _Spec(str, "where gflops_fp32 comes from"),
    "thermal_limit_c": _Spec(float, "throttle temperature in C", low=0, low_open=True, high=150),
    "memory_reserved_mb": _Spec(int, "MiB kept for the OS and agent", low=0),
}
_LINK: dict[str, _Spec] = {
    "kind": _Spec(str, "link type", choices=LINK_KINDS),
    "bandwidth_mbit": _Spec(float, "usable Mbit/s", low=0, low_open=True, high=1e6),
    "latency_ms": _Spec(float, "one-way delay in ms", low=0, high=60_000),
    "loss_pct": _Spec(float, "packet loss in percent", low=0, high=100, high_open=True),
}


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _range_text(spec: _Spec) -> str:
    low = "" if spec.low is None else f"{'>' if spec.low_open else '>='} {spec.low:g}"
    high = "" if spec.high is None else f"{'<' if spec.high_open else '<='} {spec.high:g}"
    return " and ".join(part for part in (low, high) if part)


def _check_value(key: str, value: Any, spec: _Spec) -> tuple[Any, str | None]:
    """Return (normalised value, None) or (None, problem) for one field."""
    where = f"field '{key}' ({spec.doc})"
    if spec.kind is str:
        if not isinstance(value, str):
            return None, f"{where} must be a string, got {_type_name(value)}"
        if not value.strip():
            return None, f"{where} must not be empty"
        if spec.choices and value not in spec.choices:
            return None, f"{where} is '{value}', expected one of: {', '.join(spec.choices)}"
        return value, None
    wanted = "an integer" if spec.kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"{where} must be {wanted}, got {_type_name(value)}"
    if spec.kind is int and not isinstance(value, int):
        return None, f"{where} must be an integer (no decimal point), got {value!r}"
    number: int | float = value if spec.kind is int else float(value)
    if not math.isfinite(number):
        return None, f"{where} must be finite, got {value!r}"
    too_low = spec.low is not None and (number <= spec.low if spec.low_open else number < spec.low)
    too_high = spec.high is not None and (
        number >= spec.high if spec.high_open else number > spec.high
    )
    if too_low or too_high:
        return None, f"{where} must be {_range_text(spec)}, got {value!r}"
    return number, None


def _check_table(
    raw: Mapping[str, Any], specs: Mapping[str, _Spec], prefix: str, allowed: tuple[str, ...]
) -> tuple[dict[str, Any], list[str]]:
    """Check every field of one table; return the good values and every problem found."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    known = [*specs, *allowed]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f"did you mean '{prefix}{close[0]}'?"
                if close
                else f"known fields: {', '.join(prefix + k for k in known)}"
            )
            problems.append(f"unknown field '{prefix}{key}'; {hint}")
    for key, spec in specs.items():
        if key not in raw:
            problems.append(f"missing field '{prefix}{key}' ({spec.doc})")
            continue
        value, problem = _check_value(prefix + key, raw[key], spec)
        if problem is None:
            values[key] = value
        else:
            problems.append(problem)
    return values, problems


def _parse(data: Mapping[str, Any], source: str, expected_name: str | None) -> FirmwareProfile:
    """Validate one profile mapping (parsed TOML or a received dict) into a FirmwareProfile."""
    top, problems = _check_table(data, _TOP, "", allowed=("link",))
    link: dict[str, Any] = {}
    raw_link = data.get("link")
    if raw_link is None:
        problems.append("missing table [link] (kind, bandwidth_mbit, latency_ms, loss_pct)")
    elif not isinstance(raw_link, Mapping):
        problems.append(f"field 'link' must be a table ([link]), got {_type_name(raw_link)}")
    else:
        link, link_problems = _check_table(raw_link, _LINK, "link.", allowed=())
        problems.extend(link_problems)
    name = top.get("name")
    if name is not None and not _NAME_RE.match(name):
        problems.append(
            f"field 'name' is '{name}': use lower-case letters, digits, '-', '_' and '.' only"
        )
    if name is not None and expected_name is not None and name != expected_name:
        problems.append(
            f"field 'name' is '{name}' but the file is '{expected_name}.toml'; "
            "name must equal the file name without .toml (rename one of them)"
        )
    ram, reserved = top.get("ram_mb"), top.get("memory_reserved_mb")
    if ram is not None and reserved is not None and reserved >= ram:
        problems.append(
            f"field 'memory_reserved_mb' is {reserved} but ram_mb is {ram}; "
            "the reserve must leave some memory for model stages"
        )
    if problems:
        if len(problems) == 1:
            raise ProfileError(f"invalid firmware profile {source}: {problems[0]}")
        listed = "\n".join(f"  - {problem}" for problem in problems)
        count = len(problems)
        raise ProfileError(f"invalid firmware profile {source} ({count} problems):\n{listed}")
    return FirmwareProfile(**top, link=LinkProfile(**link))


def _parse_text(text: str, source: str, expected_name: str | None) -> FirmwareProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"firmware profile {source} is not valid TOML: {exc}") from exc
    return _parse(data, source, expected_name)


def _shipped_dir() -> Traversable:
    return resources.files(PACKAGE)


def profile_names() -> list[str]:
    """Names of the profiles shipped with edgeslice, sorted; cheap (no file is parsed)."""
    names = [
        entry.name.removesuffix(".toml")
        for entry in _shipped_dir().iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    ]
    return sorted(names)


def _looks_like_path(text: str) -> bool:
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return text.endswith(".toml") or any(sep in text for sep in separators)


def validate_file(path: str | os.PathLike[str]) -> FirmwareProfile:
    """Load and validate one profile file; raise ProfileError naming the file and the field."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ProfileError(
            f"firmware profile file {file} does not exist; check the path, or use a shipped "
            f"profile by name ({', '.join(profile_names())})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ProfileError(f"firmware profile {file} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ProfileError(f"cannot read firmware profile {file}: {exc.strerror or exc}") from exc
    return _parse_text(text, str(file), expected_name=file.stem)


def load_profile(name_or_path: str | os.PathLike[str]) -> FirmwareProfile:
    """Load a shipped profile by bare name (``rpi4-4gb``) or any profile file by path.

    An argument that contains a path separator or ends in ``.toml`` is a path;
    anything else is looked up among the shipped profiles.
    """
    text = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or _looks_like_path(text):
        return validate_file(text)
    entry = _shipped_dir().joinpath(f"{text}.toml")
    if not _NAME_RE.match(text) or not entry.is_file():
        raise ProfileError(
            f"unknown firmware profile '{text}'; known profiles: {', '.join(profile_names())}. "
            "For a custom device class pass the path of a .toml file (see "
            "`edgeslice profiles show rpi4-4gb` for the fields)."
        )
    return _parse_text(entry.read_text(encoding="utf-8"), str(entry), expected_name=text)


def list_profiles() -> list[FirmwareProfile]:
    """Every shipped profile, validated, sorted by name."""
    return [load_profile(name) for name in profile_names()]


def profile_to_dict(profile: FirmwareProfile) -> dict[str, Any]:
    """Plain dict (nested ``link``) in file order: for JSON output and the agent's birth message."""
    return dataclasses.asdict(profile)


def profile_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> FirmwareProfile:
    """Inverse of :func:`profile_to_dict`, with the same validation as a file (e.g. from Info)."""
    return _parse(data, source, expected_name=None)
