"""Load shifts on real processes: an agent made busy by other work gets less, then its work back.

Two rpi4-4gb agents emulated with a cgroup CPU quota (``--emulate-mode quota``: the
cgroup's quota is the board's speed), MobileNetV2 in 48 segments, ``--memory-mb 22`` so
the plan is a two-stage pipeline whose cut can move. A CPU hog (a separate busy-loop
process) is put into one agent's CPU cgroup: it eats half of that board's quota, the
agent's stage takes twice as long, its stage worker is busy ~all the time while the other
agent waits (the load signal: ``Telemetry.busy``, broker/fleetstate.py). The planner runs
with short load-shift settings (``--busy-hold 4 --busy-recover 12``; defaults 10 s and
30 s) and derates the busy agent: the next plan gives it fewer segments. The hog runs
10 s more on the derated plan, then stops; once the agent has averaged below
``--busy-low`` for the recovery time (counted from when the derated plan was ready) the
planner gives its work back. What this does not show: the load signal is busy time, and
a derated agent with less work is less busy even with its hog still running, so a hog
that never stops gets the agent its work back after ``--busy-recover`` and derated again
after ``--busy-hold`` (a slow cycle; see planner/replan.py). Sent, completed, failed,
duplicates and the timeline (plans, busy fractions) are printed; nothing may be lost,
failed or answered twice.

Paced agents (the testbed's default) are not used here on purpose: pacing holds each
stage for the board's time measured in *CPU* time, so a hog on the host does not slow an
emulated board (agent/pacing.py); a quota shares its CPU with whatever is in its cgroup.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeslice.broker.client import MqttClient
from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.planner.modelspec import load_model

pytestmark = pytest.mark.integration

AGENTS = ("sa", "sb")
IN_FLIGHT = 4
SHIFT = ["--busy-hold", "4", "--busy-recover", "20"]  # defaults: busy above 0.8, back below 0.6
HOG_AFTER_S = 12.0  # the hog runs this long on the derated plan (under --busy-recover)


def cpu_cgroup(pid: int) -> Path | None:
    """The cgroup-v1 cpu group (or v2 group) ``pid`` sits in, if it is an edgeslice one."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "edgeslice" not in path:
            continue
        if "cpu" in controllers.split(","):
            return Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
        if controllers == "":
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


def segments_of(plan: PlanMessage, agent: str) -> int:
    return sum(s.end_segment - s.start_segment for s in plan.stages if agent in s.agents)


def layout(plan: PlanMessage) -> list[tuple[int, int, list[str]]]:
    return [(s.start_segment, s.end_segment, list(s.agents)) for s in plan.stages]


def _segments(plan: PlanMessage, agent_id: str) -> int:
    """How many segments ``agent_id`` runs in ``plan`` (its share of the work)."""
    return sum(s.end_segment - s.start_segment for s in plan.stages if agent_id in s.agents)


def test_a_busy_agent_gets_less_work_then_its_work_back(fleet: LocalFleet) -> None:
    for agent in AGENTS:
        extra = ("--calibrate-seconds", "0.5", "--emulate", "--emulate-mode", "quota")
        fleet.start_agent(AgentSpec(agent, "rpi4-4gb", (*extra, "--memory-mb", "22")))
    fleet.start_planner(
        "mobilenetv2",
        ["--max-segments", "48", "--replan-delay", "1", "--min-agents", "2", *SHIFT],
    )
    try:
        asyncio.run(_scenario(fleet))
    except BaseException:
        for name in ("planner", *AGENTS):
            print(f"--- {name} log tail ---\n{fleet.log_tail(name, 15)}")
        raise


