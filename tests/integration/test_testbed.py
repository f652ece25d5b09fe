"""`edgeslice testbed up/down` as a user runs them: real processes, cgroups, link proxies."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeslice.lab.supervisor import pid_alive, port_open

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


def _edgeslice_cgroups(namespace: str) -> list[str]:
    """Every edgeslice/<namespace>@<agent> cgroup of ``namespace`` on the machine (v1 or v2,
    at any depth); other fleets' (a benchmark running beside the tests) are not ours."""
    return glob.glob(f"/sys/fs/cgroup/**/edgeslice/{namespace}@*/", recursive=True)


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
        # a planner with the user's own key could not sign for these agents: say which key
        key = recorded["fleet_key_file"]
        assert os.path.isfile(key) and f"fleet key: {key}" in up.stdout
        planner = (
            f"edgeslice planner --broker {recorded['broker']} --namespace tb-test "
            f"--fleet-key-file {key} --model "
        )
        assert planner in up.stdout, up.stdout
        pids = list(recorded["processes"].values())
        names = set(recorded["processes"])
        assert {"broker", "rpi4-4gb-1", "rpi5-8gb-2", "link-rpi4-4gb-1"} <= names
        assert all(pid_alive(pid) for pid in pids)
        again = _cli("testbed", "up", "--fleet", str(fleet), "--state", str(state), env=env)
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = _cli("testbed", "down", "--state", str(state), env=env)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "no process or cgroup left" in down.stdout
    assert not any(pid_alive(pid) for pid in pids)
    assert not state.exists()
    assert not [c for c in _edgeslice_cgroups("tb-test") if "rpi4-4gb-1" in c or "rpi5-8gb-2" in c]


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


SLOW_FLEET = """
namespace = "tb-sigint"

[[agents]]
profile = "rpi4-4gb"
count = 2
link = { bandwidth_mbit = 20, latency_ms = 5 }
"""


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if text in Path(cmdline).read_bytes().decode(errors="replace"):
                found.append(int(cmdline.split("/")[2]))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid() and pid_alive(pid)]


def test_ctrl_c_during_up_stops_and_removes_everything(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SLOW_FLEET)
    state = tmp_path / "state.json"
    cmd = [sys.executable, "-m", "edgeslice.lab.cli", "testbed"]
    up = subprocess.Popen(
        [*cmd, "up", "--fleet", str(fleet), "--state", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: dict[str, int] = {}
    broker = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and up.poll() is None:
            if state.exists():  # `up` rewrites it (atomically) as each process starts
                recorded = json.loads(state.read_text())
                seen.update(recorded["processes"])
                broker = recorded["broker"]
            if "rpi4-4gb-1" in seen:  # the broker, a link and an agent that is starting
                break
            time.sleep(0.05)
        assert "rpi4-4gb-1" in seen and up.poll() is None, f"up never got going: {seen}"
        up.send_signal(signal.SIGINT)
        _out, err = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "edgeslice.lab.cli",
                    "testbed",
                    "down",
                    "--state",
                    str(state),
                ],
                timeout=120,
                check=False,
            )
    print(f"processes recorded before Ctrl-C: {seen}")
    assert up.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert {"broker", "link-rpi4-4gb-1", "rpi4-4gb-1"} <= set(seen)
    assert not [name for name, pid in seen.items() if pid_alive(pid)]
    assert not _processes_mentioning(str(tmp_path))  # agents' --cache-dir is in the workdir
    port = int(broker.rsplit(":", 1)[1])
    assert not port_open("127.0.0.1", port)  # the broker (and its mosquitto) are gone
    assert not state.exists()
    assert not [c for c in _edgeslice_cgroups("tb-sigint") if "rpi4-4gb-" in c]
