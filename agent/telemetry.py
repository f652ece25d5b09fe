"""Resource readings from psutil turned into Telemetry messages (the only psutil user).

psutil calls are cheap but not free on a Pi, so one :class:`TelemetrySampler`
keeps the process handle and the CPU-percent baselines between samples.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from edgeslice.broker.protocol.messages import Telemetry


def read_temperature() -> float | None:
    """The hottest CPU-ish sensor in °C, or None when the board has none (most VMs)."""
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except (OSError, RuntimeError):
        return None
    preferred = ("cpu_thermal", "coretemp", "k10temp", "soc_thermal", "cpu-thermal")
    readings = [t.current for name in preferred for t in sensors.get(name, [])]
    if not readings:
        readings = [t.current for entries in sensors.values() for t in entries]
    readings = [r for r in readings if r is not None and -40.0 < r < 150.0]
    return max(readings) if readings else None


def total_memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


class TelemetrySampler:
    """Builds a :class:`Telemetry` message from the machine's current state."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self._process = psutil.Process(os.getpid())
        psutil.cpu_percent(percpu=True)  # prime the baselines: the first call returns 0.0
        psutil.cpu_percent()

    def sample(
        self,
        queue_depth: int = 0,
        in_flight: int = 0,
        malformed: int = 0,
        busy: float = 0.0,
        stage_timings: dict[str, dict[str, float]] | None = None,
    ) -> Telemetry:
        per_core = [float(x) for x in psutil.cpu_percent(percpu=True)]
        total = sum(per_core) / len(per_core) if per_core else 0.0
        mem = psutil.virtual_memory()
        try:
            load: list[float] = [float(x) for x in os.getloadavg()]
        except OSError:
            load = []
        net: Any = psutil.net_io_counters()
        return Telemetry(
            agent_id=self.agent_id,
            ts=time.time(),
            cpu_percent=round(total, 1),
            cpu_per_core=[round(x, 1) for x in per_core],
            mem_used_bytes=int(mem.total - mem.available),
            mem_total_bytes=int(mem.total),
            mem_percent=float(mem.percent),
            load_avg=load,
            temperature_c=read_temperature(),
            net_bytes_sent=int(net.bytes_sent) if net else 0,
            net_bytes_recv=int(net.bytes_recv) if net else 0,
            rss_bytes=int(self._process.memory_info().rss),
            queue_depth=queue_depth,
            in_flight=in_flight,
            malformed_messages=malformed,
            busy=busy,
            stage_timings=stage_timings or {},
        )
