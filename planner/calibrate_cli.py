"""``edgeslice calibrate``: sweep layers on every online agent, train and score the learned
cost model, save the calibration file the planner reads (``--cost-model``).

Heavy imports (torch, scikit-learn) happen inside the command, so the lazy CLI group lists
it without loading them. Exit 1 when no agent answered or the broker is unreachable.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import click

from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.settings import BrokerSettings, connection_options
from edgeslice.planner.learned import Choice, ErrorStats, Holdout, HoldoutRow, Predicted

MODEL_HELP = (
    "Also time this model's layers (built-in name or module:callable, as for the planner), "
    "held out as one group: the error on a model the estimator never saw. Repeatable."
)


def _pct(stats: ErrorStats | None) -> str:
    return f"{stats.p50:>5.0%} {stats.p90:>6.0%}" if stats is not None else f"{'-':>5} {'-':>6}"


def format_holdout(result: Holdout, choice: Choice | None) -> str:
    """The holdout table ``edgeslice calibrate`` prints (one row per kind, model, all)."""
    lines = [
        f"holdout: each row predicted by trees that never saw its layers ({result.folds} "
        "folds over kind x channel-band groups; each --model's layers a fold of its own)",
        "error = |predicted / measured - 1|; analytic = counted FLOPs / calibrated rate, "
        "timed = this host's time x its rate / the device's rate, both x the per-agent "
        "correction the planner fits (fitted on the training folds)",
        f"{'':18} {'n':>4}   {'learned p50':>11} {'p90':>6}   {'analytic p50':>12} {'p90':>6}"
        f"   {'timed p50':>9} {'p90':>6}   planner uses",
    ]

    def row(r: HoldoutRow, uses: str) -> str:
        return (
            f"{r.name:18} {r.learned.n:>4}   {_pct(r.learned):>18}   {_pct(r.analytic):>19}"
            f"   {_pct(r.timed):>16}   {uses}"
        )

    for r in result.kinds:
        uses = ""
        if choice is not None:
            uses = "learned" if choice.uses(r.name) else choice.baseline
        lines.append(row(r, uses))
    lines += [row(r, "") for r in result.models]
    lines.append(row(result.overall, ""))
    return "\n".join(lines)


def model_totals(result: Holdout) -> list[str]:
    """Per held-out model: each estimator's error on the sum of its distinct layers, per
    agent (the planner prices segments, sums of layers, where errors partly cancel)."""
    lines = []
    for group in sorted(
        {p.sample.group for p in result.predictions if p.sample.group.startswith("model:")}
    ):
        per_agent: dict[str, list[Predicted]] = {}
        for p in result.predictions:
            if p.sample.group == group:
                per_agent.setdefault(p.sample.agent, []).append(p)
        cells = []
        for name in ("learned", "analytic", "timed"):
            errs = []
            for rows in per_agent.values():
                got = [getattr(p, name) for p in rows]
                if all(g is not None for g in got):
                    errs.append(sum(got) / sum(p.sample.seconds for p in rows) - 1)
            cells.append(f"{name} " + " ".join(f"{e:+.0%}" for e in errs) if errs else f"{name} -")
        lines.append(f"{group} summed over its distinct layers, per agent: " + "; ".join(cells))
    return lines


def holdout_json(result: Holdout, choice: Choice) -> dict[str, Any]:
    """The holdout table as the calibration file keeps it (for people; recomputed on load)."""

    def stats(s: ErrorStats | None) -> dict[str, float] | None:
        return None if s is None else {"n": s.n, "p50": round(s.p50, 4), "p90": round(s.p90, 4)}

    rows = [*result.kinds, *result.models, result.overall]
    return {
        "folds": result.folds,
        "rows": {
            r.name: {
                "learned": stats(r.learned),
                "analytic": stats(r.analytic),
                "timed": stats(r.timed),
            }
            for r in rows
        },
        "learned_kinds": sorted(choice.learned),
        "baseline": choice.baseline,
        "reasons": choice.reasons,
    }


async def _run(
    settings: BrokerSettings,
    layers: list[Any],
    repeats: int,
    budget: float,
    min_agents: int,
    wait: float,
) -> tuple[dict[str, dict[str, Any]], list[tuple[int, str, float]]]:
    from edgeslice.broker.protocol.topics import Topics
    from edgeslice.broker.transport import mqtt_transport
    from edgeslice.planner.calibrate import collect, usable_agents

    topics = Topics(settings.namespace)
    client = mqtt_transport(settings)(f"calibrate-{socket.gethostname()}-{int(time.time())}")
    await client.connect()
    try:
        agents = await usable_agents(client, topics, min_agents, wait)
        click.echo(f"agents online: {', '.join(agents)}")
        return await collect(client, topics, agents, layers, repeats, budget, click.echo)
    finally:
        await client.close()


@click.command(name="calibrate")
@connection_options
@click.option("--model", "models", multiple=True, help=MODEL_HELP)
@click.option(
    "--out",
    default="calibration.json",
    show_default=True,
    help="Calibration file to write (the planner's --cost-model).",
)
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per layer.")
@click.option(
    "--budget",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds each agent may spend sweeping (it stops there and sends what it timed).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the layer draw.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Sweep size multiplier.")
@click.option(
    "--min-agents", type=int, default=1, show_default=True, help="Wait for this many agents."
)
@click.option(
    "--wait", type=float, default=30.0, show_default=True, help="... for at most this long."
)
@click.option(
    "--host-timing/--no-host-timing",
    default=True,
    show_default=True,
    help="Also time the layers on this host: the timed baseline (how the planner prices).",
)
def calibrate_cmd(
    settings: BrokerSettings,
    models: tuple[str, ...],
    out: str,
    repeats: int,
    budget: float,
    seed: int,
    scale: float,
    min_agents: int,
    wait: float,
    host_timing: bool,
) -> None:
    """Time a seeded sweep of layers on every online agent, then train and score the
    learned cost model and write the calibration file for `edgeslice planner --cost-model`."""
    from edgeslice.broker.layerspec import sweep_set
    from edgeslice.planner import learned
    from edgeslice.planner.calibrate import Calibration, sweep_layers, time_on_host

    try:
        model_layers = dict(_model_layers(m) for m in models)
        layers = sweep_layers(sweep_set(seed, scale), model_layers)
        reference = 0.0
        if host_timing:
            click.echo(f"timing {len(layers)} layers on this host (the timed baseline) ...")
            layers, reference = time_on_host(layers)
        figures, measured = asyncio.run(_run(settings, layers, repeats, budget, min_agents, wait))
    except EdgesliceError as exc:
        raise click.ClickException(str(exc)) from exc
    if not measured:
        raise click.ClickException("no agent returned any timed layer; see the agents' logs")
    cal = Calibration(layers, figures, measured, reference, time.time(), socket.gethostname())
    if learned.available():
        result = learned.holdout(cal.samples(), reference)
        choice = learned.choose(result)
        cal.holdout = holdout_json(result, choice)
        click.echo(format_holdout(result, choice))
        for line in model_totals(result):
            click.echo(line)
    else:
        click.echo(
            "scikit-learn is not installed (pip install 'edgeslice[ml]'): samples saved, "
            "no model trained; the planner keeps the analytic model"
        )
    cal.save(out)
    agents = sum(1 for f in figures.values() if "error" not in f)
    click.echo(
        f"wrote {out}: {len(measured)} samples from {agents} agent(s); "
        f"use it with: edgeslice planner --cost-model {out} ..."
    )


def _model_layers(spec: str) -> tuple[str, list[Any]]:
    from edgeslice.planner.learnedcost import model_layers
    from edgeslice.planner.modelspec import load_model
    from edgeslice.planner.profile import profile_model

    loaded = load_model(spec)
    profile = profile_model(loaded.module, loaded.example_inputs, None, loaded.name)
    return loaded.name, model_layers(profile)