async def _scenario(fleet: LocalFleet) -> None:
    loaded = load_model("mobilenetv2")
    inputs = loaded.example_inputs
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)
    topics = Topics(fleet.namespace)
    t0 = time.monotonic()
    timeline: list[str] = []
    state = FleetState(topics)

    def note(what: str) -> None:
        busy = {a: round(state.load(a, time.time()), 2) for a in AGENTS}
        timeline.append(f"t={time.monotonic() - t0:6.1f}s  busy={busy}  {what}")

    watch = MqttClient(settings, client_id="shiftwatch")
    await watch.connect()
    await watch.subscribe(topics.all_agents("telemetry"))

    async def fold() -> None:
        while True:
            msg = await watch.next_message(timeout=1.0)
            if msg is not None:
                state.apply(msg.topic, msg.payload, time.time())

    folding = asyncio.ensure_future(fold())
    sent = completed = failed = 0
    errors: list[str] = []
    stop = asyncio.Event()
    hog: subprocess.Popen[bytes] | None = None
    try:
        async with InferenceClient(settings, "mobilenetv2") as client:

            async def worker() -> None:
                nonlocal sent, completed, failed
                while not stop.is_set():
                    sent += 1
                    try:
                        await client.infer(inputs, timeout=180)
                    except Exception as exc:
                        failed += 1
                        errors.append(repr(exc))
                        continue
                    completed += 1

            async def until(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
                deadline, last = time.monotonic() + timeout, 0.0
                while not check():
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    if time.monotonic() - last > 5:
                        last = time.monotonic()
                        note(f"(waiting for {what}; {completed} done)")
                    await asyncio.sleep(0.2)

            def newer(than: PlanMessage) -> bool:
                p = client.plan
                return bool(p and p.ready and p.plan_version > than.plan_version)

            first = await client.wait_ready(300)
            note(f"plan v{first.plan_version}: {layout(first)}")
            assert len(first.stages) == 2, f"expected a two-stage pipeline, got {layout(first)}"
            workers = [asyncio.ensure_future(worker()) for _ in range(IN_FLIGHT)]
            await until(lambda: completed >= 12, 180, "warm-up requests")
            victim = first.stages[0].agents[0]
            group = cpu_cgroup(fleet.procs[victim].pid or 0)
            if group is None:
                pytest.skip(f"{victim} has no cgroup (quota emulation unavailable here)")
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            (group / "cgroup.procs").write_text(str(hog.pid))
            note(f"hog pid {hog.pid} put into {victim}'s cgroup {group}")
            await until(lambda: newer(first), 120, "a plan that derates the busy agent")
            derated, derated_at = client.plan, time.monotonic()
            assert derated is not None
            note(f"plan v{derated.plan_version}: {layout(derated)}")
            done_then = completed
            # the hog runs on for HOG_AFTER_S: every plan meanwhile keeps the victim's share
            # down (the flap this caught: the agent that took the work was derated too, and
            # the next plan gave the victim its work back within seconds, hog still on)
            while time.monotonic() < derated_at + HOG_AFTER_S or completed < done_then + 8:
                now_plan = client.plan
                assert now_plan is not None
                assert _segments(now_plan, victim) <= _segments(derated, victim), (
                    f"the agent got its work back with the hog still on: {layout(now_plan)}"
                )
                assert time.monotonic() < derated_at + 120, "no requests on the derated plan"
                await asyncio.sleep(0.2)
            hog.kill()
            hog.wait()
            hog = None
            note("hog stopped")
            await until(lambda: newer(derated), 120, "the agent's work back")
            back = client.plan
            assert back is not None
            note(f"plan v{back.plan_version}: {layout(back)}")
            done_then = completed
            await until(lambda: completed >= done_then + 8, 120, "requests on the plan after")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 300)
            r = client.requests
            note(
                f"sent={sent} completed={completed} failed={failed} "
                f"lost={sent - completed - failed} re-sends={r.resends} "
                f"duplicates-dropped={r.duplicates}"
            )
    finally:
        if hog is not None:
            hog.kill()
        folding.cancel()
        await watch.close()
        print("\n" + "\n".join(timeline))
    assert failed == 0, errors[:3]
    assert sent == completed
    assert segments_of(derated, victim) < segments_of(first, victim)
    assert segments_of(back, victim) > segments_of(derated, victim)
