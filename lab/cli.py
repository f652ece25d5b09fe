"""The ``edgeslice`` click group: every subcommand is loaded lazily by import string.

Loading by import string keeps ``edgeslice --help`` and ``edgeslice monitor``
free of torch (a second or more on a Pi) and keeps the packages independent:
``broker`` never imports ``agent`` or ``planner`` just to list their commands.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

# name -> (import string, one-line help shown by `edgeslice --help` without importing)
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": (
        "edgeslice.lab.broker_cli:broker_group",
        "Run a local development broker, or write a production config.",
    ),
    "monitor": (
        "edgeslice.client.monitor:monitor_cmd",
        "Watch agents live, or decode raw topic traffic.",
    ),
    "profiles": (
        "edgeslice.firmware_profiles.cli:profiles_group",
        "List and show firmware profiles (device classes).",
    ),
    "agent": ("edgeslice.agent.cli:agent_cmd", "Run an agent on this device."),
    "agent-service": (
        "edgeslice.agent.systemd_cli:agent_service_group",
        "Install the agent as a systemd service (unit + env file).",
    ),
    "planner": ("edgeslice.planner.cli:planner_cmd", "Run the planner service for a model."),
    "infer": ("edgeslice.client.cli:infer_cmd", "Send an inference request to a running fleet."),
    "plan": (
        "edgeslice.lab.plan_cli:plan_cmd",
        "Print a model's latency/throughput Pareto front of plans on a fleet.",
    ),
    "profile": (
        "edgeslice.planner.cli:profile_cmd",
        "Print a model's cut points and per-segment costs.",
    ),
    "keygen": (
        "edgeslice.planner.cli:keygen_cmd",
        "Create the key pair that signs stage artifacts (fleet.key, fleet.pub).",
    ),
    "demo": (
        "edgeslice.lab.demo_cli:demo_cmd",
        "Broker + planner + agents + a partitioned model, on this machine.",
    ),
    "testbed": (
        "edgeslice.lab.testbed_cli:testbed_group",
        "Start and stop emulated device fleets.",
    ),
    "calibrate": (
        "edgeslice.planner.calibrate_cli:calibrate_cmd",
        "Time a layer sweep on every agent; train and score the learned cost model.",
    ),
    "bench": ("edgeslice.benchmarks.cli:bench_cmd", "Run a benchmark and write its JSON results."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked (or asked for help)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        module = importlib.import_module(module_name)
        command = getattr(module, attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{entry[0]} is not a click command")
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """``edgeslice agent install-service ...`` is ``edgeslice agent-service install ...``
        (``agent`` itself runs the agent and takes no subcommand)."""
        if args[:2] == ["agent", "install-service"]:
            group = self.get_command(ctx, "agent-service")
            if isinstance(group, click.Group):
                install = group.get_command(ctx, "install")
                if install is not None:
                    return "agent install-service", install, args[2:]
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v",
    "--verbose",
    count=True,
    envvar="EDGESLICE_VERBOSE",
    help="More log output (-vv for debug).",
)
@click.version_option(package_name="edgeslice", prog_name="edgeslice")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """edgeslice: run one PyTorch model across many small devices over MQTT.

    Every device runs `edgeslice agent`; one `edgeslice planner` cuts the model
    into slices and places them; `edgeslice infer` sends requests; `edgeslice
    monitor` shows the fleet. `edgeslice demo` runs all of it on this machine.

    Options of every subcommand also read EDGESLICE_* environment variables
    (for example EDGESLICE_BROKER for --broker).
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    ctx.ensure_object(dict)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
