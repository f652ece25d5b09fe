"""The monitor: rows and the table over FleetState, and ``--json`` over the memory broker."""

from __future__ import annotations

import asyncio
import io
import json

from memfleet import SETTINGS

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    ONLINE,
    AssignmentReported,
    Info,
    PlanMessage,
    PlanStage,
    Status,
    Telemetry,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.client.monitor import agent_row, render, run_monitor

T = Topics("unit")


def _fleet() -> FleetState:
    fleet = FleetState(T)
    fleet.apply(T.status("pi-1"), codec.encode(Status("pi-1", ONLINE, session=4)), 0.0)
    fleet.apply(T.info("pi-1"), codec.encode(Info("pi-1", "rpi4-4gb", gflops=3.14159)), 0.0)
    tel = Telemetry("pi-1", ts=0.0, cpu_percent=80.0, mem_percent=40.0, busy=0.5, queue_depth=2)
    fleet.apply(T.telemetry("pi-1"), codec.encode(tel), 10.0)
    report = AssignmentReported("pi-1", "p", 2, "ready", stages=[0, 1])
    fleet.apply(T.assignment_reported("pi-1"), codec.encode(report), 10.0)
    plan = PlanMessage("mlp", "p", 2, "latency", "edgeslice", [PlanStage(0, 0, 4, ["pi-1"])])
    fleet.apply(T.plan("mlp"), codec.encode(plan), 10.0)
    return fleet


def test_agent_row_says_what_the_agent_does() -> None:
    row = agent_row(_fleet().agents["pi-1"], now=12.0)
    assert row["online"] and row["profile"] == "rpi4-4gb" and row["gflops"] == 3.14
    assert row["load"] == 0.5 and row["cpu_percent"] == 80.0  # load is busy, not CPU
    assert row["assignment"] == "v2 ready stages 0,1"
    assert row["queue_depth"] == 2 and row["seconds_since_telemetry"] == 2.0
    assert row["session"] == 4


def test_render_has_a_line_per_agent_and_per_plan() -> None:
    text = render(_fleet(), now=12.0)
    lines = text.splitlines()
    assert lines[0].startswith("AGENT") and "ASSIGNMENT" in lines[0]
    assert lines[1].startswith("pi-1") and "online" in lines[1] and "v2 ready" in lines[1]
    assert lines[2] == "plan mlp v2 (loading): [0] 0-4 on pi-1"
    assert "no agents yet" in render(FleetState(T), now=0.0)


def test_json_rows_over_the_memory_transport() -> None:
    async def scenario() -> str:
        broker = MemoryBroker()
        agent = broker.client("agent-pi-1")
        await agent.connect()
        await agent.publish(T.status("pi-1"), codec.encode(Status("pi-1", ONLINE, 4)), retain=True)
        out = io.StringIO()
        monitor = asyncio.create_task(
            run_monitor(SETTINGS, False, None, True, 0.5, out=out, transport=broker.factory)
        )
        await asyncio.sleep(0.1)
        info = Info("pi-1", "rpi4-4gb", gflops=2.0, session=4)
        await agent.publish(T.info("pi-1"), codec.encode(info), retain=True)
        await agent.publish(T.info("elsewhere"), b"\xc1 garbage")  # skipped, not fatal
        await monitor
        return out.getvalue()

    rows = [json.loads(line) for line in asyncio.run(scenario()).splitlines()]
    assert [(r["agent"], r["online"], r["profile"]) for r in rows] == [
        ("pi-1", True, ""),
        ("pi-1", True, "rpi4-4gb"),
    ]


def test_raw_mode_prints_decoded_payloads() -> None:
    async def scenario() -> str:
        broker = MemoryBroker()
        agent = broker.client("a")
        await agent.connect()
        await agent.publish(T.status("pi-1"), codec.encode(Status("pi-1", ONLINE, 4)), retain=True)
        out = io.StringIO()
        await run_monitor(SETTINGS, True, "agents/+/status", True, 0.2, out, broker.factory)
        return out.getvalue()

    (line,) = asyncio.run(scenario()).splitlines()
    row = json.loads(line)
    assert row["topic"] == T.status("pi-1") and row["retain"] is True
    assert row["payload"]["state"] == "online" and row["payload"]["k"] == "status"
