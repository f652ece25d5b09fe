"""Owns ``--profile auto``: which shipped firmware profile fits the board this runs on.

Detection is a pure function over the text of three files, so it is tested on fixture
strings for every supported board and needs no hardware:

* ``/proc/device-tree/model``: the board's name on Raspberry Pi and Jetson boards
  (``Raspberry Pi 4 Model B Rev 1.4``, ``NVIDIA Jetson Orin Nano Developer Kit``);
  absent on PCs. ``/proc/cpuinfo``'s ``Model`` line is the fallback (Pi kernels have it).
* ``/proc/cpuinfo``: the architecture, the core count, a Pi's ``Revision`` code (whose
  bits 20-22 encode the RAM fitted: more exact than MemTotal, which the GPU split lowers).
* ``/proc/meminfo``: ``MemTotal``.

A known board family (Pi 3, Pi 4/400/CM4, Pi 5/500/CM5, Jetson Nano, Jetson Orin Nano)
picks the family's profile by RAM; an x86-64 machine is the ``x86-laptop`` class. A board
that matches no profile exactly (a Pi 3B+, a 16 GB Pi 5, a Rock 5, a 32-core desktop)
gets the *nearest* profile by architecture, cores and RAM, and a warning that names
what was detected and what was chosen: the planner then works from that profile until
calibration measures the real speed, and the agent never claims more memory than the
machine has (agent/service.py caps the budget), so a near miss costs accuracy, not
correctness. :func:`read_facts` is the only function that touches files; its ``root``
is injectable for tests and for ``edgeslice profiles detect --root``.
"""

from __future__ import annotations

import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeslice.firmware_profiles.schema import FirmwareProfile, list_profiles

AUTO = "auto"  # the --profile value that asks for detection

# device-tree model (lower case) -> profile-name prefix of its family; the first match wins
_FAMILIES: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"raspberry pi (5|500|compute module 5)\b"), "rpi5-", "Raspberry Pi 5"),
    (re.compile(r"raspberry pi (4|400|compute module 4)\b"), "rpi4-", "Raspberry Pi 4"),
    (re.compile(r"raspberry pi 3 model b rev"), "rpi3b", "Raspberry Pi 3 Model B"),
    (re.compile(r"jetson orin nano"), "jetson-orin-nano", "Jetson Orin Nano"),
    (re.compile(r"jetson nano"), "jetson-nano", "Jetson Nano"),
)
# Pi revision code bits 20-22 (new-style codes, bit 23 set) -> RAM in MiB
_PI_RAM_MB = {0: 256, 1: 512, 2: 1024, 3: 2048, 4: 4096, 5: 8192, 6: 16384, 7: 8192 * 4}
# ARM "CPU part" -> core name, only to describe the board to a human
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd0b": "Cortex-A76",
    "0xd42": "Cortex-A78AE",
}
RAM_FIT = 0.75  # MemTotal at least this share of a profile's RAM: the same RAM fitted


@dataclass(frozen=True)
class BoardFacts:
    """What the files say about this machine (empty/zero where they say nothing)."""

    model: str  # device-tree model or cpuinfo "Model", "" on PCs
    arch: str  # aarch64 | armv7l | x86_64 | riscv64 | "" when unknown
    cores: int
    ram_mb: int  # RAM fitted (Pi revision code) or MemTotal, MiB
    cpu: str = ""  # core type or model name, for humans

    def describe(self) -> str:
        """``Raspberry Pi 4 Model B Rev 1.4 (aarch64, 4 cores, Cortex-A72, 4.0 GiB RAM)``."""
        name = self.model or f"an {self.arch or 'unknown-architecture'} machine"
        parts = [
            self.arch if self.model else "",
            f"{self.cores} cores" if self.cores else "cores unknown",
            self.cpu,
            f"{self.ram_mb / 1024:.1f} GiB RAM" if self.ram_mb else "RAM unknown",
        ]
        return f"{name} ({', '.join(p for p in parts if p)})"


