"""`edgeslice calibrate` as a user runs it: two paced rpi4 agents on a real broker sweep
layers on their emulated execution path, the command trains and scores the estimator and
writes the file the planner reads."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.server import LocalBroker
from edgeslice.lab.testbed import wait_for_agents
from edgeslice.planner.calibrate import load

pytestmark = pytest.mark.integration

PACED = ("--emulate", "--emulate-mode", "paced", "--calibrate-seconds", "0.3")


def test_calibrate_sweeps_every_agent_and_writes_a_file_the_planner_reads(
    broker: LocalBroker, fleet: LocalFleet, namespace: str, tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")
    agents = ["pi-a", "pi-b"]
    for agent_id in agents:
        fleet.start_agent(AgentSpec(agent_id, "rpi4-4gb", PACED))
    infos = asyncio.run(wait_for_agents(broker.url, namespace, agents, timeout=60))
    out = tmp_path / "calibration.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "edgeslice.lab.cli", "calibrate",
            "--broker", broker.url, "--namespace", namespace, "--out", str(out),
            "--scale", "0.25", "--repeats", "2", "--budget", "20", "--min-agents", "2",
        ],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr + run.stdout + fleet.log_tail("pi-a")
    lines = run.stdout.splitlines()
    for agent_id in agents:  # one progress line per agent, paced as its profile
        line = next(x for x in lines if x.strip().startswith(f"{agent_id}:"))
        assert "rpi4-4gb" in line and "paced" in line, line
    assert any(x.startswith("holdout:") for x in lines)
    assert any(x.startswith("all ") for x in lines)

    cal = load(out)
    samples = cal.samples()
    assert {s.agent for s in samples} == set(agents)
    for agent_id in agents:
        figures = cal.agents[agent_id]
        assert figures["paced"] is True and figures["timed"] > 0
        # the sweep ran on the emulated board: its samples carry the agent's calibrated rate
        assert figures["gflops"] == pytest.approx(infos[agent_id].gflops, rel=0.5)
    rows = json.loads(out.read_text())["holdout"]["rows"]
    assert rows["all"]["learned"]["n"] == len(samples)
    # paced means slower than this host: a layer takes longer on the board than here
    on_host = [s.host_s for s in samples if s.host_s]
    assert (
        sorted(s.seconds for s in samples)[len(samples) // 2] > sorted(on_host)[len(on_host) // 2]
    )
