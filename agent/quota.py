"""Owns the arithmetic of profile emulation: the CPU quota, threads and memory for a profile.

Functions over numbers (no cgroup files), plus :func:`host_core_gflops`, the one
measurement they start from; :mod:`agent.limits` writes the numbers into cgroups and
moves the agent process in.

* **CPU.** Before limiting anything the agent measures this host's single-core
  rate ``host`` (``measure_gflops(0.3, threads=1)``). The profile's rate
  ``gflops_fp32`` then needs ``cores = gflops_fp32 / host * scale`` cores of
  this host; a CFS bandwidth quota (cgroup v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us``, or v2 ``cpu.max``) grants exactly that, capped at the
  host's CPU count and floored at 0.01 core. The calibration the agent
  publishes afterwards runs under the quota, so measured rates keep the ratios
  between profiles (an rpi5 agent measures ~2.5x an rpi4 agent). torch gets one
  thread unless the quota exceeds one core, then ``ceil(cores)`` (at most the
  profile's cores): more threads than the quota only stall together at the end
  of each period. The period is the kernel's default 100 ms: measured on a
  2-core x86 host, a 10 ms period delivered only 55-75 % of the granted
  quota's work at 0.15-0.4 core (every period restarts with cold caches and
  pays the unthrottle latency) while 100 ms delivered ~100 %, so the ratios
  between profiles hold; the price is bursts (0.15 core = 15 ms of full speed,
  85 ms stalled), which average out over a stage or a calibration run. A
  run only counts whole periods to within one burst, so a calibration must
  span many: under emulation ``agent/cli.py`` raises ``--calibrate-seconds`` to at least
  :attr:`EmulationPlan.min_calibrate_seconds` (20 periods, about 2 s, within
  ~10 %; the default 0.5 s measured an rpi4 quota anywhere from 60 to 110 %).
  ``host`` counts the calibration's *CPU* time, not its wall time: on a busy
  host (other agents, other work) wall time would make the core look slow and
  every quota too large.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

from edgeslice.firmware_profiles.schema import MIB, FirmwareProfile

MIN_CORES = 0.01
MIN_QUOTA_US = 1_000  # the kernel's minimum CFS quota
PERIOD_US = 100_000  # the kernel's default CFS period (see the module docstring)
MAX_CORRECTION = 2.5  # most corrected_plan may raise a quota


@dataclass(frozen=True)
class EmulationPlan:
    """The limits that make this host behave like one profile (pure arithmetic, no I/O)."""

    cores: float
    threads: int
    memory_bytes: int
    host_core_gflops: float
    scale: float
    period_us: int
    quota_us: int
    correction: float = 1.0  # factor applied by corrected_plan (1.0 = open-loop estimate)

    @property
    def min_calibrate_seconds(self) -> float:
        """Shortest calibration that sees enough CFS periods to measure the quota's rate."""
        return 20 * self.period_us / 1e6


def cpu_period_quota(cores: float) -> tuple[int, int]:
    """CFS (period, quota) in µs granting ``cores`` (the quota never below the kernel's 1 ms)."""
    return PERIOD_US, max(MIN_QUOTA_US, round(cores * PERIOD_US))


def plan_emulation(
    profile: FirmwareProfile,
    host_core_gflops: float,
    scale: float = 1.0,
    host_cpus: int | None = None,
) -> EmulationPlan:
    """Cores, threads and memory that make this host run like ``profile`` (see module doc)."""
    if host_core_gflops <= 0:
        raise ValueError(f"host single-core rate must be > 0 GFLOP/s, got {host_core_gflops}")
    if scale <= 0:
        raise ValueError(f"--emulate-scale must be > 0, got {scale}")
    cpus = host_cpus or os.cpu_count() or 1
    cores = min(max(profile.gflops_fp32 / host_core_gflops * scale, MIN_CORES), float(cpus))
    threads = 1 if cores <= 1.0 else min(math.ceil(cores), profile.cores)
    period, quota = cpu_period_quota(cores)
    return EmulationPlan(
        cores=round(cores, 4),
        threads=threads,
        memory_bytes=profile.ram_mb * MIB,
        host_core_gflops=round(host_core_gflops, 3),
        scale=scale,
        period_us=period,
        quota_us=quota,
    )


def corrected_plan(
    plan: EmulationPlan, measured_gflops: float, host_cpus: int | None = None
) -> EmulationPlan:
    """``plan`` with its quota scaled so the rate measured under it meets the target.

    Small quotas deliver less than their share of a core (after each stall the caches are
    cold; an rpi3b's 0.05 core measured ~60 % of its target, an rpi5's 0.47 core ~95 %),
    which would bend the ratios between profiles. One measurement under the quota fixes
    that; the factor is bounded so a momentarily busy host cannot inflate the quota much.
    """
    target = plan.cores * plan.host_core_gflops
    factor = target / measured_gflops if measured_gflops > 0 else MAX_CORRECTION
    factor = min(max(factor, 1 / 1.25), MAX_CORRECTION)
    cpus = host_cpus or os.cpu_count() or 1
    cores = min(max(plan.cores * factor, MIN_CORES), float(cpus))
    _period, quota = cpu_period_quota(cores)
    return dataclasses.replace(
        plan, cores=round(cores, 4), quota_us=quota, correction=round(factor, 3)
    )


HOST_RATE_ENV = "EDGESLICE_HOST_CORE_GFLOPS"  # a rate measured once for every agent of a host
HOST_RATE_ROUNDS = 3


def host_rate_from_env(value: str | None) -> float | None:
    """``EDGESLICE_HOST_CORE_GFLOPS`` as a rate (None when unset)."""
    if value is None or not value.strip():
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = -1.0
    if not rate > 0:
        raise ValueError(f"{HOST_RATE_ENV} must be a rate in GFLOP/s above 0, got {value!r}")
    return rate


def host_core_gflops(seconds: float = 0.3, rounds: int = HOST_RATE_ROUNDS) -> float:
    """This host's single-core GFLOP/s per second of CPU time (contention does not lower it).

    ``measure_gflops`` with one thread runs its kernels on the calling thread, so scaling
    its wall-clock rate by wall/thread-CPU time removes the time other processes took. CPU
    time still grows when other processes evict this one's caches (agents that start
    together calibrate together), so the best of ``rounds`` rounds counts: the core's
    steady rate, the yardstick :mod:`agent.pacing` divides by. Every emulated agent of a
    host should use the same figure (``lab/testbed.py`` measures it once and passes
    ``EDGESLICE_HOST_CORE_GFLOPS``, which this function returns when it is set).
    """
    from edgeslice.broker.calibration import measure_gflops  # the host's, never paced

    given = host_rate_from_env(os.environ.get(HOST_RATE_ENV))
    if given is not None:
        return given
    best = 0.0
    for _ in range(max(1, rounds)):
        wall, cpu = time.perf_counter(), time.thread_time()
        rate = measure_gflops(seconds / max(1, rounds), 1)
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        best = max(best, rate * wall / cpu if cpu > 0 else rate)
    return best
