"""Paced emulation: run a stage at host speed, then hold it until the emulated device is done.

``edgeslice agent --emulate`` has two ways to make a fast host behave like a slow board
(``--emulate-mode``, env ``EDGESLICE_EMULATE_MODE``, fleet TOML ``emulate_mode``):

* ``quota`` (:mod:`agent.quota`): a CFS bandwidth quota of ``profile / host core`` cores.
  Over a long run it delivers the profile's rate, but within one 100 ms period a stage
  runs at full host speed until the quota is spent: a stage shorter than its quota
  finishes in host time, one that spans periods waits out whole stalls. Pipelined
  baselines whose stages are short therefore look faster than real boards would, and on
  a busy host every quota also competes for the same cores.
* ``paced`` (this module, the default): no CPU quota. The stage runs at host speed on
  the stage worker thread; the thread's CPU time ``cpu_s`` for it, times the *pace
  factor* ``host_core_gflops / (profile.gflops_fp32 * scale)``, is the time the board
  would have needed (:func:`device_seconds`); the worker then sleeps until that much wall
  time has passed since the stage began (:func:`hold_seconds`). A device computes one
  stage at a time, so holding the single worker *is* the model: the next request queues
  behind it like on a board, and the result is packed and sent the moment the device
  time is over (never later: the hold is measured from the stage's start, so time the
  host was slow to compute counts against it).

Why measured time and not FLOPs. A stage's device time could be ``FLOPs / profile
rate``, but artifacts do not carry their FLOPs, and FLOPs ignore what the planner's cost
model already knows: a depthwise convolution or a softmax runs far below the matmul rate.
Scaling the stage's own measured time by host-core rate / device rate makes every layer
as slow on the emulated board as it is on this host relative to the calibration kernel
(broker/calibration.py), which is exactly the yardstick the planner prices stages with
("calibration-equivalent FLOPs"). CPU time, not wall time: another process on the host
delays the stage's wall time, not its CPU time, so the emulated board does not slow down
because the host is busy, unless the host is too busy to finish within the device time
(then there is nothing to hold; :attr:`Pacer.late` counts those stages).

Steady CPU time. CPU time still grows when emulated agents share a small host: four
agents on two cores evict each other's caches and share memory bandwidth, so the same
program's CPU time varies run to run by 1.3-3x (measured on tiles of a few ms), and
times the pace factor (~15 for an rpi4 on this host) that becomes tens of ms of device
time that no real board, alone on its own cores, would spend. The pacer therefore
charges each run the *lowest* CPU time of the same program on inputs of the same shapes
over its last :data:`STEADY_WINDOW` runs (this run included): a program's steady cost on
this host, the cost a board that does not share its cores pays every time. The first run
of a program (cold caches, lazy initialisation) is charged in full. Set
``EDGESLICE_PACE_WINDOW=1`` to charge every run its own CPU time (the earlier behaviour);
:attr:`Pacer.uncharged_cpu_s` says how much host CPU time was not charged.

The calibration the agent announces (``info.gflops``, and the ``calibrate`` command) goes
through the same :meth:`Pacer.run`: :meth:`Pacer.measure_gflops` runs the calibration
kernel for ``seconds / factor`` of host time (at least :data:`MIN_HOST_SECONDS`) and
divides its work by the paced wall time, so the planner sees the device's rate.

Memory stays a cgroup limit (``ram_mb``, via :func:`agent.limits.apply_limits` with no CPU
quota). Pacing itself needs no privileges: without cgroups a paced agent still paces its
compute, warns that memory is not limited and says so in ``info.limits``. One pacer per
process (:func:`install`), set by ``agent/cli.py`` before the service starts; the runtime
(:mod:`agent.runtime`) asks :func:`current`. Without ``--emulate`` nothing is installed
and nothing is paced.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgeslice.firmware_profiles.schema import MIB, FirmwareProfile

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_HOST_SECONDS = 0.1  # a paced calibration runs the kernel at least this long on the host
CALIBRATION_ROUNDS = 3  # a paced calibration's rounds; the best counts
MIN_ROUND_SECONDS = 0.04  # host time of one round, at least
STEADY_WINDOW = 16  # runs of one program whose lowest CPU time is charged (1: each its own)
WINDOW_ENV = "EDGESLICE_PACE_WINDOW"


# -- arithmetic (pure) ----------------------------------------------------------------------
@dataclass(frozen=True)
class PacePlan:
    """How this host's core relates to the emulated device (pure numbers, no I/O)."""

    device_gflops: float  # the profile's rate times --emulate-scale
    host_core_gflops: float  # this host's single-core calibration rate (per CPU second)
    threads: int  # torch threads: 1 unless the device is faster than one host core
    memory_bytes: int
    scale: float = 1.0

    @property
    def factor(self) -> float:
        """Device seconds per host CPU second (> 1: the device is slower than a host core)."""
        return pace_factor(self.host_core_gflops, self.device_gflops)


