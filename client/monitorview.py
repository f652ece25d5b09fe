"""Owns how ``edgeslice monitor`` draws a fleet: rows, per-stage timings, plain text, rich tables.

Everything here is a pure function of a :class:`~edgeslice.broker.fleetstate.FleetState` and
the clock. Two views of the same rows:

* :func:`render` -- plain lines (what scripts, pipes and tests read): one line per agent with
  its link (round trip and MB/s through the broker, as its ``info`` measured them), then per
  plan its summary, its predicted latency and period, and one line per stage and agent:
  predicted compute and transfer (from the plan message) next to the compute and queue time
  the agent measured (its telemetry's ``stage_timings`` for that stage's artifact).
* :func:`rich_view` -- the same rows as ``rich`` tables, for the live view on a terminal.
  ``rich`` is imported inside it (the ``monitor`` extra); callers check :func:`rich_available`.

Measured transfer times are not in agent telemetry (only in each request's timings, which the
client sees), so the stage rows compare compute and show the agents' queueing.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from edgeslice.broker.fleetstate import AgentState, FleetState
from edgeslice.broker.protocol.messages import PlanMessage, PlanStage

NO_AGENTS = "(no agents yet: start one with `edgeslice agent --broker ...`)"


def rich_available() -> bool:
    """Whether the live ``rich`` view can be drawn (``pip install 'edgeslice[monitor]'``)."""
    return importlib.util.find_spec("rich") is not None


def agent_row(state: AgentState, now: float) -> dict[str, Any]:
    """One agent as the monitor's JSON row (``--json``) and table line."""
    info, tel, rep = state.info, state.telemetry, state.reported
    if rep is not None:
        stages = ",".join(str(s) for s in rep.stages) or "-"
        assignment = f"v{rep.plan_version} {rep.state} stages {stages}"
        if rep.error:
            assignment += f" ({rep.error[:60]})"
    elif state.desired is not None:
        assignment = f"v{state.desired.plan_version} desired"
    else:
        assignment = ""
    rtt = info.link_rtt_s if info and info.link_rtt_s > 0 else None
    bandwidth = info.link_bandwidth_bps if info and info.link_bandwidth_bps > 0 else None
    return {
        "agent": state.agent_id,
        "online": state.online,
        "profile": info.profile if info else "",
        "cpu_percent": tel.cpu_percent if tel else None,
        "mem_percent": tel.mem_percent if tel else None,
        "temperature_c": tel.temperature_c if tel else None,
        "gflops": round(info.gflops, 2) if info else None,
        "rtt_ms": None if rtt is None else round(rtt * 1e3, 2),
        "link_mb_s": None if bandwidth is None else round(bandwidth / 1e6, 2),
        "load": round(state.load(now), 3) if tel else None,
        "assignment": assignment,
        "queue_depth": tel.queue_depth if tel else 0,
        "last_telemetry": state.telemetry_at,
        "session": state.session,
        "seconds_since_telemetry": round(now - state.telemetry_at, 1) if tel else None,
    }


def measured_timing(state: AgentState | None, stage: PlanStage) -> dict[str, float] | None:
    """The agent's reported timings of ``stage`` (by artifact sha; by stage index when the
    plan names no artifact), or None when it reported none."""
    if state is None or state.telemetry is None:
        return None
    timings = state.telemetry.stage_timings
    if stage.artifact:
        return timings.get(stage.artifact)
    return next((t for t in timings.values() if int(t.get("stage", -1)) == stage.stage), None)


def stage_rows(plan: PlanMessage, fleet: FleetState) -> list[dict[str, Any]]:
    """One row per (stage, agent): the plan's predictions and what the agent measured (ms).

    Predictions are the primary's (the first agent); a replica's row shows only its measured
    figures. ``measured_compute_ms`` is the agent's mean of requests run alone, or of batched
    runs per request when it only ran batches (``batched`` says which).
    """
    rows = []
    for stage in plan.stages:
        for k, agent in enumerate(stage.agents):
            timing = measured_timing(fleet.agents.get(agent), stage) or {}
            alone, batched = int(timing.get("count", 0)), int(timing.get("batched", 0))
            compute = timing.get("compute_s") if alone else timing.get("batched_compute_s")
            measured = None if not (alone or batched) or compute is None else compute * 1e3
            predicted = stage.predicted_compute_s * 1e3 if k == 0 else None
            ratio = measured / predicted if measured is not None and predicted else None
            rows.append(
                {
                    "stage": stage.stage,
                    "segments": f"{stage.start_segment}-{stage.end_segment}",
                    "agent": agent,
                    "replica": k > 0,
                    "predicted_compute_ms": predicted,
                    "predicted_transfer_ms": stage.predicted_transfer_s * 1e3 if k == 0 else None,
                    "measured_compute_ms": measured,
                    "measured_over_predicted": ratio,
                    "queue_ms": timing["queue_s"] * 1e3 if "queue_s" in timing else None,
                    "runs": alone + batched,
                    "batched": not alone and batched > 0,
                }
            )
    return rows


def plan_summary(plan: PlanMessage) -> str:
    """``plan MODEL vN (ready): [0] 0-4 on a  [1] 4-9 on b,c`` (or why it was withdrawn)."""
    if not plan.stages:
        return f"plan {plan.model} v{plan.plan_version} withdrawn: {plan.reason}"
    stages = "  ".join(
        f"[{s.stage}] {s.start_segment}-{s.end_segment} on {','.join(s.agents)}"
        for s in plan.stages
    )
    state = "ready" if plan.ready else "loading"
    return f"plan {plan.model} v{plan.plan_version} ({state}): {stages}"


