"""Faults on the agent side with real processes: SIGTERM under load, kill -9 and restart, a
broker restarted without persistence. A real broker, a real planner, three real agents and
an InferenceClient in the test keeping 4 requests in flight on a small seeded CNN.

Every test prints what it measured (requests sent / completed / failed / lost, drain time,
completions per restart window, recovery time); assertions are about outcomes (nothing
failed or lost, exit codes, retained state back), never about how fast.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import Watcher

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import RequestTimeout
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    Info,
    PlanMessage,
    Status,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.server import LocalBroker
from edgeslice.planner.modelspec import load_model

pytestmark = pytest.mark.integration

AGENTS = ("f1", "f2", "f3")
AGENT_FLAGS = ("--calibrate-seconds", "0.1", "--drain-timeout", "10")
PLANNER_FLAGS = ("--min-agents", "3", "--replan-delay", "0.5", "--objective", "throughput")
IN_FLIGHT = 4

SMALL_CNN = '''
"""A small seeded CNN for the fault tests: cheap to profile, cut, load and run."""
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()
    return model, (torch.randn(1, 3, 32, 32),)
'''


@pytest.fixture
def small_cnn(tmp_path: Path) -> str:
    path = tmp_path / "small_cnn.py"
    path.write_text(SMALL_CNN)
    return f"{path}:build"


@dataclass
class Load:
    """Keeps ``IN_FLIGHT`` requests in flight until stopped; counts what became of them."""

    client: InferenceClient
    model: torch.nn.Module
    sent: int = 0
    completed: int = 0
    failed: int = 0  # an error came back (after the client's retries)
    lost: int = 0  # no answer before the request's deadline
    wrong: int = 0  # an answer that is not the model's output
    resent: int = 0  # completed requests that needed more than one send
    done_at: list[float] = field(default_factory=list)
    routes: list[tuple[float, list[str]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(IN_FLIGHT)))

    async def _worker(self) -> None:
        while not self.stop.is_set():
            x = torch.randn(1, 3, 32, 32)
            self.sent += 1
            try:
                result = await self.client.infer(x, timeout=60.0)
            except RequestTimeout as exc:
                self.lost += 1
                self.errors.append(f"lost: {exc}")
                continue
            except Exception as exc:
                self.failed += 1
                self.errors.append(f"failed: {type(exc).__name__}: {exc}")
                continue
            with torch.no_grad():
                expected = self.model(x)
            if not torch.allclose(result.outputs[0], expected, rtol=1e-4, atol=1e-4):
                self.wrong += 1
            self.completed += 1
            self.resent += result.attempts > 1
            now = time.time()
            self.done_at.append(now)
            self.routes.append((now, list(result.route)))

    def since(self, t: float) -> int:
        return sum(1 for at in self.done_at if at >= t)

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; {self.summary()}"
            await asyncio.sleep(0.05)

    def summary(self) -> str:
        return (
            f"sent={self.sent} completed={self.completed} failed={self.failed} "
            f"lost={self.lost} wrong={self.wrong} resent={self.resent}"
        )


def _start(fleet: LocalFleet, spec: str) -> None:
    for agent_id in AGENTS:
        fleet.start_agent(AgentSpec(agent_id, "x86-laptop", AGENT_FLAGS))
    fleet.start_planner(spec, list(PLANNER_FLAGS))


def _agents_of(plan: PlanMessage | None) -> set[str]:
    return {a for s in plan.stages for a in s.agents} if plan is not None else set()


def _status(payload: bytes) -> Status:
    return codec.decode(payload, Status)


def _logs(fleet: LocalFleet) -> str:
    return "\n".join(f"--- {a} ---\n{fleet.log_tail(a, 15)}" for a in (*AGENTS, "planner"))


def test_sigterm_under_load_drains_without_losing_a_request(
    fleet: LocalFleet, topics: Topics, watcher_factory: Callable[[list[str]], Watcher], small_cnn
) -> None:
    loaded = load_model(small_cnn)
    watcher = watcher_factory([topics.status(a) for a in AGENTS])
    _start(fleet, small_cnn)
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)

    async def scenario() -> tuple[Load, str, int | None, float, float]:
        async with InferenceClient(settings, loaded.name) as client:
            plan = await client.wait_ready(180)
            load = Load(client, loaded.module)
            running = asyncio.ensure_future(load.run())
            try:
                await load.until(lambda: load.completed >= 40, 120, "40 requests before")
                victim = sorted(_agents_of(client.plan or plan))[0]
                signalled = time.time()
                fleet.signal(victim, signal.SIGTERM)
                code = await asyncio.to_thread(fleet.procs[victim].wait, 60.0)
                exited = time.time()
                await load.until(lambda: load.since(exited) >= 40, 120, "40 requests after")
            finally:
                load.stop.set()
                await asyncio.wait_for(running, 120)
            return load, victim, code, signalled, exited

    load, victim, code, signalled, exited = asyncio.run(scenario())
    during = sum(1 for at in load.done_at if signalled <= at < exited)
    after_routes = {a for at, route in load.routes if at > exited + 1 for a in route}
    print(
        f"\nSIGTERM of {victim} under load: {load.summary()}; drain (SIGTERM -> exit) "
        f"{exited - signalled:.2f} s, {during} completed meanwhile, exit code {code}"
    )
    assert code == 0, fleet.log_tail(victim, 40)
    assert (load.failed, load.lost, load.wrong) == (0, 0, 0), load.errors[:5]
    assert load.sent == load.completed  # every request sent came back with its result
    assert victim not in after_routes
    draining = watcher.wait_for(
        lambda m: m.topic == topics.status(victim) and _status(m.payload).state == "draining",
        after=signalled,
        what="draining status",
    )
    offline = watcher.wait_for(
        lambda m: m.topic == topics.status(victim) and _status(m.payload).state == "offline",
        after=signalled,
        what="offline status",
    )
    assert draining.at <= offline.at
    assert _status(offline.payload).reason == "shutdown"


def test_kill_9_and_restart_three_times_keeps_the_fleet_serving(
    fleet: LocalFleet, small_cnn
) -> None:
    loaded = load_model(small_cnn)
    _start(fleet, small_cnn)
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)

    async def scenario() -> tuple[Load, str, list[tuple[int, float, int]]]:
        async with InferenceClient(settings, loaded.name) as client:
            plan = await client.wait_ready(180)
            victim = sorted(_agents_of(plan))[-1]
            load = Load(client, loaded.module)
            running = asyncio.ensure_future(load.run())
            windows: list[tuple[int, float, int]] = []  # completions, back after s, plan v
            try:
                await load.until(lambda: load.completed >= 20, 120, "20 requests before")
                for _ in range(3):
                    start = time.time()
                    before = (client.plan or plan).plan_version
                    fleet.signal(victim, signal.SIGKILL)
                    await asyncio.to_thread(fleet.procs[victim].wait, 10.0)
                    await asyncio.to_thread(
                        fleet.start_agent, AgentSpec(victim, "x86-laptop", AGENT_FLAGS)
                    )

                    def back(before: int = before) -> bool:
                        p = client.plan
                        return (
                            p is not None
                            and p.ready
                            and p.plan_version > before
                            and victim in _agents_of(p)
                        )

                    await load.until(back, 180, f"{victim} back in a ready plan")
                    back_at = time.time()
                    await load.until(
                        lambda t=back_at: load.since(t) >= 20, 120, "20 requests after"
                    )
                    version = client.plan.plan_version if client.plan else 0
                    windows.append((load.since(start), back_at - start, version))
            finally:
                load.stop.set()
                await asyncio.wait_for(running, 120)
            return load, victim, windows

    try:
        load, victim, windows = asyncio.run(scenario())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(fleet)}") from None
    shown = ", ".join(
        f"#{i + 1}: {n} completed, back in plan v{v} after {s:.1f} s"
        for i, (n, s, v) in enumerate(windows)
    )
    print(f"\nkill -9 + restart of {victim} x3: {load.summary()}; windows: {shown}")
    for agent_id in AGENTS:
        log = fleet.log_path(agent_id).read_text(errors="replace")
        assert "_CURRENT_DESERIALIZER" not in log, f"{agent_id}: two loads at once"
    assert all(n > 0 for n, _, _ in windows)
    assert (load.failed, load.lost, load.wrong) == (0, 0, 0), load.errors[:5]


def test_a_restarted_broker_gets_the_agents_retained_state_back(tmp_path: Path) -> None:
    """No persistence: a broker restarted on the same port knows nothing; the agents, once
    reconnected, publish status (same session), info and their last report again."""
    namespace = "t" + uuid.uuid4().hex[:10]
    topics = Topics(namespace)
    first = LocalBroker(port=0).start()
    port = first.port
    second: LocalBroker | None = None
    fleet = LocalFleet(first.url, namespace, workdir=str(tmp_path / "fleet"))
    watchers: list[Watcher] = []

    def watch(broker: LocalBroker) -> Watcher:
        watchers.append(Watcher(broker, [topics.all_agents(s) for s in WATCHED]))
        return watchers[-1]

    try:
        for agent_id in AGENTS:
            fleet.start_agent(AgentSpec(agent_id, "x86-laptop", AGENT_FLAGS))
        before = watch(first)
        for agent_id in AGENTS:
            before.wait_for(lambda m, a=agent_id: m.topic == topics.info(a), what="info")
            desired = AssignmentDesired(agent_id, "p-restart", 7, model="m", stages=[])
            before.publish(topics.assignment_desired(agent_id), codec.encode(desired), retain=True)
        sessions = {}
        for agent_id in AGENTS:
            before.wait_for(
                lambda m, a=agent_id: m.topic == topics.assignment_reported(a), what="reported"
            )
            seen = before.wait_for(lambda m, a=agent_id: m.topic == topics.status(a))
            sessions[agent_id] = _status(seen.payload).session
        before.close()
        watchers.remove(before)
        first.stop()
        second = LocalBroker(port=port).start()
        up = time.time()
        after = watch(second)  # a fresh subscriber on the empty broker
        arrived = {}
        for agent_id in AGENTS:
            for suffix in WATCHED:
                topic = f"{topics.root}/agents/{agent_id}/{suffix}"
                seen = after.wait_for(lambda m, t=topic: m.topic == t, timeout=60, what=topic)
                arrived[topic] = seen.at - up
        check = watch(second)  # and they stay there: retained for the next subscriber
        for agent_id in AGENTS:
            status = _status(
                check.wait_for(lambda m, a=agent_id: m.topic == topics.status(a)).payload
            )
            assert (status.state, status.session) == ("online", sessions[agent_id])
            info = codec.decode(
                check.wait_for(lambda m, a=agent_id: m.topic == topics.info(a)).payload, Info
            )
            assert info.session == sessions[agent_id]
            report = codec.decode(
                check.wait_for(
                    lambda m, a=agent_id: m.topic == topics.assignment_reported(a)
                ).payload,
                AssignmentReported,
            )
            assert (report.plan_id, report.plan_version, report.state) == ("p-restart", 7, "idle")
            assert fleet.alive(agent_id)
        assert all(m.retain for m in check.messages if m.topic.endswith(("status", "info")))
        print(
            f"\nbroker restarted on port {port}: all {len(arrived)} retained agent messages "
            f"back {max(arrived.values()):.2f} s after it was up "
            f"(first {min(arrived.values()):.2f} s)"
        )
    finally:
        for w in watchers:
            w.close()
        fleet.close()
        for broker in (first, second):
            if broker is not None:
                broker.stop()


WATCHED = ("status", "info", "assignment/reported")
