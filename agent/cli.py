"""``edgeslice agent``: parse flags/env/config file into an AgentConfig and run the service.

A stop signal must end the agent within seconds whenever it arrives, and a serving agent
must not drop the requests it holds. Before the event loop runs (imports, ``--emulate``'s
measurements) SIGTERM raises ``SystemExit(143)``, so the ``finally`` blocks still remove
the cgroups. Once the service runs, SIGTERM/SIGINT set its stop event; the service only
looks at it after start-up (connect, calibration, link test: tens of seconds on a slow,
shaped link), so a service still *starting* :data:`STOP_GRACE_S` after the signal is
cancelled. A service that serves drains instead (agent/drain.py: at most
``--drain-timeout`` for the planner to move requests away, then it finishes the held
ones) and exits 0; a second signal cancels it at once (broker/lifecycle.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import click

from edgeslice.agent import emulation
from edgeslice.broker.lifecycle import run_until_signalled
from edgeslice.broker.metrics import MetricsEndpoint, metrics_options
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.settings import BrokerSettings, connection_options

log = logging.getLogger(__name__)

STOP_GRACE_S = 1.5  # an agent still starting this long after the stop signal is cancelled


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    from edgeslice.agent.config import load_config_file

    try:
        ctx.default_map = {**(ctx.default_map or {}), **load_config_file(value)}
    except EdgesliceError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(name="agent")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    envvar="EDGESLICE_CONFIG",
    help="TOML file with defaults for these options ([agent] table, keys like telemetry_interval)."
    " Flags and env vars win over it. [env EDGESLICE_CONFIG]",
)
@connection_options
@click.option(
    "--id",
    "agent_id",
    envvar="EDGESLICE_ID",
    default=None,
    help="Agent id used in topics (default: this host's name). [env EDGESLICE_ID]",
)
@click.option(
    "--profile",
    envvar="EDGESLICE_PROFILE",
    default="auto",
    show_default=True,
    help="Firmware profile name (see `edgeslice profiles list`), a TOML file, or 'auto': "
    "detect the board (`edgeslice profiles detect` shows the choice). [env EDGESLICE_PROFILE]",
)
@click.option(
    "--telemetry-interval",
    type=float,
    default=2.0,
    show_default=True,
    envvar="EDGESLICE_TELEMETRY_INTERVAL",
    help="Seconds between telemetry messages.",
)
@click.option(
    "--cache-dir",
    envvar="EDGESLICE_CACHE_DIR",
    default=None,
    help="Where stage artifacts are cached (default ~/.cache/edgeslice).",
)
@click.option(
    "--fleet-key-file",
    envvar="EDGESLICE_FLEET_KEY_FILE",
    default=None,
    help="The planner's public key (fleet.pub from `edgeslice keygen`) that verifies "
    "artifact signatures (default ~/.config/edgeslice/fleet.pub; or EDGESLICE_FLEET_KEY "
    "as ed25519-pub:<hex>).",
)
@click.option(
    "--threads",
    type=int,
    envvar="EDGESLICE_THREADS",
    default=None,
    help="torch intra-op threads (default: torch's choice, usually the core count).",
)
@click.option(
    "--memory-mb",
    type=int,
    envvar="EDGESLICE_MEMORY_MB",
    default=None,
    help="Memory budget for model stages, MiB (default: the profile's RAM minus its "
    "reserve, capped by this machine's RAM).",
)
@click.option(
    "--max-queue",
    type=int,
    envvar="EDGESLICE_MAX_QUEUE",
    default=64,
    show_default=True,
    help="Requests waiting for compute before new ones are refused.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    envvar="EDGESLICE_MAX_BATCH",
    default=8,
    show_default=True,
    help="Most requests of one stage run together as one batch (1 = batching off). "
    "[env EDGESLICE_MAX_BATCH]",
)
@click.option(
    "--max-batch-wait-ms",
    type=click.FloatRange(min=0),
    envvar="EDGESLICE_MAX_BATCH_WAIT_MS",
    default=2.0,
    show_default=True,
    help="Longest a request waits for others to batch with (0 = batch only what is already "
    "queued; never past a request's deadline). [env EDGESLICE_MAX_BATCH_WAIT_MS]",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    envvar="EDGESLICE_DRAIN_TIMEOUT",
    default=10.0,
    show_default=True,
    help="On SIGTERM/Ctrl-C: seconds to keep serving while the planner moves requests to "
    "other agents; then new requests are refused (clients retry) and held ones finish. "
    "A second signal stops at once.",
)
@click.option(
    "--link-watch",
    type=click.FloatRange(min=0),
    envvar="EDGESLICE_LINK_WATCH",
    default=5.0,
    show_default=True,
    help="Window (s) over which received transfers' rate is watched: 3 windows in a row at "
    "under half the usual rate re-test the link and re-announce it (at most every 12 "
    "windows); 0 = only at start-up and on cmd/calibrate. [env EDGESLICE_LINK_WATCH]",
)
@click.option(
    "--calibrate-seconds",
    type=float,
    envvar="EDGESLICE_CALIBRATE_SECONDS",
    default=0.5,
    show_default=True,
    help="Length of the start-up GFLOP/s calibration.",
)
@click.option(
    "--emulate/--no-emulate",
    envvar="EDGESLICE_EMULATE",
    default=False,
    show_default=True,
    help="Limit this agent to its profile with cgroups (CPU quota scaled so the measured "
    "GFLOP/s matches the profile's, memory limit = the profile's RAM; sets the torch "
    "threads). Needs root and cgroups; without them it warns and runs unlimited. "
    "[env EDGESLICE_EMULATE]",
)
@click.option(
    "--emulate-mode",
    type=click.Choice(["paced", "quota"]),
    envvar="EDGESLICE_EMULATE_MODE",
    default="paced",
    show_default=True,
    help="With --emulate: 'paced' runs each stage at host speed and holds its result until "
    "the profile's device would be done (no CPU quota, so no bursts; memory still a cgroup "
    "limit; works without root, memory then unlimited); 'quota' limits CPU with a cgroup "
    "quota (bursts within each 100 ms period). [env EDGESLICE_EMULATE_MODE]",
)
@click.option(
    "--emulate-scale",
    type=click.FloatRange(min=0, min_open=True),
    envvar="EDGESLICE_EMULATE_SCALE",
    default=1.0,
    show_default=True,
    help="With --emulate: multiply the profile's speed (0.5 = half as fast as the board).",
)
@metrics_options
def agent_cmd(
    settings: BrokerSettings,
    agent_id: str | None,
    profile: str,
    telemetry_interval: float,
    cache_dir: str | None,
    fleet_key_file: str | None,
    threads: int | None,
    memory_mb: int | None,
    max_queue: int,
    max_batch: int,
    max_batch_wait_ms: float,
    drain_timeout: float,
    link_watch: float,
    calibrate_seconds: float,
    emulate: bool,
    emulate_mode: str,
    emulate_scale: float,
    metrics: MetricsEndpoint | None,
) -> None:
    """Run an agent on this device until SIGTERM/Ctrl-C.

    The agent announces itself (status, info with a short calibration run),
    publishes telemetry, loads the model stages the planner assigns to it and
    runs requests through them. Example:

    \b
        edgeslice agent --broker mqtt://192.168.1.10:1883 --id pi-1 --profile rpi4-4gb
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # until the event loop takes over
    from edgeslice.agent.config import AgentConfig, default_agent_id
    from edgeslice.agent.service import AgentService
    from edgeslice.firmware_profiles import load_profile
    from edgeslice.firmware_profiles.detect import resolve_profile

    try:
        profile, warning = resolve_profile(profile)  # "auto" -> the detected board's
        if warning:
            click.echo(f"WARNING: {warning}", err=True)
        config = AgentConfig(
            agent_id=agent_id or default_agent_id(),
            profile=profile,
            broker=settings,
            telemetry_interval=telemetry_interval,
            cache_dir=cache_dir or "",
            fleet_key_file=fleet_key_file,
            threads=threads,
            memory_budget_mb=memory_mb,
            max_queue=max_queue,
            max_batch=max_batch,
            max_batch_wait_ms=max_batch_wait_ms,
            calibrate_seconds=calibrate_seconds,
            drain_timeout_s=drain_timeout,
            link_watch_s=link_watch,
            emulate_mode=emulate_mode,
        )
        firmware = load_profile(profile)
    except EdgesliceError as exc:
        raise click.ClickException(str(exc)) from None
    applied: Any = None
    exporter: Any = None  # /metrics server (agent/metrics.py), with --metrics-port
    limits: dict[str, Any] = {}
    try:
        if emulate and emulate_mode == "paced":
            applied, limits, threads = emulation.setup_paced(config, firmware, emulate_scale)
            config = dataclasses.replace(config, emulate=True, threads=threads)
        elif emulate:
            emulation.check_env(config.agent_id)
            applied, limits = emulation.setup_quota(config, firmware, emulate_scale)
        if applied is not None and emulate_mode == "quota":
            config = dataclasses.replace(
                config,
                emulate=True,
                threads=applied.plan.threads,
                calibrate_seconds=max(calibrate_seconds, applied.plan.min_calibrate_seconds),
            )
        try:
            service = AgentService(config, limits=limits)
            if metrics is not None:
                from edgeslice.agent.metrics import serve_agent_metrics

                exporter = serve_agent_metrics(service, metrics)
                click.echo(f"edgeslice agent: metrics on {exporter.url}", err=True)
        except EdgesliceError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(
            f"edgeslice agent {config.agent_id} ({service.profile.name}) -> {settings.url}",
            err=True,
        )
        # Across the hand-over to the event loop a signal only sets a flag: raising
        # SystemExit while asyncio.run builds its loop leaves a half-built loop behind.
        early: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: early.append(signum))
        try:
            asyncio.run(
                run_until_signalled(
                    _stop_promptly(service.run, service.serving), pending=lambda: bool(early)
                )
            )
        except EdgesliceError as exc:
            text = str(exc)  # name the agent once, whether or not the error already does
            named = repr(config.agent_id) in text or f"agent {config.agent_id}" in text
            raise click.ClickException(
                text if named else f"agent {config.agent_id}: {text}"
            ) from None
    finally:
        if exporter is not None:
            exporter.close()
        if applied is not None:
            for problem in applied.release():
                log.warning("agent=%s cgroup left behind: %s", config.agent_id, problem)