@dataclass(frozen=True)
class Detection:
    """The profile ``--profile auto`` picks, whether it fits exactly, and why."""

    facts: BoardFacts
    profile: str
    exact: bool
    reason: str

    @property
    def warning(self) -> str | None:
        """One line for stderr when the profile is only the nearest one, else None."""
        if self.exact:
            return None
        return (
            f"--profile auto: no shipped profile for {self.facts.describe()}; using the "
            f"nearest, {self.profile} ({self.reason}). Pass --profile NAME or a .toml file "
            "(see `edgeslice profiles show`) for a better fit."
        )


def _field(text: str, name: str) -> str:
    """The first ``name : value`` line of a cpuinfo-style text (case matters: x86 has a
    ``model`` number, a Pi a ``Model`` name), or ""."""
    match = re.search(rf"^{re.escape(name)}\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def _arch_from_cpuinfo(cpuinfo: str) -> str:
    arm = _field(cpuinfo, "CPU architecture")
    if arm:
        return "aarch64" if arm.startswith("8") or arm.upper() == "AARCH64" else "armv7l"
    if _field(cpuinfo, "vendor_id") or re.search(r"^flags\s*:.*\blm\b", cpuinfo, re.MULTILINE):
        return "x86_64"
    if _field(cpuinfo, "isa").startswith("rv64"):
        return "riscv64"
    return ""


def normalise_arch(machine: str) -> str:
    """``platform.machine()`` spelled as the profiles spell it (``arm64`` -> ``aarch64``)."""
    text = machine.strip().lower()
    aliases = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv8l": "aarch64"}
    if text.startswith("armv7") or text.startswith("armv6"):
        return "armv7l"
    return aliases.get(text, text)


def pi_revision_ram_mb(revision: str) -> int:
    """RAM encoded in a Raspberry Pi revision code (``c03114`` -> 4096), 0 if not encoded."""
    try:
        code = int(revision, 16)
    except ValueError:
        return 0
    if not code & (1 << 23):  # old-style codes (first Pis) do not encode RAM this way
        return 0
    return _PI_RAM_MB.get((code >> 20) & 0x7, 0)


def parse_facts(
    model: str | None,
    cpuinfo: str | None,
    meminfo: str | None,
    machine: str = "",
    cpu_count: int | None = None,
    ram_bytes: int | None = None,
) -> BoardFacts:
    """The facts in the files' text; ``machine``/``cpu_count``/``ram_bytes`` fill the gaps
    (``platform.machine()``, ``os.cpu_count()``, psutil on the running machine)."""
    cpuinfo = cpuinfo or ""
    name = (model or "").replace("\x00", "").strip() or _field(cpuinfo, "Model")
    arch = normalise_arch(machine) if machine else _arch_from_cpuinfo(cpuinfo)
    cores = len(re.findall(r"^processor\s*:", cpuinfo, re.MULTILINE)) or cpu_count or 0
    ram_mb = 0
    if "raspberry pi" in name.lower():
        ram_mb = pi_revision_ram_mb(_field(cpuinfo, "Revision"))
    if not ram_mb and meminfo:
        total = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.MULTILINE)
        ram_mb = int(total.group(1)) // 1024 if total else 0
    if not ram_mb and ram_bytes:
        ram_mb = ram_bytes // (1024 * 1024)
    part = _ARM_PARTS.get(_field(cpuinfo, "CPU part").lower(), "")
    cpu = part or _field(cpuinfo, "model name")
    return BoardFacts(model=name, arch=arch, cores=cores, ram_mb=ram_mb, cpu=cpu)


def _ram_fits(ram_mb: int, profile: FirmwareProfile) -> bool:
    return RAM_FIT * profile.ram_mb <= ram_mb <= profile.ram_mb * 1.02