def pace_factor(host_core_gflops: float, device_gflops: float) -> float:
    """``host / device``: how much longer the device needs for what one host core did."""
    if host_core_gflops <= 0 or device_gflops <= 0:
        raise ValueError(
            f"rates must be > 0 GFLOP/s (host core {host_core_gflops}, device {device_gflops})"
        )
    return host_core_gflops / device_gflops


def device_seconds(cpu_s: float, factor: float) -> float:
    """The device's time for work that took ``cpu_s`` CPU seconds on this host."""
    return max(0.0, cpu_s) * factor


def hold_seconds(started: float, now: float, cpu_s: float, factor: float) -> float:
    """How long to hold a result computed from ``started`` to ``now`` (0 when already late)."""
    return max(0.0, started + device_seconds(cpu_s, factor) - now)


def paced_rate(host_rate: float, host_wall_s: float, paced_wall_s: float) -> float:
    """A rate measured over ``host_wall_s`` at host speed, as seen over the paced wall time."""
    if paced_wall_s <= 0:
        return host_rate
    return host_rate * host_wall_s / max(paced_wall_s, host_wall_s)


def steady_cpu_seconds(recent: deque[float], cpu_s: float) -> float:
    """Record ``cpu_s`` in ``recent`` (a bounded deque) and return the lowest CPU time in it:
    the program's steady cost (module docstring)."""
    recent.append(max(0.0, cpu_s))
    return min(recent)


def program_key(artifact: str, args: Sequence[Any]) -> Hashable:
    """Which runs count as the same work: one stage artifact (its sha256) on inputs of the
    same shapes and dtypes (a batch of 4 is other work than a batch of 1)."""
    return (
        artifact,
        tuple((tuple(a.shape), str(a.dtype)) if hasattr(a, "shape") else repr(a) for a in args),
    )


def window_from_env(value: str | None) -> int:
    """``EDGESLICE_PACE_WINDOW`` as a window length (unset: :data:`STEADY_WINDOW`)."""
    if value is None or not value.strip():
        return STEADY_WINDOW
    try:
        window = int(value)
    except ValueError:
        raise ValueError(f"{WINDOW_ENV} must be a whole number >= 1, got {value!r}") from None
    if window < 1:
        raise ValueError(f"{WINDOW_ENV} must be >= 1 (1: charge every run), got {window}")
    return window


def env_window(environ: Mapping[str, str]) -> int:
    """Check the emulation's environment before anything runs: ``EDGESLICE_HOST_CORE_GFLOPS``
    (agent/quota.py) and ``EDGESLICE_PACE_WINDOW``; returns the window. ValueError."""
    from edgeslice.agent.quota import HOST_RATE_ENV, host_rate_from_env

    host_rate_from_env(environ.get(HOST_RATE_ENV))
    return window_from_env(environ.get(WINDOW_ENV))


