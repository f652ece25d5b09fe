"""`edgeslice testbed up/down` as a user runs them: real processes, cgroups, link proxies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeslice.lab.testbed import _alive

pytestmark = pytest.mark.integration

FLEET = """
namespace = "tb-test"

[[agents]]
profile = "rpi4-4gb"
count = 1
link = { bandwidth_mbit = 50, latency_ms = 2 }

[[agents]]
profile = "rpi5-8gb"
count = 1
link = "none"
"""


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeslice.lab.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )


def _edgeslice_cgroups() -> list[str]:
    found = []
    for controller in ("cpu", "memory"):
        root = Path("/sys/fs/cgroup") / controller / "edgeslice"
        if root.is_dir():
            found += [str(p) for p in root.iterdir() if p.is_dir()]
    return found


def test_testbed_up_then_down_leaves_nothing_behind(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    state = tmp_path / "state.json"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    up = _cli("testbed", "up", "--fleet", str(fleet), "--state", str(state), env=env)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert "rpi4-4gb-1" in up.stdout and "rpi5-8gb-2" in up.stdout
        recorded = json.loads(state.read_text())
        pids = list(recorded["processes"].values())
        names = set(recorded["processes"])
        assert {"broker", "rpi4-4gb-1", "rpi5-8gb-2", "link-rpi4-4gb-1"} <= names
        assert all(_alive(pid) for pid in pids)
        again = _cli("testbed", "up", "--fleet", str(fleet), "--state", str(state), env=env)
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = _cli("testbed", "down", "--state", str(state), env=env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "no process or cgroup left" in down.stdout
    assert not any(_alive(pid) for pid in pids)
    assert not state.exists()
    assert not [c for c in _edgeslice_cgroups() if "rpi4-4gb-1" in c or "rpi5-8gb-2" in c]


def test_bad_fleet_file_names_the_file_and_entry(tmp_path: Path) -> None:
    fleet = tmp_path / "bad.toml"
    fleet.write_text('[[agents]]\nprofile = "rpi9"\n')
    res = _cli(
        "testbed",
        "up",
        "--fleet",
        str(fleet),
        "--state",
        str(tmp_path / "s.json"),
        env=dict(os.environ),
    )
    assert res.returncode == 1
    assert "bad.toml" in res.stderr and "agents[0]" in res.stderr
    assert "Traceback" not in res.stderr