def _by_ram(facts: BoardFacts, family: Sequence[FirmwareProfile]) -> FirmwareProfile:
    """The family member with the least RAM that still holds this board's, else the largest."""
    ordered = sorted(family, key=lambda p: (p.ram_mb, p.name))
    if not facts.ram_mb:
        return ordered[0]
    for profile in ordered:
        if facts.ram_mb <= profile.ram_mb * 1.02:
            return profile
    return ordered[-1]


def _distance(facts: BoardFacts, profile: FirmwareProfile) -> float:
    """How far a profile is from the board: architecture first, then cores and RAM ratios."""
    arch = 0.0
    if facts.arch and facts.arch != profile.arch:
        arm = {facts.arch, profile.arch} == {"aarch64", "armv7l"}
        arch = 2.0 if arm else 10.0
    cores = abs(math.log2(facts.cores / profile.cores)) if facts.cores else 0.0
    ram = abs(math.log2(facts.ram_mb / profile.ram_mb)) if facts.ram_mb else 0.0
    return arch + cores + ram


def choose_profile(facts: BoardFacts, profiles: Sequence[FirmwareProfile]) -> Detection:
    """The profile for ``facts`` among ``profiles`` (see the module docstring). Pure."""
    if not profiles:
        raise ValueError("no firmware profiles to choose from")
    lowered = facts.model.lower()
    for pattern, prefix, family_name in _FAMILIES:
        if not pattern.search(lowered):
            continue
        family = [p for p in profiles if p.name == prefix or p.name.startswith(prefix)]
        if not family:
            break
        chosen = _by_ram(facts, family)
        exact = not facts.ram_mb or _ram_fits(facts.ram_mb, chosen)
        if exact:
            sized = f" with {chosen.ram_mb // 1024} GiB RAM" if len(family) > 1 else ""
            why = f"a {family_name}{sized}"
        else:
            why = f"a {family_name} with {facts.ram_mb} MiB RAM: the nearest in its family"
        return Detection(facts, chosen.name, exact, why)
    ranked = sorted(profiles, key=lambda p: (_distance(facts, p), p.name))
    chosen = ranked[0]
    # a PC has no board name: the x86 profile is a class, a fit when cores and RAM match it
    exact = (
        not facts.model
        and facts.arch == "x86_64" == chosen.arch
        and facts.cores == chosen.cores
        and _ram_fits(facts.ram_mb, chosen)
    )
    if exact:
        why = f"an x86-64 machine with {chosen.cores} cores and {chosen.ram_mb // 1024} GiB RAM"
    else:
        why = (
            f"nearest by architecture, cores and RAM: {chosen.arch}, {chosen.cores} cores, "
            f"{chosen.ram_mb // 1024} GiB"
        )
    return Detection(facts, chosen.name, exact, why)


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def read_facts(root: str | os.PathLike[str] = "/") -> BoardFacts:
    """Read the three files under ``root`` (``/`` on a real board). Only the real root also
    asks Python and psutil for what the files leave out (a fixture root must stand alone)."""
    base = Path(root)
    real = base.resolve() == Path("/")
    ram_bytes = None
    if real:
        try:
            import psutil

            ram_bytes = int(psutil.virtual_memory().total)
        except (ImportError, OSError):  # pragma: no cover - psutil is a dependency
            ram_bytes = None
    return parse_facts(
        _read(base / "proc" / "device-tree" / "model"),
        _read(base / "proc" / "cpuinfo"),
        _read(base / "proc" / "meminfo"),
        machine=platform.machine() if real else "",
        cpu_count=os.cpu_count() if real else None,
        ram_bytes=ram_bytes,
    )


def detect(root: str | os.PathLike[str] = "/") -> Detection:
    """What ``--profile auto`` picks on this machine (or on the files under ``root``)."""
    return choose_profile(read_facts(root), list_profiles())


def resolve_profile(name: str, root: str | os.PathLike[str] = "/") -> tuple[str, str | None]:
    """``--profile`` as given, or for ``auto`` the detected profile's name and its warning."""
    if name != AUTO:
        return name, None
    found = detect(root)
    return found.profile, found.warning
