"""``edgeslice plan``: the latency/throughput Pareto front of a model's plans on a fleet.

The fleet is either the agents on a running broker (their ``info``: measured GFLOP/s,
memory budget, link; and, when the model is served already, the stage timings that
correct the cost model as the planner corrects it) or a testbed fleet file (each
device at its firmware profile's figures and link). The candidates and the front come from
:mod:`edgeslice.planner.pareto`; this module gathers the fleet, prints the table (or JSON)
and draws the PNG (matplotlib, the ``bench`` extra). Each point comes with the
``edgeslice planner --max-latency-ms`` bound that makes the planner serve it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import click

from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import BrokerSettings, connection_options
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.planner.cli import MODEL_HELP
from edgeslice.planner.costmodel import Device, ModelCost
from edgeslice.planner.pareto import Candidate, selecting_bounds
from edgeslice.planner.plans import Plan

NO_MATPLOTLIB = "no PNG written: matplotlib is not installed (pip install 'edgeslice[bench]')"


def fleet_file_devices(path: str) -> list[Device]:
    """The devices a testbed fleet file describes, at their profiles' figures and links
    (an agent with ``link = "none"`` is priced at its profile's link)."""
    from edgeslice.firmware_profiles import load_profile
    from edgeslice.lab.testbed import load_fleet_file

    devices = []
    for agent in load_fleet_file(path).agents:
        profile = load_profile(agent.profile)
        mbit, one_way_ms = profile.link.bandwidth_mbit, profile.link.latency_ms
        if agent.link is not None:
            mbit, one_way_ms = agent.link.bandwidth_mbit, agent.link.latency_ms
        devices.append(
            Device(
                agent.agent_id,
                gflops=profile.gflops_fp32,
                memory_bytes=profile.memory_budget_bytes,
                bandwidth_bps=mbit * 1e6 / 8,
                rtt_s=2 * one_way_ms / 1e3,
            )
        )
    return devices


async def broker_fleet(
    settings: BrokerSettings,
    model: str,
    wait_s: float,
    transport: TransportFactory | None = None,
) -> tuple[Any, PlanMessage | None]:
    """Listen ``wait_s`` seconds to the agents (and the model's plan) on the broker; the
    planner's :class:`~edgeslice.planner.registry.Registry` of them and the served plan."""
    from edgeslice.planner.registry import Registry

    topics = Topics(settings.namespace)
    registry = Registry(topics)
    client = (transport or mqtt_transport(settings))(f"plan-{int(time.time() * 1e3) % 10**9}")
    await client.connect()
    try:
        for suffix in ("status", "info", "telemetry"):
            await client.subscribe(topics.all_agents(suffix), qos=0)
        await client.subscribe(topics.plan(model), qos=0)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            msg = await client.next_message(timeout=left)
            if msg is not None:
                try:
                    registry.apply(msg.topic, msg.payload, time.time())
                except EdgesliceError:
                    continue  # a malformed message says nothing about the fleet
    finally:
        await client.close()
    return registry, registry.fleet.plans.get(model)


def front_rows(front: Sequence[Candidate]) -> list[dict[str, Any]]:
    """The front as JSON-able rows, each with the planner flag that selects it."""
    rows = []
    for k, (cand, bound) in enumerate(zip(front, selecting_bounds(front), strict=True)):
        plan = cand.plan
        rows.append(
            {
                "point": k,
                "latency_ms": round(plan.latency_s * 1e3, 3),
                "period_ms": round(plan.period_s * 1e3, 3),
                "throughput_rps": round(plan.throughput_rps, 3),
                "stages": len(plan.stages),
                "devices": cand.devices,
                "found_by": cand.found_by,
                "max_latency_ms": bound,
                "layout": [
                    {"segments": [s.start, s.end], "agents": list(s.agents)} for s in plan.stages
                ],
            }
        )
    return rows


def same_layout(a: Plan, b: Plan) -> bool:
    return [(s.start, s.end, s.agents) for s in a.stages] == [
        (s.start, s.end, s.agents) for s in b.stages
    ]


def format_front(
    front: Sequence[Candidate], candidates: int, marks: dict[int, str], where: str
) -> str:
    """The table ``edgeslice plan`` prints; ``marks`` notes points a planner flag serves."""
    lines = [
        f"Pareto front of {front[0].plan.model} on {where}: {len(front)} of {candidates} "
        "candidate plans (predicted by the planner's cost model)",
        f"{'#':>3} {'LATENCY ms':>11} {'PERIOD ms':>10} {'REQ/S':>8} {'STAGES':>6} "
        f"{'DEVICES':>7}  {'SERVE IT WITH':<34} FOUND BY",
    ]
    for row in front_rows(front):
        flag = f"--max-latency-ms {row['max_latency_ms']:g}"
        note = f"  <- {marks[row['point']]}" if row["point"] in marks else ""
        lines.append(
            f"{row['point']:>3} {row['latency_ms']:>11.1f} {row['period_ms']:>10.1f} "
            f"{row['throughput_rps']:>8.2f} {row['stages']:>6} {row['devices']:>7}  "
            f"{flag:<34} {row['found_by']}{note}"
        )
    return "\n".join(lines)


def write_png(
    front: Sequence[Candidate], candidates: Sequence[Candidate], path: str, title: str
) -> bool:
    """Draw every candidate and the front (latency vs throughput); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        ax.scatter(
            [c.latency_s * 1e3 for c in candidates],
            [c.plan.throughput_rps for c in candidates],
            color="0.7",
            label="candidate plans",
        )
        xs = [c.latency_s * 1e3 for c in front]
        ys = [c.plan.throughput_rps for c in front]
        ax.plot(xs, ys, "o-", color="tab:red", drawstyle="steps-post", label="Pareto front")
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ax.annotate(f"#{k}", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("predicted latency, one request (ms)")
        ax.set_ylabel("predicted throughput (requests/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return True


@click.command(name="plan")
@connection_options
@click.option("--model", "model_spec", required=True, envvar="EDGESLICE_MODEL", help=MODEL_HELP)
@click.option(
    "--fleet",
    "fleet_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A testbed fleet file (TOML, as for `edgeslice testbed up`): plan for the devices it "
    "describes at their profiles' figures, instead of the agents on --broker.",
)
@click.option(
    "--wait",
    type=float,
    default=3.0,
    show_default=True,
    help="Seconds to listen to the broker for agents and their stage timings.",
)
@click.option("--max-stages", type=int, default=None, help="At most this many pipeline stages.")
@click.option(
    "--max-segments",
    type=int,
    default=48,
    show_default=True,
    help="Merge the model's cut points down to this many segments (as the planner does).",
)
@click.option(
    "--png",
    "png_path",
    default=None,
    help="Where to draw the front (default pareto-MODEL.png; needs matplotlib).",
)
@click.option("--no-png", is_flag=True, help="Do not draw the PNG.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per front point.")
def plan_cmd(
    settings: BrokerSettings,
    model_spec: str,
    fleet_file: str | None,
    wait: float,
    max_stages: int | None,
    max_segments: int,
    png_path: str | None,
    no_png: bool,
    as_json: bool,
) -> None:
    """Print the latency/throughput Pareto front of MODEL's plans on a fleet.

    Candidates come from the planner's own search: both objectives, every
    pipeline length it tries, with and without replicas; the front keeps
    those no other plan beats on both predicted latency and period. Each point
    shows the `edgeslice planner --max-latency-ms X` that serves it (the
    highest-throughput plan within X ms); the points the planner's
    `--objective latency` and default `--objective throughput` serve are marked.
    """
    from edgeslice.planner.costmodel import CostParams, fit_correction
    from edgeslice.planner.pareto import candidate_plans, pareto_front
    from edgeslice.planner.partition import plan_partition
    from edgeslice.planner.startup import load_and_price

    if png_path and no_png:
        raise click.UsageError("--png and --no-png contradict each other")
    if wait < 0 or max_segments < 1 or (max_stages is not None and max_stages < 1):
        raise click.UsageError("--wait must be >= 0, --max-segments and --max-stages >= 1")
    try:
        loaded, _, cost = load_and_price(model_spec, max_segments)
        params = CostParams()
        if fleet_file is not None:
            devices = fleet_file_devices(fleet_file)
            where = f"{len(devices)} devices of {fleet_file}"
        else:
            registry, served = asyncio.run(broker_fleet(settings, loaded.name, wait))
            now = time.time()
            devices = registry.devices(now)
            if not devices:
                raise click.ClickException(
                    f"no usable agent on {settings.url} (namespace {settings.namespace}) "
                    f"within {wait:g}s: start agents, check --broker/--namespace, or give --fleet"
                )
            if served is not None and served.stages:
                samples = registry.timing_samples(cost, served.stages, now)
                params = CostParams(correction=fit_correction(samples))
            where = f"{len(devices)} agents on {settings.url}"
        candidates = candidate_plans(cost, devices, params, max_stages)
        front = pareto_front(candidates)
        if not front:
            plan_partition(cost, devices, "latency", params, max_stages)  # says why
            raise click.ClickException("no plan fits the fleet")
        marks = _marks(front, cost, devices, params, max_stages)
    except EdgesliceError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        for row in front_rows(front):
            click.echo(json.dumps(row))
    else:
        click.echo(format_front(front, len(candidates), marks, where))
    if not no_png:
        path = png_path or f"pareto-{loaded.name}.png"
        title = f"{loaded.name} on {where}"
        if write_png(front, candidates, path, title):
            click.echo(f"wrote {path}", err=True)
        else:
            click.echo(NO_MATPLOTLIB, err=True)


def _marks(
    front: Sequence[Candidate],
    cost: ModelCost,
    devices: Sequence[Device],
    params: Any,
    max_stages: int | None,
) -> dict[int, str]:
    """Which front points the planner's plain objectives serve (on a fresh start)."""
    from edgeslice.planner.partition import plan_partition

    marks: dict[int, str] = {}
    for objective, text in (("latency", "--objective latency"), ("throughput", "default")):
        plan = plan_partition(cost, devices, objective, params, max_stages)  # type: ignore[arg-type]
        for k, cand in enumerate(front):
            if same_layout(cand.plan, plan):
                marks[k] = f"{marks[k]}, {text}" if k in marks else text
    return marks