def _exit_on_sigterm(_sig: int, _frame: object) -> NoReturn:
    """SIGTERM before the event loop runs: unwind (cgroups are released) and exit 143."""
    raise SystemExit(128 + signal.SIGTERM)


def _stop_promptly(
    run: Callable[[asyncio.Event], Awaitable[None]], serving: asyncio.Event
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """``run``, cancelled if it is still starting (``serving`` not set) :data:`STOP_GRACE_S`
    after ``stop`` is set; one that serves is left to drain (cancelling this cancels it)."""

    async def bounded(stop: asyncio.Event) -> None:
        task = asyncio.ensure_future(run(stop))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not serving.is_set():
                started = asyncio.ensure_future(serving.wait())
                done, _ = await asyncio.wait(
                    {task, started}, timeout=STOP_GRACE_S, return_when=asyncio.FIRST_COMPLETED
                )
                started.cancel()
                if not done:
                    log.warning(
                        "agent still starting %.1f s after the stop signal: cancelling",
                        STOP_GRACE_S,
                    )
                    task.cancel()
            await asyncio.wait({task})  # a serving agent drains
        finally:
            stopping.cancel()
            if not task.done():  # this was cancelled: a second signal
                task.cancel()
                await asyncio.wait({task})
        if not task.cancelled():
            task.result()  # re-raise what the service raised

    return bounded
