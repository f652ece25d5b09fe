"""``edgeslice bench NAME``: run one benchmark; it prints its figures and writes its JSON."""

from __future__ import annotations

import importlib
import inspect

import click

BENCHMARKS = {
    "transport": "transport",
    "dispatch": "dispatch",
    "planner": "planner_bench",
    "strategies": "strategies",
    "intralayer": "intralayer",
    "scaling": "scaling",
    "simulation": "simulation",
    "emulation": "emulation",
    "batching": "batching",
    "soak": "soak",
    "brokers": "brokers",
}


@click.command(name="bench")
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.option(
    "--quick", is_flag=True, help="A short run (what CI runs to keep benchmarks working)."
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=None,
    help="Repetitions of each measurement (benchmarks that repeat: transport, dispatch).",
)
def bench_cmd(name: str, quick: bool, runs: int | None) -> None:
    """Run benchmark NAME; it prints its figures and writes NAME.json.

    Results go to benchmarks/results/ in a source checkout, else to
    ./edgeslice-bench-results (or $EDGESLICE_BENCH_RESULTS).
    """
    # A module of this package, imported only when asked for (torch stays out of --help).
    module = importlib.import_module(f"{__package__}.{BENCHMARKS[name]}")
    if runs is None:
        module.main(quick=quick)
    elif "runs" in inspect.signature(module.main).parameters:
        module.main(quick=quick, runs=runs)
    else:
        raise click.UsageError(f"benchmark {name!r} does not take --runs")
