"""The generated ACL in a real mosquitto: agents, monitor, clients and strangers get their rights.

mosquitto drops a publish the ACL refuses (MQTT 3.1.1 has no way to say no),
so "not delivered" is checked by ordering: the refused message is published
(and acknowledged) first, an allowed one after it; a subscriber that gets the
allowed one first never got the refused one.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.client import CallbackAPIVersion

from edgeslice.agent.dataplane import DataPlane
from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, encode_transfer
from edgeslice.broker.protocol.messages import ErrorReply, RequestEnvelope, RouteHop
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import BrokerSettings
from edgeslice.broker.transport import mqtt_transport
from edgeslice.lab.mosquitto_conf import MosquittoSetup, render_all
from edgeslice.lab.server import find_mosquitto, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
    pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd missing"),
]
T = Topics("acltest")
ACCOUNTS = ("planner", "monitor", "app", "app2", "pi-1", "pi-2")


class Peer:
    """A paho client with credentials; ``refused`` is set if the broker rejected the CONNECT."""

    def __init__(self, port: int, username: str | None, password: str | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: queue.Queue[object] = queue.Queue()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{username}-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password or f"pw-{username}")
        self.client.on_connect = lambda c, u, f, rc, p: self._acks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._acks.put(rcs)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.refused = bool(self._acks.get(timeout=10).is_failure)  # type: ignore[attr-defined]

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self._acks.get(timeout=10)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A mosquitto with the generated conf + ACL on a loopback plain listener; yields its port."""
    workdir: Path = tmp_path_factory.mktemp("acl-broker")
    port = free_port()
    setup = MosquittoSetup(
        namespace="acltest",
        tls=False,
        bind="127.0.0.1",
        port=port,
        local_port=None,
        agents=("pi-1", "pi-2"),
        clients=("app", "app2"),
        install_dir=str(workdir),
        data_dir=None,
        run_as_user=pwd.getpwuid(os.geteuid()).pw_name,
    )
    for name, text in render_all(setup).items():
        (workdir / name).write_text(text)
    passwd = str(workdir / "passwd")
    for i, user in enumerate(ACCOUNTS):
        create = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", passwd, user, f"pw-{user}"], check=True, timeout=30
        )
    log = open(workdir / "mosquitto.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(find_mosquitto()), "-c", str(workdir / "mosquitto.conf")],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:  # ready when it accepts TCP; bounded by the exit check and pytest-timeout
            assert proc.poll() is None, (workdir / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_agent_publishes_its_own_status_but_not_another_agents(acl_broker: int) -> None:
    monitor, agent = Peer(acl_broker, "monitor"), Peer(acl_broker, "pi-1")
    monitor.subscribe(T.all_topics())
    agent.publish(T.status("pi-2"), b"forged")
    agent.publish(T.status("pi-1"), b"online")
    assert monitor.next_message() == (T.status("pi-1"), b"online")
    agent.close()
    monitor.close()


def test_monitor_receives_but_cannot_publish(acl_broker: int) -> None:
    planner, monitor = Peer(acl_broker, "planner"), Peer(acl_broker, "monitor")
    planner.subscribe(T.all_topics())
    monitor.subscribe(T.all_topics())
    for topic in (
        T.inbox("pi-1", "monitor"),
        T.planner_status(),
        T.status("monitor"),
        T.plan("m"),
    ):
        monitor.publish(topic, b"from-monitor")
    planner.publish(T.plan("m"), b"plan")
    assert planner.next_message() == (T.plan("m"), b"plan")
    assert monitor.next_message() == (T.plan("m"), b"plan")
    planner.close()
    monitor.close()


def test_agent_reads_its_own_commands_only(acl_broker: int) -> None:
    planner, agent = Peer(acl_broker, "planner"), Peer(acl_broker, "pi-1")
    agent.subscribe(f"{T.root}/agents/+/cmd/+")
    planner.publish(T.cmd("pi-2", "drain"), b"not-yours")
    planner.publish(T.cmd("pi-1", "calibrate"), b"yours")
    assert agent.next_message() == (T.cmd("pi-1", "calibrate"), b"yours")
    agent.close()
    planner.close()


def test_client_sends_to_an_inbox_and_gets_only_its_results(acl_broker: int) -> None:
    app, agent = Peer(acl_broker, "app"), Peer(acl_broker, "pi-1")
    agent.subscribe(T.agent_inbox("pi-1"))
    app.subscribe(f"{T.root}/clients/+/results")
    app.publish(T.inbox("pi-1", "app2"), b"posing as app2")  # refused: not its segment
    app.publish(T.inbox("pi-1", "app"), b"request")
    assert agent.next_message() == (T.inbox("pi-1", "app"), b"request")
    agent.publish(T.client_results("someone-else"), b"not-yours")
    agent.publish(T.client_results("app"), b"result")
    assert app.next_message() == (T.client_results("app"), b"result")
    app.close()
    agent.close()


@pytest.mark.parametrize("username, password", [(None, None), ("pi-1", "wrong"), ("nobody", "x")])
def test_anonymous_and_bad_credentials_are_refused(
    acl_broker: int, username: str | None, password: str | None
) -> None:
    peer = Peer(acl_broker, username, password)
    assert peer.refused
    peer.close()


class AgentDataPlane:
    """The real agent data plane (no stage loaded) as account pi-1, on its own event loop."""

    def __init__(self, port: int) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(port),), daemon=True)
        self._thread.start()
        assert self._ready.wait(15), "agent data plane did not connect"

    async def _main(self, port: int) -> None:
        settings = BrokerSettings(
            port=port, username="pi-1", password="pw-pi-1", namespace="acltest"
        )
        client = mqtt_transport(settings)("agent-pi-1")
        await client.connect()
        await client.subscribe(T.agent_inbox("pi-1"), qos=1)
        plane = DataPlane("pi-1", client, T, StageRuntime())

        async def consume() -> None:
            async for msg in client.messages():
                plane.on_chunk(msg.payload, T.parse(msg.topic).name)

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        tasks = [asyncio.create_task(plane.run()), asyncio.create_task(consume())]
        self._ready.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        plane.close()
        await client.close()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


