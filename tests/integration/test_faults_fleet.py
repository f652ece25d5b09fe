"""Faults on a real fleet: no request lost, no fleet stuck.

Real processes throughout: mosquitto (or amqtt) on a free port, a planner and three agents
started through the CLI by LocalFleet, and an InferenceClient in this process keeping
four requests in flight while an agent is killed with SIGKILL, the broker is restarted
without persistence, or the planner is restarted. The model is a small seeded MLP written
to tmp_path (mobilenetv2 is heavy for a 2-core CI box). Each test prints what was sent,
completed, failed and lost, and the times that matter (kill -> flowing again, broker
restart -> a new client has the plan, the longest gap across a planner restart); only
behaviour is asserted, never a time (bounds are generous timeouts).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.server import LocalBroker, free_port
from edgeslice.planner.modelspec import load_model

pytestmark = pytest.mark.integration

FAST = ("--calibrate-seconds", "0.1")
AGENTS = ("f1", "f2", "f3")
IN_FLIGHT = 4

MODEL_SOURCE = """
import torch
from torch import nn


def build():
    torch.manual_seed(7)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10)).eval()
    return model, (torch.randn(1, 256),)
"""


@dataclass
class Load:
    """What a load run sent and got back."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    done: list[tuple[float, list[str]]] = field(default_factory=list)  # (time, route)
    answered: dict[str, float] = field(default_factory=dict)  # request id -> when
    wrong: int = 0

    @property
    def lost(self) -> int:
        return self.sent - self.completed - self.failed

    def line(self, what: str, client: InferenceClient) -> str:
        r = client.requests
        return (
            f"{what}: sent={self.sent} completed={self.completed} failed={self.failed} "
            f"lost={self.lost} re-sends={r.resends} duplicates-dropped={r.duplicates} "
            f"stale-errors={r.stale_errors} wrong-outputs={self.wrong}"
        )

    def longest_gap(self, start: float, end: float) -> float:
        times = [start, *sorted(t for t, _ in self.done if start <= t <= end), end]
        return max(b - a for a, b in itertools.pairwise(times))


async def keep_in_flight(
    client: InferenceClient,
    inputs: tuple[torch.Tensor, ...],
    expected: torch.Tensor,
    stop: asyncio.Event,
    load: Load,
) -> None:
    """IN_FLIGHT workers, each sending its next request as soon as the last one finished."""

    async def worker() -> None:
        while not stop.is_set():
            load.sent += 1
            try:
                result = await client.infer(inputs, timeout=90.0)
            except Exception as exc:
                load.failed += 1
                load.errors.append(repr(exc))
                continue
            load.completed += 1
            load.done.append((time.time(), list(result.route)))
            load.answered[result.request_id] = time.time()
            if not torch.allclose(result.outputs[0], expected, rtol=1e-4, atol=1e-4):
                load.wrong += 1

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


async def until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
def model_spec(tmp_path: Path) -> str:
    path = tmp_path / "fault_model.py"
    path.write_text(MODEL_SOURCE)
    return f"{path}:build"


def _expected(spec: str) -> tuple[str, tuple[torch.Tensor, ...], torch.Tensor]:
    loaded = load_model(spec)
    with torch.inference_mode():
        out = loaded.module(*loaded.example_inputs)
    return loaded.name, loaded.example_inputs, out


def _start(fleet: LocalFleet, spec: str, *extra: str) -> None:
    for agent_id in AGENTS:
        fleet.start_agent(AgentSpec(agent_id, "x86-laptop", FAST))
    fleet.start_planner(spec, ["--replan-delay", "1", "--max-segments", "8", *extra])


def _report(fleet: LocalFleet, *names: str) -> None:
    for name in names:
        print(f"--- {name} log tail ---\n{fleet.log_tail(name, 15)}")


@pytest.mark.parametrize(
    "layout",
    [(), ("--strategy", "even-split")],
    ids=["replicas", "pipeline"],  # one stage on 3 replicas / 3 stages, one agent each
)
def test_kill9_agent_with_requests_in_flight_loses_none(
    fleet: LocalFleet, model_spec: str, layout: tuple[str, ...]
) -> None:
    """(a) kill -9 an agent holding requests: every request completes, once, at once; and
    (b) with --min-agents 3 the fleet then serves a new ready plan on the two left. With
    replicas the lost agent's requests move to another replica at once; in a pipeline they
    wait for the re-plan (a leave re-plans at once)."""
    name, inputs, expected = _expected(model_spec)
    _start(fleet, model_spec, "--min-agents", "3", *layout)
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)

    async def scenario() -> None:
        async with InferenceClient(settings, name) as client:
            first = await client.wait_ready(180)
            stop, load = asyncio.Event(), Load()
            driver = asyncio.ensure_future(keep_in_flight(client, inputs, expected, stop, load))
            await until(lambda: load.completed >= 20, 120, "warm-up requests")
            await until(
                lambda: any(
                    client.measured.get(a, None) and client.measured[a].in_flight for a in AGENTS
                ),
                30,
                "a request in flight",
            )
            victim = max(
                AGENTS, key=lambda a: client.measured[a].in_flight if a in client.measured else -1
            )
            held = {r.request_id for r in client.requests.open.values() if victim in r.route}
            killed_at = time.time()
            fleet.signal(victim, signal.SIGKILL)

            def flowing() -> float | None:
                after = [t for t, route in load.done if t > killed_at and victim not in route]
                return min(after) if after else None

            await until(lambda: flowing() is not None, 60, "requests flowing after the kill")
            recovered = (flowing() or killed_at) - killed_at
            await until(lambda: held <= set(load.answered), 60, "the killed agent's requests")
            rescued = max((load.answered[r] for r in held), default=killed_at) - killed_at

            def replanned() -> bool:
                p = client.plan
                return bool(
                    p
                    and p.ready
                    and p.plan_version > first.plan_version
                    and victim not in {a for s in p.stages for a in s.agents}
                )

            await until(replanned, 60, "a ready plan without the killed agent")
            done_then = load.completed
            await until(lambda: load.completed >= done_then + 20, 60, "requests on the new plan")
            stop.set()
            await asyncio.wait_for(driver, 120)
            plan = client.plan
            assert plan is not None
            print(
                f"\nkill -9 {victim} holding {len(held)} request(s): requests flowing again "
                f"{recovered:.3f}s after the kill, the ones it held all answered after "
                f"{rescued:.3f}s; plan v{first.plan_version} "
                f"{[s.agents for s in first.stages]} -> v{plan.plan_version} "
                f"{[s.agents for s in plan.stages]} (ready, --min-agents 3, 2 agents left)"
            )
            print(load.line("kill -9 agent", client))
            assert load.failed == 0, load.errors[:3]
            assert load.lost == 0 and load.wrong == 0
            survivors = set(AGENTS) - {victim}
            assert {a for s in plan.stages for a in s.agents} <= survivors

    try:
        asyncio.run(scenario())
    except BaseException:
        _report(fleet, "planner", *AGENTS)
        raise


