"""Live fleet view and raw topic decoding for ``edgeslice monitor`` (no torch, read-only).

Two modes. The fleet view folds status/info/telemetry/assignment messages into one row
per agent (:class:`FleetView`, pure) and redraws a table in place on a terminal, or
prints one JSON object per agent change with ``--json``. ``--raw [FILTER]`` prints
every message under the namespace: topic, size and the msgpack payload as JSON
(binary fields summarised), or one JSON object per line with ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import click

from broker.client import MqttClient
from broker.protocol import codec
from broker.protocol.errors import EdgesliceError, ProtocolError
from broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    Info,
    PlanMessage,
    Status,
    Telemetry,
)
from broker.protocol.topics import Kind, Topics
from broker.settings import BrokerSettings, connection_options


@dataclass
class AgentRow:
    """Everything the monitor knows about one agent."""

    agent: str
    online: bool = False
    profile: str = ""
    cpu_percent: float | None = None
    mem_percent: float | None = None
    temperature_c: float | None = None
    gflops: float | None = None
    assignment: str = ""
    queue_depth: int = 0
    last_telemetry: float = 0.0
    session: int = 0

    def to_json(self, now: float) -> dict[str, Any]:
        row = asdict(self)
        row["seconds_since_telemetry"] = (
            round(now - self.last_telemetry, 1) if self.last_telemetry else None
        )
        return row


class FleetView:
    """Pure fold of control-plane messages into rows; ``apply`` returns the changed agent."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.agents: dict[str, AgentRow] = {}
        self.plans: dict[str, PlanMessage] = {}

    def apply(self, topic: str, payload: bytes, now: float) -> str | None:
        parsed = self.topics.parse(topic)
        if parsed.kind is Kind.PLAN and payload:
            plan = codec.decode(payload, PlanMessage)
            self.plans[plan.model] = plan
            return None
        if not parsed.agent_id or parsed.kind in (Kind.CLIENT_RESULTS,):
            return None
        if not payload:  # a cleared retained message
            return None
        row = self.agents.setdefault(parsed.agent_id, AgentRow(parsed.agent_id))
        if parsed.kind is Kind.STATUS:
            status = codec.decode(payload, Status)
            row.online = status.state == "online"
            row.session = status.session
        elif parsed.kind is Kind.INFO:
            info = codec.decode(payload, Info)
            row.profile = info.profile
            row.gflops = round(info.gflops, 2)
        elif parsed.kind is Kind.TELEMETRY:
            tel = codec.decode(payload, Telemetry)
            row.cpu_percent = tel.cpu_percent
            row.mem_percent = tel.mem_percent
            row.temperature_c = tel.temperature_c
            row.queue_depth = tel.queue_depth
            row.last_telemetry = now
        elif parsed.kind is Kind.ASSIGNMENT_REPORTED:
            rep = codec.decode(payload, AssignmentReported)
            stages = ",".join(str(s) for s in rep.stages) or "-"
            row.assignment = f"v{rep.plan_version} {rep.state} stages {stages}"
            if rep.error:
                row.assignment += f" ({rep.error[:60]})"
        elif parsed.kind is Kind.ASSIGNMENT_DESIRED:
            des = codec.decode(payload, AssignmentDesired)
            if not row.assignment:
                row.assignment = f"v{des.plan_version} desired"
        else:
            return None
        return parsed.agent_id

    def render(self, now: float) -> str:
        header = f"{'AGENT':<16} {'STATE':<8} {'PROFILE':<17} {'CPU%':>5} {'MEM%':>5} "
        header += f"{'TEMP':>5} {'GFLOP/s':>8} {'QUEUE':>5} {'LAST':>6}  ASSIGNMENT"
        lines = [header]
        for row in sorted(self.agents.values(), key=lambda r: r.agent):
            age = f"{now - row.last_telemetry:5.1f}s" if row.last_telemetry else "    -"
            lines.append(
                f"{row.agent[:16]:<16} {'online' if row.online else 'OFFLINE':<8} "
                f"{row.profile[:17]:<17} {_num(row.cpu_percent):>5} {_num(row.mem_percent):>5} "
                f"{_num(row.temperature_c):>5} {_num(row.gflops):>8} {row.queue_depth:>5} "
                f"{age:>6}  {row.assignment}"
            )
        for plan in self.plans.values():
            stages = "  ".join(
                f"[{s.stage}] {s.start_segment}-{s.end_segment} on {','.join(s.agents)}"
                for s in plan.stages
            )
            ready = "ready" if plan.ready else "loading"
            lines.append(f"plan {plan.model} v{plan.plan_version} ({ready}): {stages}")
        if not self.agents:
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
) -> None:
    """Subscribe and print until ``duration`` (seconds) passes or the task is cancelled."""
    topics = Topics(settings.namespace)
    client = MqttClient(settings, client_id=f"monitor-{int(time.time() * 1000) % 10**9}")
    await client.connect()
    try:
        if raw:
            await client.subscribe(raw_filter(topics, topic_filter), qos=0)
        else:
            for suffix in ("status", "info", "telemetry", "assignment/reported"):
                await client.subscribe(topics.all_agents(suffix), qos=0)
            await client.subscribe(topics.all_plans(), qos=0)
        view = FleetView(topics)
        deadline = None if duration is None else time.monotonic() + duration
        last_draw = 0.0
        tty = out.isatty() and not as_json
        while deadline is None or time.monotonic() < deadline:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            msg = await client.next_message(timeout=min(remaining or 1.0, 1.0))
            now = time.time()
            if msg is not None and raw:
                _print_raw(out, msg.topic, msg.payload, msg.retain, as_json)
                continue
            if msg is not None:
                try:
                    changed = view.apply(msg.topic, msg.payload, now)
                except EdgesliceError as exc:
                    print(f"# skipped {msg.topic}: {exc}", file=sys.stderr)
                    continue
                if as_json and changed is not None:
                    out.write(json.dumps(view.agents[changed].to_json(now)) + "\n")
                    out.flush()
            if not as_json and (now - last_draw >= 1.0 or msg is None):
                last_draw = now
                text = view.render(now)
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
