"""``edgeslice demo|testbed``: run a fleet on this machine, from one command.

Heavy imports (torch, the fleet launcher) happen inside each command, so the lazy CLI
group can list and describe these commands without loading torch.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import click

from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.planner.cli import MODEL_HELP


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command(name="demo")
@click.option("--model", default="mobilenetv2", show_default=True, help=MODEL_HELP)
@click.option("--agents", type=int, default=3, show_default=True, help="Local agents to start.")
@click.option("--requests", type=int, default=32, show_default=True, help="Requests to run.")
@click.option(
    "--concurrency",
    type=int,
    default=4,
    show_default=True,
    help="Requests in flight at once for the throughput figure.",
)
@click.option(
    "--objective",
    type=click.Choice(["latency", "throughput"]),
    default="throughput",
    show_default=True,
)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    help="Use this broker instead of starting one (mqtt://host:port).",
)
def demo_cmd(
    model: str, agents: int, requests: int, concurrency: int, objective: str, broker_url: str | None
) -> None:
    """Broker + planner + agents + a partitioned model on this machine, in one command.

    Starts everything as separate processes, runs REQUESTS through the
    partitioned model, checks each output against the whole model
    (torch.allclose), prints the plan and the measured figures, stops everything.
    """
    from edgeslice.lab.demo import DemoOptions, run_demo

    if agents < 1 or requests < 1 or concurrency < 1:
        raise click.UsageError("--agents, --requests and --concurrency must be >= 1")
    code = run_demo(
        DemoOptions(
            model=model,
            agents=agents,
            requests=requests,
            concurrency=concurrency,
            objective=objective,
            broker_url=broker_url,
        )
    )
    sys.exit(code)


def _default_state() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgeslice", "testbed", "state.json")


@click.group(name="testbed")
def testbed_group() -> None:
    """Start and stop emulated device fleets (cgroup-limited agents behind shaped links)."""


@testbed_group.command(name="up")
@click.option(
    "--fleet",
    "fleet_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="TOML fleet file: [[agents]] tables with profile, count, link, emulate.",
)
@click.option(
    "--state",
    "state_file",
    default=_default_state,
    show_default="~/.cache/...",
    help="Where to record the processes, for `testbed down`.",
)
@click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for every agent to announce itself.",
)
def testbed_up(fleet_file: str, state_file: str, timeout: float) -> None:
    """Start a fleet in the background and print each agent's emulated rate and limits."""
    from edgeslice.lab.testbed import Testbed, load_fleet_file, wait_for_agents

    if os.path.exists(state_file):
        raise click.ClickException(
            f"a testbed is already up ({state_file}); run `edgeslice testbed down` first"
        )
    try:
        spec = load_fleet_file(fleet_file)
        workdir = os.path.join(os.path.dirname(state_file), "run")
        bed = Testbed(spec, workdir).up()
        Path(state_file).parent.mkdir(parents=True, exist_ok=True)
        Path(state_file).write_text(json.dumps(bed.state(), indent=2), encoding="utf-8")
        infos = asyncio.run(wait_for_agents(bed.broker_url, spec.namespace, bed.agents, timeout))
    except EdgesliceError as exc:
        raise _fail(exc) from None
    click.echo(
        f"testbed up: broker {bed.broker_url}, namespace {spec.namespace}, logs in {workdir}"
    )
    for agent_id, info in infos.items():
        mode = info.limits.get("mode", "unlimited") if info.limits else "unlimited"
        click.echo(f"  {agent_id:<20} {info.profile:<17} {info.gflops:7.2f} GFLOP/s  {mode}")
    click.echo(f"stop it with: edgeslice testbed down --state {state_file}")


@testbed_group.command(name="down")
@click.option(
    "--state",
    "state_file",
    default=_default_state,
    show_default="~/.cache/...",
    help="The state file `testbed up` wrote.",
)
def testbed_down(state_file: str) -> None:
    """Stop every testbed process and remove the agents' cgroups."""
    from edgeslice.lab.testbed import down_from_state

    try:
        left = down_from_state(state_file)
    except EdgesliceError as exc:
        raise _fail(exc) from None
    if left:
        raise click.ClickException("left behind: " + ", ".join(left))
    click.echo("testbed down: no process or cgroup left")
