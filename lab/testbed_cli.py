"""``edgeslice testbed up|down``: start and stop emulated device fleets.

Heavy imports (torch, the fleet launcher) happen inside each command, so the lazy CLI
group can list and describe these commands without loading torch.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import click

from edgeslice.broker.protocol.errors import EdgesliceError


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


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
