"""`edgeslice agent --emulate` as a user runs it: limited agents measure their profile's rate."""

from __future__ import annotations

import glob
import signal
import time
import uuid
from pathlib import Path

import pytest

from edgeslice.agent.limits import cgroup_problem
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import Info
from edgeslice.broker.protocol.topics import Topics
from edgeslice.lab.fleet import AgentSpec, LocalFleet

pytestmark = pytest.mark.integration

EMULATE = ("--emulate", "--calibrate-seconds", "0.5")


@pytest.fixture(scope="module", autouse=True)
def _needs_cgroups() -> None:
    problem = cgroup_problem()
    if problem is not None:
        pytest.skip(f"cgroups not writable here: {problem}")


def _start(fleet: LocalFleet, watcher_factory, topics: Topics, agent_id: str, profile: str) -> Info:
    watcher = watcher_factory([topics.info(agent_id)])
    fleet.start_agent(AgentSpec(agent_id, profile, EMULATE))
    seen = watcher.wait_for(lambda m: True, timeout=60, what=f"info of {agent_id}")
    return codec.decode(seen.payload, Info)


def test_emulated_agents_measure_rates_in_the_ratio_of_their_profiles(
    fleet: LocalFleet,
    watcher_factory,
    topics: Topics,
) -> None:
    # one after the other, so each measures the host (and calibrates) without the other's load
    infos = {
        agent_id: _start(fleet, watcher_factory, topics, agent_id, profile)
        for agent_id, profile in (("pi4", "rpi4-4gb"), ("pi5", "rpi5-8gb"))
    }
    for agent_id, info in infos.items():
        assert info.emulated is True, fleet.log_tail(agent_id)
        assert info.limits["mode"].startswith("cgroup"), info.limits
        assert info.threads == 1  # both need less than one core of any host this runs on
        groups = [Path(g) for g in info.limits["cgroups"]]
        assert groups and all(g.is_dir() and g.name == agent_id for g in groups)
        pid = str(fleet.procs[agent_id].pid)
        assert all(pid in (g / "cgroup.procs").read_text().split() for g in groups)

    ratio = infos["pi5"].gflops / infos["pi4"].gflops
    rates = {a: round(i.gflops, 2) for a, i in infos.items()}
    host = infos["pi4"].limits["host_core_gflops"]
    # profiles say 25/10 = 2.5; on a shared, busy host single runs spread over ~2.0-3.5
    assert 1.7 <= ratio <= 3.5, f"rpi5/rpi4 measured {rates} (host core {host}): ratio {ratio:.2f}"
    # the quota, not the host, sets the pace: an rpi4 (10 GFLOP/s) is far below one host core
    assert infos["pi4"].gflops < 0.6 * host, rates

    for agent_id, info in infos.items():
        assert fleet.stop(agent_id) == 0, fleet.log_tail(agent_id)
        assert not [g for g in info.limits["cgroups"] if Path(g).exists()]


def _groups_of(agent_id: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/**/edgeslice/{agent_id}/", recursive=True)


@pytest.mark.parametrize("moment", ["trial run under the quota", "service start-up"])
def test_sigterm_during_start_up_ends_an_emulated_agent_promptly(
    fleet: LocalFleet, moment: str
) -> None:
    """SIGTERM once the agent is limited: while it measures its quota (before the event
    loop runs), or while the service connects, calibrates and tests its link."""
    agent_id = f"pi-term-{moment.split()[0]}-{uuid.uuid4().hex[:6]}"  # no stale groups match
    fleet.start_agent(AgentSpec(agent_id, "rpi4-4gb", EMULATE))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and fleet.alive(agent_id):
        if moment.startswith("trial") and _groups_of(agent_id):
            break  # the groups exist: emulate_profile is measuring under the quota
        if moment.startswith("service") and "emulating rpi4-4gb" in fleet.log_tail(agent_id):
            break  # the CLI printed its emulation line: the service is starting
        time.sleep(0.01)
    else:
        pytest.fail(f"agent never reached the {moment}:\n{fleet.log_tail(agent_id)}")
    sent = time.monotonic()
    fleet.signal(agent_id, signal.SIGTERM)
    code = fleet.procs[agent_id].wait(timeout=15)  # generous: a loaded machine is slow
    took = time.monotonic() - sent
    print(f"\nSIGTERM during the {moment}: agent exited {took:.2f} s later with code {code}")
    assert code is not None, f"agent ignored SIGTERM for 15 s:\n{fleet.log_tail(agent_id)}"
    assert "Traceback" not in fleet.log_tail(agent_id), fleet.log_tail(agent_id)
    assert not _groups_of(agent_id)  # it removed its own cgroups on the way out
