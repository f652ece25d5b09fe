"""``edgeslice testbed up|down``: start and stop emulated device fleets.

Heavy imports (torch, the fleet launcher) happen inside each command, so the lazy CLI
group can list and describe these commands without loading torch.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal

import click

from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.settings import DEFAULT_NAMESPACE


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
    """Start a fleet in the background and print each agent's emulated rate and limits.

    Ctrl-C or SIGTERM while it starts stops and removes everything started so far.
    """
    from edgeslice.lab.testbed import Testbed, load_fleet_file, wait_for_agents

    if os.path.exists(state_file):
        raise click.ClickException(
            f"a testbed is already up ({state_file}); run `edgeslice testbed down` first"
        )
    try:
        spec = load_fleet_file(fleet_file)
    except EdgesliceError as exc:
        raise _fail(exc) from None
    workdir = os.path.join(os.path.dirname(os.path.abspath(state_file)), "run")
    bed = Testbed(spec, workdir, state_file=state_file, detached=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        bed.up()  # undoes itself on an error or interrupt
        try:
            infos = asyncio.run(
                wait_for_agents(bed.broker_url, spec.namespace, bed.agents, timeout)
            )
        except BaseException:
            bed.abort()
            raise
    except EdgesliceError as exc:
        raise click.ClickException(f"{exc}\ntestbed stopped; logs kept in {workdir}") from None
    except KeyboardInterrupt:
        click.echo("testbed up: interrupted; stopped and removed what had started", err=True)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert bed.fleet is not None
    click.echo(
        f"testbed up: broker {bed.broker_url}, namespace {spec.namespace}, logs in {workdir}"
    )
    for agent_id, info in infos.items():
        mode = info.limits.get("mode", "unlimited") if info.limits else "unlimited"
        click.echo(f"  {agent_id:<20} {info.profile:<17} {info.gflops:7.2f} GFLOP/s  {mode}")
    key = bed.fleet.fleet_key_file
    click.echo(
        f"fleet key: {key} (this testbed's own private key; its agents hold the .pub next "
        "to it and load only artifacts signed with it)"
    )
    click.echo("plan a model on it with (any --model):")
    click.echo("  " + planner_command(bed.broker_url, spec.namespace, key))
    click.echo(f"stop it with: edgeslice testbed down --state {shlex.quote(state_file)}")


def planner_command(
    broker_url: str, namespace: str, key_file: str, model: str = "mobilenetv2"
) -> str:
    """The ``edgeslice planner`` command line that works with this testbed."""
    args = ["edgeslice", "planner", "--broker", broker_url]
    if namespace != DEFAULT_NAMESPACE:
        args += ["--namespace", namespace]
    args += ["--fleet-key-file", key_file, "--model", model]
    return shlex.join(args)


def _interrupt(_sig: int, _frame: object) -> None:
    """SIGTERM during `testbed up` is handled like Ctrl-C: stop what started, then exit."""
    raise KeyboardInterrupt


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