def plan_prediction(plan: PlanMessage) -> str:
    """The plan's predicted figures in one line."""
    period = plan.predicted_period_s
    rate = f", {1.0 / period:.1f} req/s" if period > 0 else ""
    return (
        f"  {plan.objective} plan ({plan.strategy}), predicted: latency "
        f"{plan.predicted_latency_s * 1e3:.1f} ms, period {period * 1e3:.1f} ms{rate}"
    )


AGENT_HEADER = (
    f"{'AGENT':<16} {'STATE':<8} {'PROFILE':<17} {'CPU%':>5} {'MEM%':>5} {'TEMP':>5} "
    f"{'GFLOP/s':>8} {'RTT ms':>7} {'MB/s':>7} {'LOAD':>5} {'QUEUE':>5} {'LAST':>6}  ASSIGNMENT"
)
STAGE_HEADER = (
    f"  {'STAGE':>5} {'SEGMENTS':>8}  {'AGENT':<28} {'PRED ms':>8} {'XFER ms':>8} "
    f"{'MEAS ms':>8} {'MEAS/PRED':>9} {'QUEUE ms':>8} {'RUNS':>6}"
)


def render(fleet: FleetState, now: float) -> str:
    """The plain view: a line per agent, then per plan its summary, prediction and stages."""
    lines = [AGENT_HEADER]
    for state in sorted(fleet.agents.values(), key=lambda s: s.agent_id):
        row = agent_row(state, now)
        age = f"{row['seconds_since_telemetry']:5.1f}s" if row["last_telemetry"] else "    -"
        lines.append(
            f"{state.agent_id[:16]:<16} {'online' if state.online else 'OFFLINE':<8} "
            f"{row['profile'][:17]:<17} {_num(row['cpu_percent']):>5} "
            f"{_num(row['mem_percent']):>5} {_num(row['temperature_c']):>5} "
            f"{_num(row['gflops']):>8} {_num(row['rtt_ms'], 2):>7} {_num(row['link_mb_s']):>7} "
            f"{_num(row['load'], 2):>5} {row['queue_depth']:>5} {age:>6}  {row['assignment']}"
        )
    for plan in fleet.plans.values():
        lines.append(plan_summary(plan))
        if plan.stages:
            lines.append(plan_prediction(plan))
            lines.append(STAGE_HEADER)
            lines.extend(_stage_line(row) for row in stage_rows(plan, fleet))
    if not fleet.agents:
        lines.append(NO_AGENTS)
    return "\n".join(lines)


def _stage_line(row: dict[str, Any]) -> str:
    agent = row["agent"] + (" (replica)" if row["replica"] else "")
    measured = _num(row["measured_compute_ms"]) + ("b" if row["batched"] else "")
    return (
        f"  {row['stage']:>5} {row['segments']:>8}  {agent[:28]:<28} "
        f"{_num(row['predicted_compute_ms']):>8} {_num(row['predicted_transfer_ms']):>8} "
        f"{measured:>8} {_num(row['measured_over_predicted'], 2):>9} "
        f"{_num(row['queue_ms']):>8} {row['runs']:>6}"
    )


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rich_view(fleet: FleetState, now: float) -> Any:
    """The same rows as :func:`render`, as a ``rich`` renderable (agents, then each plan)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    agents = Table(title="agents", title_justify="left", expand=False, show_edge=False)
    for name, justify in (
        ("agent", "left"),
        ("state", "left"),
        ("profile", "left"),
        ("CPU%", "right"),
        ("MEM%", "right"),
        ("temp", "right"),
        ("GFLOP/s", "right"),
        ("RTT ms", "right"),
        ("link MB/s", "right"),
        ("load", "right"),
        ("queue", "right"),
        ("last", "right"),
        ("assignment", "left"),
    ):
        agents.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for state in sorted(fleet.agents.values(), key=lambda s: s.agent_id):
        row = agent_row(state, now)
        age = f"{row['seconds_since_telemetry']:.1f}s" if row["last_telemetry"] else "-"
        online = Text("online", style="green") if state.online else Text("OFFLINE", style="red")
        agents.add_row(
            state.agent_id,
            online,
            row["profile"],
            _num(row["cpu_percent"]),
            _num(row["mem_percent"]),
            _num(row["temperature_c"]),
            _num(row["gflops"]),
            _num(row["rtt_ms"], 2),
            _num(row["link_mb_s"]),
            _num(row["load"], 2),
            str(row["queue_depth"]),
            age,
            row["assignment"],
        )
    parts: list[Any] = [agents if fleet.agents else Text(NO_AGENTS)]
    for plan in fleet.plans.values():
        parts.append(Text(plan_summary(plan), style="bold"))
        if not plan.stages:
            continue
        parts.append(Text(plan_prediction(plan).strip()))
        stages = Table(show_edge=False)
        for name in ("stage", "segments", "agent", "pred ms", "xfer ms", "meas ms"):
            stages.add_column(name, justify="left" if name == "agent" else "right")
        for name in ("meas/pred", "queue ms", "runs"):
            stages.add_column(name, justify="right")
        for row in stage_rows(plan, fleet):
            ratio = row["measured_over_predicted"]
            style = "" if ratio is None or 0.67 <= ratio <= 1.5 else "yellow"
            stages.add_row(
                str(row["stage"]),
                row["segments"],
                row["agent"] + (" (replica)" if row["replica"] else ""),
                _num(row["predicted_compute_ms"]),
                _num(row["predicted_transfer_ms"]),
                _num(row["measured_compute_ms"]) + ("b" if row["batched"] else ""),
                Text(_num(ratio, 2), style=style),
                _num(row["queue_ms"]),
                str(row["runs"]),
            )
        parts.append(stages)
    return Group(*parts)