def calibration_host_seconds(seconds: float, factor: float) -> float:
    """Host time for a paced calibration of about ``seconds`` device time (floored)."""
    return max(seconds / factor, MIN_HOST_SECONDS)


def plan_pacing(
    profile: FirmwareProfile,
    host_core_gflops: float,
    scale: float = 1.0,
    host_cpus: int | None = None,
) -> PacePlan:
    """The pace for ``profile`` on a host whose one core does ``host_core_gflops``.

    A device faster than one host core gets ``ceil(1 / factor)`` threads (at most the
    host's CPUs and the board's cores); its CPU time is then the whole process's.
    """
    if scale <= 0:
        raise ValueError(f"--emulate-scale must be > 0, got {scale}")
    device = profile.gflops_fp32 * scale
    factor = pace_factor(host_core_gflops, device)
    cpus = host_cpus or os.cpu_count() or 1
    threads = 1 if factor >= 1.0 else max(1, min(math.ceil(1 / factor), cpus, profile.cores))
    return PacePlan(
        device_gflops=round(device, 4),
        host_core_gflops=round(host_core_gflops, 3),
        threads=threads,
        memory_bytes=profile.ram_mb * MIB,
        scale=scale,
    )


# -- the pacer (the only clock-reading part) -------------------------------------------------
class Pacer:
    """Runs work at host speed and holds it for the device time (see the module docstring).

    Called from the agent's single stage worker thread (stages and calibration alike).
    """

    def __init__(
        self,
        plan: PacePlan,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        window: int = STEADY_WINDOW,
    ) -> None:
        self.plan = plan
        self.window = max(1, window)
        self.factor = plan.factor
        self.clock = clock
        # one thread: the worker's own CPU time; more: torch's pool too (the whole process)
        self.cpu_clock = cpu_clock or (time.thread_time if plan.threads == 1 else time.process_time)
        self.sleep = sleep
        self.calls = 0
        self.late = 0  # runs whose host wall time already exceeded the device time
        self.held_s = 0.0
        self.host_cpu_s = 0.0
        self.uncharged_cpu_s = 0.0  # host CPU time above a program's steady cost
        self._recent: dict[Hashable, deque[float]] = {}

    def run(self, fn: Callable[..., T], *args: Any, key: Hashable | None = None) -> T:
        """``fn(*args)``, returned once the device would have finished it. Runs with the
        same ``key`` (:func:`program_key`) are charged their steady CPU time; without a key
        (calibration) a run is charged its own."""
        started, cpu0 = self.clock(), self.cpu_clock()
        try:
            return fn(*args)
        finally:
            cpu_s = self.cpu_clock() - cpu0
            charged = max(0.0, cpu_s) if key is None else self._charge(key, cpu_s)
            hold = hold_seconds(started, self.clock(), charged, self.factor)
            self.calls += 1
            self.host_cpu_s += cpu_s
            self.uncharged_cpu_s += cpu_s - charged
            if hold > 0:
                self.held_s += hold
                self.sleep(hold)
            elif cpu_s > 0:
                self.late += 1

    def _charge(self, key: Hashable, cpu_s: float) -> float:
        """The CPU time to charge this run: its program's steady cost (module docstring)."""
        if self.window == 1:
            return max(0.0, cpu_s)
        recent = self._recent.get(key)
        if recent is None:
            if len(self._recent) >= 4096:  # plans come and go: forget the oldest programs
                self._recent.pop(next(iter(self._recent)))
            recent = self._recent[key] = deque(maxlen=self.window)
        return steady_cpu_seconds(recent, cpu_s)

    def measure_gflops(self, seconds: float, threads: int | None = None) -> float:
        """The calibration kernel's rate as the emulated device shows it (paced like a stage):
        the best of :data:`CALIBRATION_ROUNDS` paced rounds, the steady rate, as stages are
        charged their steady time (agents that start together calibrate together)."""
        from edgeslice.broker.calibration import measure_gflops

        host_s = calibration_host_seconds(seconds, self.factor)
        round_s = max(host_s / CALIBRATION_ROUNDS, MIN_ROUND_SECONDS)
        host_wall = 0.0

        def kernel() -> float:
            nonlocal host_wall
            t0 = time.perf_counter()
            rate = measure_gflops(round_s, self.plan.threads)
            host_wall = time.perf_counter() - t0
            return rate

        best = 0.0
        for _ in range(CALIBRATION_ROUNDS):
            start = time.perf_counter()
            rate = self.run(kernel)
            best = max(best, paced_rate(rate, host_wall, time.perf_counter() - start))
        return best

    def to_info(self) -> dict[str, Any]:
        """The pacing half of ``info.limits``."""
        return {
            "mode": "paced",
            "device_gflops": self.plan.device_gflops,
            "host_core_gflops": self.plan.host_core_gflops,
            "pace_factor": round(self.factor, 4),
            "threads": self.plan.threads,
            "memory_bytes": self.plan.memory_bytes,
            "scale": self.plan.scale,
            "steady_window": self.window,
        }


