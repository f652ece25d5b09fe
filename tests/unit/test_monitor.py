"""The monitor: rows, stage timings, plain and rich views over FleetState; the view choice and
``--json`` over the memory broker."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
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
from edgeslice.client.monitor import agent_row, choose_view, render, run_monitor
from edgeslice.client.monitorview import AGENT_HEADER, rich_view, stage_rows

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


def _timed_fleet() -> FleetState:
    """Two stages, the second replicated; agents measured their link and their stages."""
    fleet = FleetState(T)
    for agent, rtt, bps in (("a", 0.004, 12.5e6), ("b", 0.010, 2.0e6), ("c", 0.0, 0.0)):
        fleet.apply(T.status(agent), codec.encode(Status(agent, ONLINE, session=1)), 0.0)
        info = Info(agent, "rpi4-4gb", gflops=5.0, link_rtt_s=rtt, link_bandwidth_bps=bps)
        fleet.apply(T.info(agent), codec.encode(info), 0.0)
    stages = [
        PlanStage(0, 0, 3, ["a"], "sha0", predicted_compute_s=0.010, predicted_transfer_s=0.002),
        PlanStage(1, 3, 9, ["b", "c"], "sha1", predicted_compute_s=0.020),
    ]
    plan = PlanMessage(
        "mlp", "p", 3, "throughput", "edgeslice", stages, predicted_latency_s=0.05,
        predicted_period_s=0.025, ready=True,
    )  # fmt: skip
    fleet.apply(T.plan("mlp"), codec.encode(plan), 0.0)
    timings = {
        "a": {"sha0": {"stage": 0, "count": 40, "compute_s": 0.012, "queue_s": 0.001}},
        # b ran only batches; an artifact of an older plan is not this plan's stage 1
        "b": {
            "sha1": {"stage": 1, "count": 0, "batched": 8, "batched_compute_s": 0.030},
            "old": {"stage": 1, "count": 99, "compute_s": 9.0},
        },
    }
    for agent, stage_timings in timings.items():
        tel = Telemetry(agent, ts=0.0, cpu_percent=10.0, stage_timings=stage_timings)
        fleet.apply(T.telemetry(agent), codec.encode(tel), 1.0)
    return fleet


def test_rows_carry_each_agents_link_figures() -> None:
    fleet = _timed_fleet()
    a, c = agent_row(fleet.agents["a"], 2.0), agent_row(fleet.agents["c"], 2.0)
    assert (a["rtt_ms"], a["link_mb_s"]) == (4.0, 12.5)
    assert (c["rtt_ms"], c["link_mb_s"]) == (None, None)  # not measured: shown as "-"
    line = next(x for x in render(fleet, 2.0).splitlines() if x.startswith("a "))
    assert "4.00" in line.split() and "12.5" in line.split()


def test_stage_rows_compare_predicted_and_measured() -> None:
    rows = stage_rows(_timed_fleet().plans["mlp"], _timed_fleet())
    assert [(r["stage"], r["agent"], r["replica"]) for r in rows] == [
        (0, "a", False),
        (1, "b", False),
        (1, "c", True),
    ]
    a, b, c = rows
    assert a["predicted_compute_ms"] == 10.0 and a["predicted_transfer_ms"] == 2.0
    assert a["measured_compute_ms"] == 12.0 and a["runs"] == 40 and a["queue_ms"] == 1.0
    assert round(a["measured_over_predicted"], 2) == 1.2
    assert b["measured_compute_ms"] == 30.0 and b["batched"] and b["runs"] == 8
    assert c["predicted_compute_ms"] is None and c["measured_compute_ms"] is None


def test_render_shows_the_plan_prediction_and_stage_table() -> None:
    lines = render(_timed_fleet(), 2.0).splitlines()
    at = lines.index("plan mlp v3 (ready): [0] 0-3 on a  [1] 3-9 on b,c")
    assert "latency 50.0 ms, period 25.0 ms, 40.0 req/s" in lines[at + 1]
    assert lines[at + 2].split()[:3] == ["STAGE", "SEGMENTS", "AGENT"]
    assert lines[at + 3].split() == ["0", "0-3", "a", "10.0", "2.0", "12.0", "1.20", "1.0", "40"]
    assert lines[at + 4].split()[:6] == ["1", "3-9", "b", "20.0", "0.0", "30.0b"]
    assert lines[at + 5].split()[:4] == ["1", "3-9", "c", "(replica)"]


def test_rich_view_holds_the_same_figures() -> None:
    Console = pytest.importorskip("rich.console").Console

    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(rich_view(_timed_fleet(), 2.0))
    text = buffer.getvalue()
    assert "link MB/s" in text and "12.5" in text and "4.00" in text
    assert "plan mlp v3 (ready)" in text and "30.0b" in text and "1.20" in text


def test_view_choice() -> None:
    assert choose_view(is_tty=False, plain=False, has_rich=True) == "plain"
    assert choose_view(is_tty=True, plain=True, has_rich=True) == "plain"
    assert choose_view(is_tty=True, plain=False, has_rich=True) == "rich"
    assert choose_view(is_tty=True, plain=False, has_rich=False) == "redraw"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _monitor_output(out: io.StringIO, plain: bool = False) -> str:
    async def scenario() -> None:
        broker = MemoryBroker()
        agent = broker.client("agent-pi-1")
        await agent.connect()
        await agent.publish(T.status("pi-1"), codec.encode(Status("pi-1", ONLINE, 4)), retain=True)
        info = Info("pi-1", "rpi4-4gb", gflops=2.0, session=4, link_rtt_s=0.003)
        await agent.publish(T.info("pi-1"), codec.encode(info), retain=True)
        await run_monitor(SETTINGS, False, None, False, 0.3, out, broker.factory, plain=plain)

    asyncio.run(scenario())
    return out.getvalue()


def test_not_a_terminal_gets_plain_blocks() -> None:
    text = _monitor_output(io.StringIO())
    assert "\x1b" not in text  # no cursor movement or colour in a pipe or a file
    block = text.split("\n\n")[-2].splitlines()
    assert block[0] == AGENT_HEADER and block[1].startswith("pi-1") and "3.00" in block[1]


def test_terminal_gets_the_live_view_unless_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes itself to the terminal
    live = _monitor_output(_Terminal())
    assert "link MB/s" in live and "pi-1" in live  # rich's table, not the plain header
    assert AGENT_HEADER not in live
    assert AGENT_HEADER in _monitor_output(_Terminal(), plain=True)