def _request(reply_to: str) -> bytes:
    env = RequestEnvelope(route=[RouteHop("pi-1", "a" * 64)], reply_to=reply_to)
    chunks = encode_transfer(
        b"", request_id=uuid.uuid4().hex, kind="request", meta=codec.to_wire(env)
    )
    return chunks.chunks[0]


def _error_reply(payload: bytes) -> ErrorReply:
    done = Reassembler().feed(payload, time.time())
    assert isinstance(done, Completed) and done.header.kind == "error"
    return codec.from_wire(done.header.meta, ErrorReply)


def test_a_result_goes_only_to_the_client_that_sent_the_request(acl_broker: int) -> None:
    app, app2, planner = (Peer(acl_broker, u) for u in ("app", "app2", "planner"))
    app.subscribe(T.client_results("app"))
    app2.subscribe(T.client_results("app2"))
    agent = AgentDataPlane(acl_broker)
    try:
        # under app2's segment: the broker drops it, so no answer can reach app2
        app.publish(T.inbox("pi-1", "app2"), _request(reply_to="app2"))
        # under its own segment but asking for app2's results: the agent refuses, to app
        app.publish(T.inbox("pi-1", "app"), _request(reply_to="app2"))
        topic, payload = app.next_message()
        refused = _error_reply(payload)
        assert topic == T.client_results("app")
        assert "'app2'" in refused.error and "reply_to" in refused.error
        assert (refused.agent, refused.retryable) == ("pi-1", False)
        # the agent answers in order: had the first request got through, its answer would be
        # on app2's topic before this marker
        planner.publish(T.client_results("app2"), b"marker")
        assert app2.next_message() == (T.client_results("app2"), b"marker")
        # its own request is answered (no stage loaded here: a retryable error) to app only
        app.publish(T.inbox("pi-1", "app"), _request(reply_to="app"))
        topic, payload = app.next_message()
        assert topic == T.client_results("app")
        assert _error_reply(payload).code == "stage_unavailable"
    finally:
        agent.close()
        for peer in (app, app2, planner):
            peer.close()
