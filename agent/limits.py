"""Owns the cgroup CPU/memory limits that make an agent process behave like its firmware profile.

``edgeslice agent --emulate`` turns a fast host into a slow board so that plans,
benchmarks and the testbed see realistic, *uneven* devices. How:

* **CPU.** Before limiting anything the agent measures this host's single-core
  rate (:func:`agent.quota.host_core_gflops`); :mod:`agent.quota` turns it and the profile
  into a CFS bandwidth quota (cgroup v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, or v2 ``cpu.max``) and a torch thread count (that
  module explains the arithmetic and the 100 ms period); one trial run under
  the quota corrects it (:func:`agent.quota.corrected_plan`).
* **Memory.** ``ram_mb`` MiB as the cgroup memory limit (v1
  ``memory.limit_in_bytes``, v2 ``memory.max``): a stage that would not fit
  the board gets the board's fate (OOM). Pages charged before the move stay
  with the old group (v1 tries ``memory.move_charge_at_immigrate``).
* **Where.** ``<base>/edgeslice/<namespace>@<agent_id>`` per controller (:func:`group_name`:
  agent ids are unique within a topic namespace only, so two fleets on one host -- a
  benchmark beside a test run -- may both have an ``rpi4-4gb-1``; named by id alone they
  shared one group and one fleet's clean-up found the other's agent in it), where ``<base>``
  is the cgroup the process already sits in (so limits set on it by a
  container or sandbox keep applying) or, when no child can be made there, its
  nearest ancestor that allows it (cgroup v2 forbids controllers below a group
  that holds processes). The machine's layout is detected at run time: pure v2
  at the root, else v1 ``cpu`` + ``memory`` hierarchies, else a hybrid
  ``unified`` v2 mount that has the controllers.
* **No cgroups.** Without root, without the controllers, or with a read-only
  cgroupfs the agent runs *unlimited*: a WARNING says so, ``info.emulated`` is
  False and ``info.limits`` is ``{"mode": "unlimited", "reason": ...}``.
* **Cleanup.** :meth:`AppliedLimits.release` (called by ``agent/cli.py`` on a
  normal exit) moves the process back and removes its groups;
  agent/cgroupclean.py's ``remove_agent_cgroups`` removes empty leftovers of killed
  agents (used by ``edgeslice testbed down``). A group with live tasks cannot be removed and is
  reported, never killed.

All functions take the cgroup mount ``root`` and the ``/proc/<pid>/cgroup``
file as parameters so tests can run them on a directory of plain files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslice.agent.quota import EmulationPlan, corrected_plan, host_core_gflops, plan_emulation
from edgeslice.broker.protocol.errors import CgroupUnavailable
from edgeslice.firmware_profiles.schema import MIB, FirmwareProfile

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/fs/cgroup")
PREFIX = "edgeslice"
CONTROLLERS = ("cpu", "memory")


@dataclass(frozen=True)
class CgroupLayout:
    """Which cgroup version this machine uses for cpu+memory, and where the process sits."""

    mode: str  # "cgroup-v1" | "cgroup-v2"
    mounts: dict[str, Path]  # v1: {"cpu": .., "memory": ..}; v2: {"unified": mount}
    own: dict[str, str]  # the process's cgroup path inside each mount ("/" when unknown)


def _tokens(path: Path) -> set[str]:
    try:
        return {t.lstrip("+") for t in path.read_text().split()}
    except OSError:
        return set()


def _own_paths(proc_cgroup: Path) -> tuple[dict[str, str], str]:
    """``/proc/<pid>/cgroup`` -> ({v1 controller: path}, v2 path)."""
    v1: dict[str, str] = {}
    v2 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v1, v2
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2] or "/"
        for controller in parts[1].split(","):
            v1[controller] = parts[2] or "/"
    return v1, v2


def detect_layout(root: Path = DEFAULT_ROOT, proc_cgroup: Path | None = None) -> CgroupLayout:
    """The layout at ``root``; raises :class:`CgroupUnavailable` saying why there is none."""
    proc_cgroup = proc_cgroup or Path("/proc/self/cgroup")
    if not root.is_dir():
        raise CgroupUnavailable(f"no cgroup filesystem at {root}")
    v1_own, v2_own = _own_paths(proc_cgroup)
    if set(CONTROLLERS) <= _tokens(root / "cgroup.controllers"):
        return CgroupLayout("cgroup-v2", {"unified": root}, {"unified": v2_own})
    if (root / "cpu" / "cpu.cfs_quota_us").exists() and (
        root / "memory" / "memory.limit_in_bytes"
    ).exists():
        mounts = {c: root / c for c in CONTROLLERS}
        return CgroupLayout("cgroup-v1", mounts, {c: v1_own.get(c, "/") for c in CONTROLLERS})
    if set(CONTROLLERS) <= _tokens(root / "unified" / "cgroup.controllers"):
        return CgroupLayout("cgroup-v2", {"unified": root / "unified"}, {"unified": v2_own})
    raise CgroupUnavailable(
        f"no cgroup with cpu and memory controllers under {root} (v1 needs "
        f"{root}/cpu/cpu.cfs_quota_us and {root}/memory/memory.limit_in_bytes, v2 needs "
        f"'cpu memory' in {root}/cgroup.controllers)"
    )


def _bases(mount: Path, own: str) -> list[Path]:
    """The process's own group, then its ancestors up to the mount (never inside edgeslice/)."""
    parts = [p for p in own.strip("/").split("/") if p and p not in (".", "..")]
    if PREFIX in parts:
        parts = parts[: parts.index(PREFIX)]
    found = [mount.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)]
    return [p for p in found if p.is_dir()] + [mount]


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def _enable_controllers(group: Path) -> None:
    """v2: make cpu and memory available to ``group``'s children."""
    if not set(CONTROLLERS) <= _tokens(group / "cgroup.subtree_control"):
        _write(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))


