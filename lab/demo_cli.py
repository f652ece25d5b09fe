"""``edgeslice demo``: broker, planner, agents and a partitioned model on this machine.

Heavy imports (torch, the fleet launcher) happen inside each command, so the lazy CLI
group can list and describe these commands without loading torch.
"""

from __future__ import annotations

import sys

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
    try:
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
    except EdgesliceError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        click.echo("demo interrupted: everything it started is stopped and its folder removed")
        sys.exit(130)
    sys.exit(code)
