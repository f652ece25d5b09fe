"""What an agent measures and says about itself: calibration GFLOP/s, batch speed-up and
link figures, and the retained ``info`` message built from them. The link is tested at
start-up, on ``cmd/calibrate``, and again when agent/linkwatch.py sees it slow down.

Calibration runs on the stage worker thread (between requests, like a stage would), so
the figure is what a stage will get; the link test goes through the broker
(agent/probe.py). A failed link test keeps the previous link figures: a calibrate
command on a busy link must not erase what the planner already knows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any

from edgeslice.agent.batching import measure_batch_speedup
from edgeslice.agent.config import AgentConfig
from edgeslice.agent.linkwatch import LinkWatch
from edgeslice.agent.probe import LinkTest
from edgeslice.agent.runtime import measure_gflops
from edgeslice.agent.telemetry import total_memory_bytes
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import BatchSpeedup, Info
from edgeslice.firmware_profiles import FirmwareProfile, profile_to_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    """The agent's own measurements (all zero until the first calibration)."""

    gflops: float = 0.0
    batch_speedup: list[BatchSpeedup] = field(default_factory=list)
    link_rtt_s: float = 0.0
    link_bandwidth_bps: float = 0.0


async def measure(
    before: Measured, executor: Executor, link: LinkTest, config: AgentConfig, seconds: float
) -> Measured:
    """Calibrate on ``executor`` (the stage thread) and test the link through the broker."""
    loop = asyncio.get_running_loop()
    gflops = await loop.run_in_executor(executor, measure_gflops, seconds, config.threads)
    speedup = await loop.run_in_executor(executor, measure_batch_speedup, config.max_batch, 0.3)
    now = await measure_link(replace(before, gflops=gflops, batch_speedup=speedup), link, config)
    log.info(
        "agent=%s gflops=%.2f rtt_ms=%.2f link_MBps=%.1f",
        config.agent_id,
        now.gflops,
        now.link_rtt_s * 1e3,
        now.link_bandwidth_bps / 1e6,
    )
    return now


async def measure_link(before: Measured, link: LinkTest, config: AgentConfig) -> Measured:
    """Test the link through the broker; a failed test keeps the previous figures."""
    try:
        rtt, bandwidth = await link.run(config.link_test_bytes)
    except (TimeoutError, EdgesliceError) as exc:
        log.warning("agent=%s link test failed: %s", config.agent_id, exc)
        return before
    return replace(before, link_rtt_s=rtt, link_bandwidth_bps=bandwidth)


CONFIRMED = 1.5  # a re-test re-announces a link that moved this much (the planner's factor)


async def retest_link(
    watch: LinkWatch,
    clock: Callable[[], float],
    before: Measured,
    link: LinkTest,
    config: AgentConfig,
) -> Measured | None:
    """Test the link again because ``watch`` saw transfers slow down or speed up. A test
    that finds the link moved that way by :data:`CONFIRMED` (bandwidth or round trip) is
    repeated, and the figure of the two nearer the old one kept: both must show it (a
    busy moment spoils a test; a test that finds the link faster while transfers say
    slower is noise). The new figures when they moved, None when the link tests as
    announced (a slower sender, a busy host) and nothing should change. Logged."""
    usual = watch.baseline_bps if watch.suspect == "slower" else watch.reference_bps
    log.warning(
        "agent=%s transfers arrive at %.2f MB/s, usually at %.2f: link %s? testing it again",
        *(config.agent_id, watch.rates[-1] / 1e6, (usual or 0.0) / 1e6, watch.suspect),
    )
    slower = watch.suspect == "slower"
    now = await measure_link(before, link, config)
    if moved := _moved(before, now, slower):  # a second test only to confirm a move
        again = await measure_link(before, link, config)
        least, most = (max, min) if slower else (min, max)  # the figure nearer "as before"
        now = replace(
            now,
            link_rtt_s=most(now.link_rtt_s, again.link_rtt_s),
            link_bandwidth_bps=least(now.link_bandwidth_bps, again.link_bandwidth_bps),
        )
        moved = _moved(before, now, slower)
    watch.tested(clock())
    log.warning(
        "agent=%s link re-tested: %.2f -> %.2f MB/s, rtt %.1f -> %.1f ms; %s",
        *(config.agent_id, before.link_bandwidth_bps / 1e6, now.link_bandwidth_bps / 1e6),
        *(before.link_rtt_s * 1e3, now.link_rtt_s * 1e3),
        "re-announcing" if moved else "as announced: not re-announced",
    )
    return now if moved else None


def _moved(before: Measured, now: Measured, slower: bool) -> bool:
    """The link moved by :data:`CONFIRMED` the way suspected: bandwidth down or round trip
    up (``slower``), else bandwidth up or round trip down. No earlier figure: any."""
    if before.link_bandwidth_bps <= 0 or before.link_rtt_s <= 0:
        return now.link_bandwidth_bps > 0
    bandwidth = now.link_bandwidth_bps / before.link_bandwidth_bps
    rtt = now.link_rtt_s / before.link_rtt_s
    if slower:
        return bandwidth * CONFIRMED < 1 or rtt > CONFIRMED
    return bandwidth > CONFIRMED or rtt * CONFIRMED < 1


def versions() -> dict[str, str]:
    """Python, torch and edgeslice versions, as ``info`` reports them."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        own = version("edgeslice")
    except PackageNotFoundError:
        own = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "edgeslice": own}


def build_info(
    config: AgentConfig,
    profile: FirmwareProfile,
    measured: Measured,
    *,
    memory_budget_bytes: int,
    hostname: str,
    limits: dict[str, Any],
    session: int,
) -> Info:
    """The agent's retained birth certificate for this session."""
    import torch

    return Info(
        agent_id=config.agent_id,
        profile=profile.name,
        profile_data=profile_to_dict(profile),
        gflops=measured.gflops,
        cpu_count=os.cpu_count() or 1,
        ram_bytes=total_memory_bytes(),
        memory_budget_bytes=memory_budget_bytes,
        hostname=hostname,
        versions=versions(),
        emulated=config.emulate,
        limits=limits,
        link_rtt_s=measured.link_rtt_s,
        link_bandwidth_bps=measured.link_bandwidth_bps,
        threads=torch.get_num_threads(),
        session=session,
        ts=time.time(),
        max_batch=config.max_batch,
        batch_speedup=measured.batch_speedup,
    )