def group_name(namespace: str | None, agent_id: str) -> str:
    """The cgroup directory of agent ``agent_id`` of topic namespace ``namespace`` (neither
    may hold ``@``: broker/settings.py and broker/protocol/topics.py allow no ``@``); the
    id alone when no namespace is given."""
    return agent_id if namespace is None else f"{namespace}@{agent_id}"


def _make_group(layout: CgroupLayout, key: str, agent_id: str) -> tuple[Path, Path]:
    """Create ``edgeslice/<name>`` under the first usable base; (group, base)."""
    problems = []
    for base in _bases(layout.mounts[key], layout.own[key]):
        group = base / PREFIX / agent_id
        try:
            if layout.mode == "cgroup-v2":
                _enable_controllers(base)
                (base / PREFIX).mkdir(exist_ok=True)
                _enable_controllers(base / PREFIX)
            else:
                (base / PREFIX).mkdir(exist_ok=True)
            group.mkdir(exist_ok=True)
            return group, base
        except OSError as exc:
            problems.append(f"{group}: {exc.strerror or exc}")
    raise CgroupUnavailable("cannot create a cgroup (" + "; ".join(problems) + ")")


@dataclass(frozen=True)
class AppliedLimits:
    """Limits in force: the groups made and where the process came from, to undo them."""

    mode: str
    plan: EmulationPlan
    agent_id: str
    pid: int | None
    groups: tuple[Path, ...]
    origins: tuple[Path, ...]  # per group: the cgroup the process was in (to move it back)
    notes: tuple[str, ...] = field(default=())

    def to_info(self) -> dict[str, Any]:
        """The JSON-able ``info.limits`` the agent publishes."""
        p = self.plan
        info: dict[str, Any] = {
            "mode": "quota",  # the CPU emulation (agent/pacing.py has the other, "paced")
            "cgroup": self.mode,
            "cpu_cores": p.cores,
            "cpu_period_us": p.period_us,
            "cpu_quota_us": p.quota_us,
            "quota_correction": p.correction,
            "threads": p.threads,
            "memory_bytes": p.memory_bytes,
            "host_core_gflops": p.host_core_gflops,
            "scale": p.scale,
            "cgroups": [str(g) for g in self.groups],
        }
        if self.notes:
            info["notes"] = list(self.notes)
        return info

    def retune(self, plan: EmulationPlan) -> AppliedLimits:
        """Write ``plan``'s CPU quota into the group (the first group holds the cpu controller)."""
        _write_cpu(self.groups[0], plan, self.mode)
        return dataclasses.replace(self, plan=plan)

    def release(self) -> list[str]:
        """Move the process back to where it was and remove its groups; what is left over."""
        if self.pid is not None:
            for origin in self.origins:
                try:
                    _write(origin / "cgroup.procs", str(self.pid))
                except OSError as exc:
                    log.warning("agent=%s cannot move back to %s: %s", self.agent_id, origin, exc)
        return [problem for g in self.groups if (problem := remove_group(g))]


def apply_limits(
    agent_id: str,
    plan: EmulationPlan,
    pid: int | None,
    root: Path = DEFAULT_ROOT,
    proc_cgroup: Path | None = None,
) -> AppliedLimits:
    """Create the groups, write ``plan`` into them and move ``pid`` in (``None``: move nothing).

    Raises ``CgroupUnavailable`` (after undoing what it did) when any step fails.
    """
    if agent_id in (".", "..") or "/" in agent_id:
        raise CgroupUnavailable(f"agent id {agent_id!r} cannot name a cgroup directory")
    layout = detect_layout(root, proc_cgroup)
    made: list[Path] = []
    origins: list[Path] = []
    notes: list[str] = []
    moved: int | None = None
    try:
        for key, mount in layout.mounts.items():
            made.append(_make_group(layout, key, agent_id)[0])
            own = mount.joinpath(*layout.own[key].strip("/").split("/"))
            origins.append(own if own.is_dir() else mount)
            if layout.mode == "cgroup-v2" or key == "cpu":
                _write_cpu(made[-1], plan, layout.mode)
            if layout.mode == "cgroup-v2" or key == "memory":
                _write_memory(made[-1], plan, layout.mode, notes)
        if pid is not None:
            moved = pid
            for group in made:
                _write(group / "cgroup.procs", str(pid))
    except (OSError, CgroupUnavailable) as exc:
        AppliedLimits(layout.mode, plan, agent_id, moved, tuple(made), tuple(origins)).release()
        if isinstance(exc, CgroupUnavailable):
            raise
        where = exc.filename or "a cgroup file"
        raise CgroupUnavailable(f"cannot write {where}: {exc.strerror}") from None
    return AppliedLimits(
        layout.mode, plan, agent_id, pid, tuple(made), tuple(origins), tuple(notes)
    )


