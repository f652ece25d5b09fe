"""Owns ``edgeslice agent --emulate``'s set-up, done before the agent's service starts.

agent/cli.py calls it: :func:`check_env` refuses a malformed emulation environment in one
line naming the agent; :func:`setup_paced` installs the pacer (agent/pacing.py) and limits
memory with a cgroup; :func:`setup_quota` applies a CPU quota and memory limit
(agent/limits.py). Both print one line saying what is emulated (or that the agent runs
unlimited) and return what the service reports in ``info.limits``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from edgeslice.agent import pacing

log = logging.getLogger(__name__)


def check_env(agent_id: str) -> int:
    """The pace window (agent/pacing.py:env_window), or a one-line refusal of the env."""
    try:
        return pacing.env_window(os.environ)
    except ValueError as exc:
        raise click.ClickException(f"agent {agent_id}: {exc}") from None


def setup_paced(config: Any, firmware: Any, scale: float) -> tuple[Any, dict[str, Any], int]:
    """--emulate-mode paced: install the pacer (agent/pacing.py), limit memory with a cgroup."""
    window = check_env(config.agent_id)
    applied, limits, pacer = pacing.emulate_paced(
        config.agent_id, firmware, scale, window=window, namespace=config.broker.namespace
    )
    pacing.install(pacer)
    memory = f"memory {pacer.plan.memory_bytes >> 20} MiB" if applied else "memory UNLIMITED"
    click.echo(
        f"emulating {firmware.name}: paced x{pacer.factor:.2f} ({pacer.plan.device_gflops:.1f} "
        f"GFLOP/s on a {pacer.plan.host_core_gflops:.1f} GFLOP/s core), "
        f"{pacer.plan.threads} thread(s), {memory}",
        err=True,
    )
    return applied, limits, pacer.plan.threads


def setup_quota(config: Any, firmware: Any, scale: float) -> tuple[Any, dict[str, Any]]:
    """--emulate-mode quota: a CPU quota and memory limit (agent/limits.py), applied before
    the service starts (so its calibration runs under the limits)."""
    from edgeslice.agent.limits import emulate_profile

    applied, limits = emulate_profile(
        config.agent_id, firmware, scale, namespace=config.broker.namespace
    )
    if applied is None:
        click.echo(
            f"WARNING: --emulate: agent {config.agent_id} runs UNLIMITED at this host's full "
            f"speed, not as {firmware.name} ({limits['reason']}); its info says emulated=false.",
            err=True,
        )
        return None, limits
    if config.threads and config.threads != applied.plan.threads:
        log.info(
            "agent=%s --emulate uses %d torch thread(s) for %.2f cores instead of --threads %d",
            config.agent_id,
            applied.plan.threads,
            applied.plan.cores,
            config.threads,
        )
    click.echo(
        f"emulating {firmware.name}: {limits['mode']} {limits['cpu_cores']:.3f} cores of a "
        f"{limits['host_core_gflops']:.1f} GFLOP/s core, {applied.plan.threads} thread(s), "
        f"memory {applied.plan.memory_bytes >> 20} MiB",
        err=True,
    )
    return applied, limits
