"""The local broker as users meet it: LocalBroker in Python and `edgeslice broker` on the shell."""

from __future__ import annotations

import glob
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.client import CallbackAPIVersion

from edgeslice.broker.protocol.errors import BrokerError
from edgeslice.lab.server import LocalBroker, amqtt_available, find_mosquitto, port_in_use

pytestmark = pytest.mark.integration

KINDS = [
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
    ),
    pytest.param(
        "amqtt", marks=pytest.mark.skipif(not amqtt_available(), reason="amqtt not installed")
    ),
]
CLI = [sys.executable, "-c", "from edgeslice.lab.cli import main; main()", "broker"]


class Peer:
    """A paho client that waits for CONNACK/SUBACK/PUBACK and queues what it receives."""

    def __init__(self, host: str, port: int) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: queue.Queue[object] = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = lambda c, u, f, rc, p: self._acks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._acks.put(rcs)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect(host, port)
        self.client.loop_start()
        assert not self._acks.get(timeout=10).is_failure  # type: ignore[attr-defined]

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self._acks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int) -> bool:
    try:
        psutil.Process(pid).wait(timeout=15)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return gone(pid)
    return True


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
def test_local_broker_carries_messages_and_leaves_nothing_behind(kind: str) -> None:
    broker = LocalBroker(kind=kind)  # type: ignore[arg-type]
    with broker:
        assert broker.kind == kind and broker.url == f"mqtt://127.0.0.1:{broker.port}"
        pid = broker.pid
        assert pid is not None and broker.is_running()
        sub, pub = Peer(broker.host, broker.port), Peer(broker.host, broker.port)
        sub.subscribe("edgeslice/test/#")
        payload = os.urandom(3 * 1024 * 1024)
        pub.publish("edgeslice/test/big", payload)
        assert sub.messages.get(timeout=20) == ("edgeslice/test/big", payload)
        sub.close()
        pub.close()
    assert not broker.is_running() and broker.pid is None
    assert gone(pid)
    assert not port_in_use(broker.host, broker.port)
    broker.stop()  # idempotent


def test_start_refuses_a_port_that_is_taken(taken_port: int) -> None:
    with pytest.raises(BrokerError, match=f"port {taken_port} .* already in use"):
        LocalBroker(port=taken_port).start()


def test_log_path_keeps_the_broker_log(tmp_path: Path) -> None:
    log = str(tmp_path / "broker.log")
    with LocalBroker(log_path=log):
        pass
    assert os.path.getsize(log) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_broker_dies_with_the_process_that_started_it(kind: str) -> None:
    code = (
        "import os, sys; from edgeslice.lab.server import LocalBroker;"
        f"b = LocalBroker(kind={kind!r}).start(); print(b.pid, os.getpid(), flush=True);"
        "os.kill(os.getpid(), 9)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid, owner = map(int, proc.stdout.split())
    assert wait_gone(pid), f"{kind} pid {pid} outlived its parent"
    with LocalBroker(kind=kind):  # type: ignore[arg-type]
        pass  # the next start sweeps temp dirs of owners that died without stop()
    leftovers = [
        d for d in glob.glob(os.path.join(tempfile.gettempdir(), "edgeslice-broker-*"))
        if Path(d, "owner.pid").is_file() and Path(d, "owner.pid").read_text() == str(owner)
    ]  # fmt: skip
    assert leftovers == []


def test_cli_prints_url_serves_and_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*CLI, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on mqtt://127\.0\.0\.1:(\d+) \(pid (\d+);", line)
        assert match, line
        port, broker_pid = int(match[1]), int(match[2])
        peer = Peer("127.0.0.1", port)
        peer.subscribe("a/b")
        peer.publish("a/b", b"hello")
        assert peer.messages.get(timeout=10) == ("a/b", b"hello")
        peer.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert gone(broker_pid)


def test_cli_on_a_taken_port_says_so_and_exits_1(taken_port: int) -> None:
    proc = subprocess.run(
        [*CLI, "--port", str(taken_port)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert f"port {taken_port} on 127.0.0.1 is already in use" in proc.stderr
    assert "--port 0" in proc.stderr
    assert "Traceback" not in proc.stderr
