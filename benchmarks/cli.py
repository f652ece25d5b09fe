"""``edgeslice bench NAME``: run one benchmark; it prints its figures and writes its JSON."""

from __future__ import annotations

import importlib

import click

BENCHMARKS = {
    "transport": "transport",
    "planner": "planner_bench",
    "strategies": "strategies",
    "scaling": "scaling",
    "simulation": "simulation",
    "emulation": "emulation",
}


@click.command(name="bench")
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.option(
    "--quick", is_flag=True, help="A short run (what CI runs to keep benchmarks working)."
)
def bench_cmd(name: str, quick: bool) -> None:
    """Run benchmark NAME; it prints its figures and writes NAME.json.

    Results go to benchmarks/results/ in a source checkout, else to
    ./edgeslice-bench-results (or $EDGESLICE_BENCH_RESULTS).
    """
    # A module of this package, imported only when asked for (torch stays out of --help).
    module = importlib.import_module(f"{__package__}.{BENCHMARKS[name]}")
    module.main(quick=quick)
