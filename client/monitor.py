"""Live fleet view and raw topic decoding for ``edgeslice monitor`` (no torch, read-only).

Two modes. The fleet view folds status/info/telemetry/assignment/plan messages into one
:class:`~edgeslice.broker.fleetstate.FleetState` (pure) and draws it with
:mod:`edgeslice.client.monitorview`: agents with their link figures, the current plan
with predicted vs measured stage timings. On a terminal it is a ``rich`` live view when
``rich`` is installed (the ``monitor`` extra), else a table redrawn in place; anywhere
else (a pipe, a file, ``--plain``) plain blocks of lines, one block a second; ``--json``
prints one JSON object per agent change.
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

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import EdgesliceError, ProtocolError
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import BrokerSettings, connection_options
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.client.monitorview import agent_row, render, rich_available, rich_view

__all__ = ["agent_row", "choose_view", "render", "run_monitor"]

PLAIN, REDRAW, RICH = "plain", "redraw", "rich"


def choose_view(is_tty: bool, plain: bool, has_rich: bool) -> str:
    """How the fleet view draws: ``rich`` live view, ANSI ``redraw`` or ``plain`` blocks."""
    if plain or not is_tty:
        return PLAIN
    return RICH if has_rich else REDRAW


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


class Screen:
    """Draws the fleet view in one of :func:`choose_view`'s modes on ``out``."""

    def __init__(self, out: TextIO, mode: str) -> None:
        self.out, self.mode = out, mode
        self.live: Any = None
        if mode == RICH:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=out), auto_refresh=False, transient=False)
            self.live.start()

    def draw(self, fleet: FleetState, now: float) -> None:
        if self.live is not None:
            self.live.update(rich_view(fleet, now), refresh=True)
            return
        text = render(fleet, now)
        self.out.write(("\x1b[H\x1b[2J" + text + "\n") if self.mode == REDRAW else text + "\n\n")
        self.out.flush()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


async def run_monitor(
    settings: BrokerSettings,
    raw: bool,
    topic_filter: str | None,
    as_json: bool,
    duration: float | None,
    out: TextIO = sys.stdout,
    transport: TransportFactory | None = None,
    *,
    plain: bool = False,
) -> None:
    """Subscribe and print until ``duration`` (seconds) passes or the task is cancelled.

    ``transport`` opens the connection (default: an MqttClient to ``settings``' broker);
    ``plain`` draws plain blocks of lines even on a terminal.
    """
    topics = Topics(settings.namespace)
    connect = transport or mqtt_transport(settings)
    client = connect(f"monitor-{int(time.time() * 1000) % 10**9}")
    await client.connect()
    screen = None
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
        if not raw and not as_json:
            screen = Screen(out, choose_view(out.isatty(), plain, rich_available()))
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
            if screen is not None and (now - last_draw >= 1.0 or msg is None):
                last_draw = now
                screen.draw(view, now)
    finally:
        if screen is not None:
            screen.close()
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
    "--plain",
    is_flag=True,
    help="Plain lines, a block a second, even on a terminal (the default when piped).",
)
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
    plain: bool,
    duration: float | None,
) -> None:
    """Watch the fleet live, or decode raw traffic.

    Without --raw: one row per agent (online/offline, profile, CPU, memory,
    temperature, GFLOP/s, link round trip and MB/s, stage-worker load, queue,
    seconds since its last telemetry, assignment), then the current plan: its
    predicted latency and period, and per stage and agent the predicted compute
    and transfer next to the compute and queue time the agent measured. On a
    terminal a live view (rich tables with `pip install 'edgeslice[monitor]'`),
    piped or with --plain a block of plain lines a second; with --json one JSON
    object per agent change. With --raw [FILTER]: every message under the
    namespace, FILTER relative to it, e.g.
    `edgeslice monitor --raw 'agents/+/telemetry'`.
    """
    if topic_filter and not raw:
        raise click.UsageError("a TOPIC_FILTER needs --raw")
    if (raw or as_json) and plain:
        raise click.UsageError("--plain is for the fleet view; --raw and --json print lines")
    try:
        asyncio.run(run_monitor(settings, raw, topic_filter, as_json, duration, plain=plain))
    except KeyboardInterrupt:
        pass
    except EdgesliceError as exc:
        raise click.ClickException(str(exc)) from None
