"""A new user's first hour, the parts that need a real broker or real processes.

Each test runs the command a user would type against the session's LocalBroker (a free
loopback port, never the machine's own broker) or, for the demo, with a ``--broker``
where nothing listens, and checks the one line it ends with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion

from edgeslice.lab.cli import cli
from edgeslice.lab.server import LocalBroker, free_port


def _one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgeslice.lab.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


# -- 9: TLS against a plain MQTT port ---------------------------------------------------
def test_tls_against_a_plain_port_says_so(broker: LocalBroker, namespace: str) -> None:
    url = f"mqtts://127.0.0.1:{broker.port}"
    result = CliRunner().invoke(
        cli, ["infer", "--broker", url, "--namespace", namespace, "--model", "m", "--random"]
    )
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert f"TLS handshake with 127.0.0.1:{broker.port} failed: is the port a TLS listener?" in line
    assert "usually 8883" in line


# -- 5: infer --model accepts the spec the planner was given ----------------------------
def test_infer_with_the_planners_spec_waits_for_the_served_name(
    broker: LocalBroker, namespace: str
) -> None:
    spec = "examples/branchy_model.py:build"
    args = ["--broker", broker.url, "--namespace", namespace, "--random", "--timeout", "1"]
    result = CliRunner().invoke(cli, ["infer", "--model", spec, *args])
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert line.startswith("Error: model 'build': no plan published after 1s")


# -- 10: monitor --raw prints the messages and nothing else ------------------------------
def test_monitor_raw_prints_only_the_messages(broker: LocalBroker, namespace: str) -> None:
    topic = f"{namespace}/v1/agents/pi-1/status"
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{namespace}")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        info = pub.publish(topic, msgpack.packb({"state": "online"}), qos=1, retain=True)
        info.wait_for_publish(5)
        proc = _cli(
            "monitor",
            "--raw",
            "--duration",
            "2",
            "--broker",
            broker.url,
            "--namespace",
            namespace,
        )
        out, _ = proc.communicate(timeout=60)
    finally:
        pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
    assert proc.returncode == 0, out
    assert f"{topic}  " in out and "(retained)" in out and '"online"' in out
    assert "AGENT" not in out


# -- 8: the demo's temporary folder (it holds the fleet key) never outlives it ----------
@pytest.fixture
def seeded_model(tmp_path: Path) -> str:
    path = tmp_path / "tiny.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def build():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.ones(1, 4)
            """
        )
    )
    return f"{path}:build"


def _demo(seeded_model: str, scratch: Path) -> subprocess.Popen[str]:
    scratch.mkdir()
    nothing_there = f"mqtt://127.0.0.1:{free_port()}"
    return _cli(
        "demo",
        "--model",
        seeded_model,
        "--agents",
        "1",
        "--requests",
        "1",
        "--broker",
        nothing_there,
        env={"TMPDIR": str(scratch)},
    )


def _demo_folders(scratch: Path) -> list[str]:
    return [p.name for p in scratch.iterdir() if p.name.startswith("edgeslice-demo-")]


def test_demo_removes_its_folder_when_it_fails(seeded_model: str, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    proc = _demo(seeded_model, scratch)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("Error: demo failed: nothing listens on 127.0.0.1:"), out
    assert _demo_folders(scratch) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_removes_its_folder_when_interrupted(
    seeded_model: str, tmp_path: Path, sig: signal.Signals
) -> None:
    scratch = tmp_path / "scratch"
    proc = _demo(seeded_model, scratch)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("started planner"):
            break
    else:
        pytest.fail("".join(seen))
    assert len(_demo_folders(scratch)) == 1  # the folder exists while the demo runs
    time.sleep(0.5)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "demo interrupted" in rest and "Traceback" not in rest
    assert _demo_folders(scratch) == []