def _write_cpu(group: Path, plan: EmulationPlan, mode: str) -> None:
    if mode == "cgroup-v2":
        quota = plan.quota_us if plan.quota_us > 0 else "max"  # -1: no quota (paced mode)
        _write(group / "cpu.max", f"{quota} {plan.period_us}")
        return
    _write(group / "cpu.cfs_quota_us", "-1")  # lift an old quota so any period is accepted
    _write(group / "cpu.cfs_period_us", str(plan.period_us))
    _write(group / "cpu.cfs_quota_us", str(plan.quota_us))


def _write_memory(group: Path, plan: EmulationPlan, mode: str, notes: list[str]) -> None:
    if mode == "cgroup-v2":
        _write(group / "memory.max", str(plan.memory_bytes))
        return
    _write(group / "memory.limit_in_bytes", str(plan.memory_bytes))
    try:  # deprecated in new kernels; without it pages charged before the move stay outside
        _write(group / "memory.move_charge_at_immigrate", "3")
    except OSError:
        notes.append("memory charged before the move stays with the previous cgroup")


def remove_group(group: Path) -> str | None:
    """rmdir one group unless tasks live in it; a sentence saying why not, or None."""
    if not group.is_dir():
        return None
    try:
        pids = (group / "cgroup.procs").read_text().split()
    except OSError:
        pids = []
    if pids:
        shown = ", ".join(pids[:5]) + (", ..." if len(pids) > 5 else "")
        return f"{group}: {len(pids)} live process(es) (pid {shown}); stop them, then retry"
    try:
        group.rmdir()
    except OSError as exc:
        why = "it has child groups" if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) else None
        return f"{group}: cannot remove ({why or exc.strerror})"
    return None


def emulate_profile(
    agent_id: str,
    profile: FirmwareProfile,
    scale: float = 1.0,
    root: Path = DEFAULT_ROOT,
    proc_cgroup: Path | None = None,
    namespace: str | None = None,
) -> tuple[AppliedLimits | None, dict[str, Any]]:
    """Limit this process to ``profile``: (limits in force or None, the ``info.limits`` dict).

    Measures the host's single-core rate first (agent.runtime, torch). Never raises for a
    machine without cgroups: logs a WARNING, returns ``(None, {"mode": "unlimited", ...})``.
    The group is :func:`group_name` of ``namespace`` and the agent (the id alone: None).
    """
    from edgeslice.agent.runtime import measure_gflops

    extra: dict[str, Any] = {"scale": scale}
    applied: AppliedLimits | None = None
    try:
        detect_layout(root, proc_cgroup)
        host = host_core_gflops()
        extra["host_core_gflops"] = round(host, 3)
        plan = plan_emulation(profile, host, scale)
        with _stop_signals_held():  # so a SIGTERM cannot land between the writes and `applied`
            group = group_name(namespace, agent_id)
            applied = apply_limits(group, plan, os.getpid(), root, proc_cgroup)
        measured = measure_gflops(plan.min_calibrate_seconds / 2, plan.threads)
        try:
            applied = applied.retune(corrected_plan(plan, measured))
        except OSError as exc:
            log.warning("agent=%s keeps the uncorrected quota: %s", agent_id, exc)
    except CgroupUnavailable as exc:
        log.warning("agent=%s runs UNLIMITED (no emulation of %s): %s", agent_id, profile.name, exc)
        return None, {"mode": "unlimited", "reason": str(exc), **extra}
    except BaseException:  # an interrupt (SIGTERM -> SystemExit): leave no group behind
        if applied is not None:
            applied.release()
        raise
    plan = applied.plan
    log.info(
        "agent=%s emulates %s: %s %.3f cores (x%.2f after a trial %.2f GFLOP/s), "
        "%d thread(s), memory %d MiB",
        agent_id,
        profile.name,
        applied.mode,
        plan.cores,
        plan.correction,
        measured,
        plan.threads,
        plan.memory_bytes // MIB,
    )
    return applied, applied.to_info()


def cgroup_problem(root: Path = DEFAULT_ROOT, proc_cgroup: Path | None = None) -> str | None:
    """Why limits cannot be applied here, or None: makes and removes a probe group."""
    probe = f"probe-{os.getpid()}"
    plan = EmulationPlan(1.0, 1, 256 * MIB, 1.0, 1.0, 100_000, 100_000)
    try:
        applied = apply_limits(probe, plan, None, root, proc_cgroup)
    except CgroupUnavailable as exc:
        return str(exc)
    left = applied.release()
    return "; ".join(left) if left else None


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT over a few cgroup writes, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda sig, _frame: held.append(sig)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])