def test_broker_restart_with_requests_in_flight(tmp_path: Path, model_spec: str) -> None:
    """(c) the broker stops and starts again on its port, without persistence: requests in
    flight complete, and a new client finds the plan (the planner re-publishes it)."""
    name, inputs, expected = _expected(model_spec)
    port = free_port()
    broker = LocalBroker(port=port).start()
    namespace = "bk" + os.urandom(4).hex()
    try:
        with LocalFleet(broker.url, namespace, str(tmp_path / "fleet")) as fleet:
            _start(fleet, model_spec)
            settings = parse_broker_url(broker.url, namespace)

            async def scenario() -> None:
                async with InferenceClient(settings, name) as client:
                    await client.wait_ready(180)
                    stop, load = asyncio.Event(), Load()
                    driver = asyncio.ensure_future(
                        keep_in_flight(client, inputs, expected, stop, load)
                    )
                    await until(lambda: load.completed >= 20, 120, "warm-up requests")
                    down_at = time.time()
                    await asyncio.to_thread(broker.stop)
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(broker.start)
                    up_at = time.time()
                    async with InferenceClient(settings, name) as newcomer:
                        plan = await newcomer.wait_ready(120)
                        found = time.time() - up_at
                        fresh = await newcomer.infer(inputs, timeout=60)
                    done_then = load.completed
                    await until(lambda: load.completed >= done_then + 20, 120, "requests again")
                    stop.set()
                    await asyncio.wait_for(driver, 120)
                    print(
                        f"\nbroker down {up_at - down_at:.2f}s; a new client had plan "
                        f"v{plan.plan_version} {found:.3f}s after the restart and its first "
                        f"request took {fresh.latency_s:.3f}s; longest gap between completions "
                        f"{load.longest_gap(down_at, time.time()):.3f}s"
                    )
                    print(load.line("broker restart", client))
                    assert load.failed == 0, load.errors[:3]
                    assert load.lost == 0 and load.wrong == 0

            try:
                asyncio.run(scenario())
            except BaseException:
                _report(fleet, "planner", *AGENTS)
                raise
    finally:
        broker.stop()


def test_planner_restart_keeps_the_plan_serving(fleet: LocalFleet, model_spec: str) -> None:
    """(d) the planner is stopped (SIGTERM) and started again: the kept plan serves on, and
    the new planner adopts it (same plan id and version)."""
    name, inputs, expected = _expected(model_spec)
    _start(fleet, model_spec, "--min-agents", "3")
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)

    async def scenario() -> None:
        async with InferenceClient(settings, name) as client:
            first = await client.wait_ready(180)
            stop, load = asyncio.Event(), Load()
            driver = asyncio.ensure_future(keep_in_flight(client, inputs, expected, stop, load))
            await until(lambda: load.completed >= 20, 120, "warm-up requests")
            stopped_at = time.time()
            assert await asyncio.to_thread(fleet.stop, "planner") == 0
            await asyncio.to_thread(
                fleet.start_planner,
                model_spec,
                ["--replan-delay", "1", "--max-segments", "8", "--min-agents", "3"],
            )

            def planner_online() -> bool:
                status = client.fleet.planner
                return status is not None and status.state == "online" and status.ts > stopped_at

            await until(planner_online, 120, "the restarted planner online")
            done_then = load.completed
            await until(lambda: load.completed >= done_then + 20, 60, "requests after restart")
            stop.set()
            await asyncio.wait_for(driver, 120)
            plan = client.plan
            assert plan is not None
            print(
                f"\nplanner restarted: plan {first.plan_id} v{first.plan_version} -> "
                f"{plan.plan_id} v{plan.plan_version}; longest gap between completions "
                f"{load.longest_gap(stopped_at, time.time()):.3f}s"
            )
            print(load.line("planner restart", client))
            assert load.failed == 0, load.errors[:3]
            assert load.lost == 0 and load.wrong == 0
            assert (plan.plan_id, plan.plan_version) == (first.plan_id, first.plan_version)

    try:
        asyncio.run(scenario())
    except BaseException:
        _report(fleet, "planner", *AGENTS)
        raise
