"""Live fleet view and raw topic decoding for ``edgeslice monitor`` (no torch, read-only).

Two modes. The fleet view folds status/info/telemetry/assignment messages into one row
per agent (:class:`~edgeslice.broker.fleetstate.FleetState`, pure) and redraws a table
in place on a terminal, or prints one JSON object per agent change with ``--json``.
``--raw [FILTER]`` prints every message under the namespace, and nothing else: topic,
size and the msgpack payload as JSON (binary fields summarised), or one JSON object per
line with ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

import click

from edgeslice.broker.fleetstate import AgentState, FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import EdgesliceError, ProtocolError
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import BrokerSettings, connection_options
from edgeslice.broker.transport import TransportFactory, mqtt_transport


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
    return {
        "agent": state.agent_id,
        "online": state.online,
        "profile": info.profile if info else "",
        "cpu_percent": tel.cpu_percent if tel else None,
        "mem_percent": tel.mem_percent if tel else None,
        "temperature_c": tel.temperature_c if tel else None,
        "gflops": round(info.gflops, 2) if info else None,
        "load": round(state.load(now), 3) if tel else None,
        "assignment": assignment,
        "queue_depth": tel.queue_depth if tel else 0,
        "last_telemetry": state.telemetry_at,
        "session": state.session,
        "seconds_since_telemetry": round(now - state.telemetry_at, 1) if tel else None,
    }


def render(fleet: FleetState, now: float) -> str:
    """The live table: one line per agent, then one per plan."""
    header = f"{'AGENT':<16} {'STATE':<8} {'PROFILE':<17} {'CPU%':>5} {'MEM%':>5} "
    header += f"{'TEMP':>5} {'GFLOP/s':>8} {'LOAD':>5} {'QUEUE':>5} {'LAST':>6}  ASSIGNMENT"
    lines = [header]
    for state in sorted(fleet.agents.values(), key=lambda s: s.agent_id):
        row = agent_row(state, now)
        age = f"{row['seconds_since_telemetry']:5.1f}s" if row["last_telemetry"] else "    -"
        lines.append(
            f"{state.agent_id[:16]:<16} {'online' if state.online else 'OFFLINE':<8} "
            f"{row['profile'][:17]:<17} {_num(row['cpu_percent']):>5} "
            f"{_num(row['mem_percent']):>5} {_num(row['temperature_c']):>5} "
            f"{_num(row['gflops']):>8} {_num(row['load']):>5} {row['queue_depth']:>5} "
            f"{age:>6}  {row['assignment']}"
        )
    for plan in fleet.plans.values():
        stages = "  ".join(
            f"[{s.stage}] {s.start_segment}-{s.end_segment} on {','.join(s.agents)}"
            for s in plan.stages
        )
        ready = "ready" if plan.ready else "loading"
        lines.append(f"plan {plan.model} v{plan.plan_version} ({ready}): {stages}")
    if not fleet.agents:
        lines.append("(no agents yet: start one with `edgeslice agent --broker ...`)")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def decode_any(payload: bytes) -> Any:
    """Best-effort JSON-able view of a payload: msgpack decoded, binary fields summarised."""
    try:
        obj = codec.unpackb(payload, max_bytes=max(len(payload), 1))
    except ProtocolError:
        return {"_undecodable": f"{len(payload)} bytes", "_hex": payload[:32].hex()}
    return _summarise(obj)


def _summarise(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray | memoryview):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, dict):
        return {str(k): _summarise(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_summarise(v) for v in obj]
    return obj


def raw_filter(topics: Topics, text: str | None) -> str:
    """A user filter relative to the namespace (``agents/+/telemetry``) or absolute."""
    if not text or text == "#":
        return topics.all_topics()
    if text.startswith(topics.namespace + "/"):
        return text
    return f"{topics.root}/{text.lstrip('/')}"


async def run_monitor(
    settings: BrokerSettings,
    raw: bool,
    topic_filter: str | None,
    as_json: bool,
    duration: float | None,
    out: TextIO = sys.stdout,
    transport: TransportFactory | None = None,
) -> None:
    """Subscribe and print until ``duration`` (seconds) passes or the task is cancelled.

    ``transport`` opens the connection (default: an MqttClient to ``settings``' broker).
    """
    topics = Topics(settings.namespace)
    connect = transport or mqtt_transport(settings)
    client = connect(f"monitor-{int(time.time() * 1000) % 10**9}")
    await client.connect()
    try:
        if raw:
            await client.subscribe(raw_filter(topics, topic_filter), qos=0)
        else:
            for suffix in ("status", "info", "telemetry", "assignment/reported"):
                await client.subscribe(topics.all_agents(suffix), qos=0)
            await client.subscribe(topics.all_plans(), qos=0)
        view = FleetState(topics)
        deadline = None if duration is None else time.monotonic() + duration
        last_draw = 0.0
        tty = out.isatty() and not as_json
        while deadline is None or time.monotonic() < deadline:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = await client.next_message(timeout=min(remaining or 1.0, 1.0))
            now = time.time()
            if raw:  # raw mode prints the messages and nothing else
                if msg is not None:
                    _print_raw(out, msg.topic, msg.payload, msg.retain, as_json)
                continue
            if msg is not None:
                try:
                    changed = view.apply(msg.topic, msg.payload, now)
                except EdgesliceError as exc:
                    print(f"# skipped {msg.topic}: {exc}", file=sys.stderr)
                    continue
                if as_json and changed is not None:
                    out.write(json.dumps(agent_row(view.agents[changed], now)) + "\n")
                    out.flush()
            if not as_json and (now - last_draw >= 1.0 or msg is None):
                last_draw = now
                text = render(view, now)
                out.write(("\x1b[H\x1b[2J" + text + "\n") if tty else text + "\n\n")
                out.flush()
    finally:
        await client.close()


def _print_raw(out: TextIO, topic: str, payload: bytes, retain: bool, as_json: bool) -> None:
    decoded = decode_any(payload)
    if as_json:
        line = {"topic": topic, "size": len(payload), "retain": retain, "payload": decoded}
        out.write(json.dumps(line, default=str) + "\n")
    else:
        flag = " (retained)" if retain else ""
        out.write(f"{topic}  {len(payload)} B{flag}\n  {json.dumps(decoded, default=str)}\n")
    out.flush()


@click.command(name="monitor")
@connection_options
@click.option("--raw", is_flag=True, help="Print every message (topic, size, decoded payload).")
@click.argument("topic_filter", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line, for piping.")
@click.option(
    "--duration",
    type=float,
    default=None,
    help="Stop after this many seconds (default: until Ctrl-C).",
)
def monitor_cmd(
    settings: BrokerSettings,
    raw: bool,
    topic_filter: str | None,
    as_json: bool,
    duration: float | None,
) -> None:
    """Watch the fleet live, or decode raw traffic.

    Without --raw: one row per agent (online/offline, profile, CPU, memory,
    temperature, GFLOP/s, queue, seconds since its last telemetry, assignment),
    redrawn in place; with --json one JSON object per agent change. With --raw
    [FILTER]: every message under the namespace, FILTER relative to it, e.g.
    `edgeslice monitor --raw 'agents/+/telemetry'`.
    """
    if topic_filter and not raw:
        raise click.UsageError("a TOPIC_FILTER needs --raw")
    try:
        asyncio.run(run_monitor(settings, raw, topic_filter, as_json, duration))
    except KeyboardInterrupt:
        pass
    except EdgesliceError as exc:
        raise click.ClickException(str(exc)) from None
