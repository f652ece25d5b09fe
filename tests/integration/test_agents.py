"""Agents against a real broker: presence in the monitor, last will, assignments, bad input."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import msgpack
import pytest

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    Command,
    CommandResult,
    Status,
    Telemetry,
)
from edgeslice.lab.fleet import AgentSpec

pytestmark = pytest.mark.integration

FAST = ("--calibrate-seconds", "0.1")


def _status(payload: bytes) -> Status:
    return codec.decode(payload, Status)


def test_three_agents_appear_in_monitor_json(fleet, broker, namespace) -> None:
    profiles = {"pi-1": "rpi4-4gb", "pi-2": "rpi3b", "nano-1": "jetson-nano"}
    for agent_id, profile in profiles.items():
        fleet.start_agent(AgentSpec(agent_id, profile, FAST))
    monitor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeslice.lab.cli",
            "monitor",
            "--json",
            "--duration",
            "60",
            "--broker",
            broker.url,
            "--namespace",
            namespace,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    latest: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 60
        assert monitor.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([monitor.stdout], [], [], 1.0)
            if not ready:
                continue
            line = monitor.stdout.readline()
            if not line:
                break
            row = json.loads(line)
            latest[row["agent"]] = row
            complete = [
                a
                for a, r in latest.items()
                if r["online"] and r["profile"] and r["cpu_percent"] is not None
            ]
            if set(complete) >= set(profiles):
                break
    finally:
        monitor.terminate()
        monitor.wait(10)
    assert set(latest) >= set(profiles), f"monitor saw {sorted(latest)}"
    for agent_id, profile in profiles.items():
        row = latest[agent_id]
        assert row["online"] is True
        assert row["profile"] == profile
        assert row["mem_percent"] is not None and row["mem_percent"] > 0
        assert row["gflops"] > 0
        assert row["seconds_since_telemetry"] is not None


def test_kill_9_turns_status_offline_through_last_will(fleet, topics, watcher_factory) -> None:
    watcher = watcher_factory([topics.status("pi-k")])
    fleet.start_agent(AgentSpec("pi-k", "rpi4-2gb", FAST))
    online = watcher.wait_for(lambda m: _status(m.payload).state == "online", what="online")
    session = _status(online.payload).session
    fleet.signal("pi-k", signal.SIGKILL)
    offline = watcher.wait_for(
        lambda m: _status(m.payload).state == "offline", after=online.at, what="last will"
    )
    status = _status(offline.payload)
    assert status.reason == "lost"  # the will, not a clean shutdown
    assert status.session == session


def test_sigterm_publishes_offline_and_exits_zero(fleet, topics, watcher_factory) -> None:
    watcher = watcher_factory([topics.status("pi-t")])
    fleet.start_agent(AgentSpec("pi-t", "rpi5-4gb", FAST))
    online = watcher.wait_for(lambda m: _status(m.payload).state == "online", what="online")
    assert fleet.stop("pi-t") == 0
    offline = watcher.wait_for(lambda m: _status(m.payload).state == "offline", after=online.at)
    assert _status(offline.payload).reason == "shutdown"


def test_desired_assignment_is_answered_by_a_reported_one(fleet, topics, watcher_factory) -> None:
    watcher = watcher_factory([topics.assignment_reported("pi-a"), topics.info("pi-a")])
    fleet.start_agent(AgentSpec("pi-a", "rpi4-4gb", FAST))
    watcher.wait_for(lambda m: m.topic == topics.info("pi-a"), what="info")
    desired = AssignmentDesired(agent_id="pi-a", plan_id="p1", plan_version=7, model="m", stages=[])
    watcher.publish(topics.assignment_desired("pi-a"), codec.encode(desired), retain=True)
    seen = watcher.wait_for(
        lambda m: m.topic == topics.assignment_reported("pi-a"), what="reported assignment"
    )
    report = codec.decode(seen.payload, AssignmentReported)
    assert (report.plan_id, report.plan_version, report.state) == ("p1", 7, "idle")
    # an assignment that cannot fit the agent's memory is refused with a reason, not ignored
    from edgeslice.broker.protocol.messages import StageAssignment

    huge = AssignmentDesired(
        agent_id="pi-a",
        plan_id="p1",
        plan_version=8,
        model="m",
        stages=[StageAssignment(stage=0, artifact="ab" * 32, size=64 * 2**30)],
    )
    watcher.publish(topics.assignment_desired("pi-a"), codec.encode(huge), retain=True)
    seen = watcher.wait_for(
        lambda m: (
            m.topic == topics.assignment_reported("pi-a")
            and codec.decode(m.payload, AssignmentReported).plan_version == 8
        ),
        what="refusal",
    )
    report = codec.decode(seen.payload, AssignmentReported)
    assert report.state == "error" and "memory budget" in report.error


def _garbage_payloads() -> list[bytes]:
    return [
        b"",
        b"\x00\xff not msgpack at all \xc1",
        os.urandom(300),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"k": "assignment_desired", "agent_id": 5, "plan_id": None}),
        msgpack.packb({"k": "command", "request_id": 1, "name": ["x"]}),
        msgpack.packb({"k": "status", "v": [99, 0], "agent_id": "pi-g", "state": "online"}),
        msgpack.packb({"t": "abc", "s": 0, "n": -1, "l": "x", "d": 5}),  # chunk-shaped nonsense
        msgpack.packb({"t": "abc", "s": 3, "d": b"x" * 10}),  # data chunk, header never comes
        msgpack.packb({"a": {"b": {"c": [None] * 50}}}),
    ]


def test_garbage_on_every_topic_leaves_agent_running(fleet, topics, watcher_factory) -> None:
    agent = "pi-g"
    watcher = watcher_factory(
        [
            topics.telemetry(agent),
            topics.info(agent),
            topics.cmd_result(agent, "ping"),
            topics.cmd_result(agent, "calibrate"),
        ]
    )
    fleet.start_agent(AgentSpec(agent, "rpi4-4gb", FAST))
    watcher.wait_for(lambda m: m.topic == topics.info(agent), what="info")
    listened = [
        topics.assignment_desired(agent),
        topics.cmd(agent, "ping"),
        topics.cmd(agent, "calibrate"),
        topics.cmd(agent, "bogus"),
        topics.inbox(agent, "fuzzer"),
        topics.probe(agent),
    ]
    for topic in listened:
        for payload in _garbage_payloads():
            watcher.publish(topic, payload)
    sent_at = time.time()
    # still alive, still publishing telemetry, still answering commands
    telemetry = watcher.wait_for(
        lambda m: m.topic == topics.telemetry(agent),
        after=sent_at + 0.5,
        what="telemetry after the garbage",
    )
    assert codec.decode(telemetry.payload, Telemetry).malformed_messages > 0
    request_id = uuid.uuid4().hex
    ping = Command(request_id=request_id, name="ping", args={"hello": 1})
    watcher.publish(topics.cmd(agent, "ping"), codec.encode(ping))
    reply = watcher.wait_for(
        lambda m: (
            m.topic == topics.cmd_result(agent, "ping")
            and codec.decode(m.payload, CommandResult).request_id == request_id
        ),
        what="pong",
    )
    result = codec.decode(reply.payload, CommandResult)
    assert result.ok and result.result["echo"] == {"hello": 1}
    calibrate = Command(request_id=uuid.uuid4().hex, name="calibrate", args={"seconds": 0.1})
    watcher.publish(topics.cmd(agent, "calibrate"), codec.encode(calibrate))
    reply = watcher.wait_for(
        lambda m: (
            m.topic == topics.cmd_result(agent, "calibrate")
            and codec.decode(m.payload, CommandResult).request_id == calibrate.request_id
        ),
        what="calibration result",
    )
    measured = codec.decode(reply.payload, CommandResult)
    assert measured.ok and measured.result["gflops"] > 0
    assert fleet.alive(agent), fleet.log_tail(agent)
    # the retained garbage on assignment/desired must not break a restart either
    watcher.publish(topics.assignment_desired(agent), b"\xc1\xc1", retain=True)
    assert fleet.stop(agent) == 0
    fleet.start_agent(AgentSpec(agent, "rpi4-4gb", FAST))
    restarted = time.time()
    watcher.wait_for(
        lambda m: m.topic == topics.telemetry(agent),
        after=restarted + 1,
        what="telemetry after restart",
    )
    assert fleet.alive(agent), fleet.log_tail(agent)