_current: Pacer | None = None


def install(pacer: Pacer | None) -> None:
    """Make ``pacer`` pace this process's stages and calibrations (None: stop pacing)."""
    global _current
    _current = pacer


def current() -> Pacer | None:
    """The installed pacer, or None (not emulating, or emulating with a quota)."""
    return _current


# -- setting it up (agent/cli.py) ------------------------------------------------------------
def emulate_paced(
    agent_id: str,
    profile: FirmwareProfile,
    scale: float = 1.0,
    root: Path | None = None,
    proc_cgroup: Path | None = None,
    window: int = STEADY_WINDOW,
    namespace: str | None = None,
) -> tuple[Any, dict[str, Any], Pacer]:
    """Measure the host core, limit memory with a cgroup, and return (limits or None, the
    ``info.limits`` dict, the pacer); the caller installs the pacer. Never raises for a
    machine without cgroups: compute is still paced, memory is not limited (a WARNING).
    The memory group is agent/limits.py's ``group_name(namespace, agent_id)`` (the id
    alone: None)."""
    from edgeslice.agent.limits import DEFAULT_ROOT, apply_limits, group_name
    from edgeslice.agent.limits import _stop_signals_held as stop_signals_held
    from edgeslice.agent.quota import PERIOD_US, EmulationPlan, host_core_gflops
    from edgeslice.broker.protocol.errors import CgroupUnavailable

    root = root or DEFAULT_ROOT
    plan = plan_pacing(profile, host_core_gflops(), scale)
    pacer = Pacer(plan, window=window)
    info = pacer.to_info()
    cpus = os.cpu_count() or 1
    memory_only = EmulationPlan(
        float(cpus), plan.threads, plan.memory_bytes, plan.host_core_gflops, scale, PERIOD_US, -1
    )
    applied = None
    try:
        with stop_signals_held():  # so a SIGTERM cannot land between the writes and `applied`
            group = group_name(namespace, agent_id)
            applied = apply_limits(group, memory_only, os.getpid(), root, proc_cgroup)
    except CgroupUnavailable as exc:
        log.warning(
            "agent=%s paces its compute as %s but its memory is NOT limited: %s",
            agent_id,
            profile.name,
            exc,
        )
        return None, {**info, "memory": "unlimited", "reason": str(exc)}, pacer
    info = {**info, "cgroup": applied.mode, "cgroups": [str(g) for g in applied.groups]}
    if applied.notes:
        info["notes"] = list(applied.notes)
    log.info(
        "agent=%s emulates %s: paced x%.2f (%.2f GFLOP/s on a %.1f GFLOP/s core), "
        "%d thread(s), memory %d MiB (%s)",
        agent_id,
        profile.name,
        plan.factor,
        plan.device_gflops,
        plan.host_core_gflops,
        plan.threads,
        plan.memory_bytes // MIB,
        applied.mode,
    )
    return applied, info, pacer
