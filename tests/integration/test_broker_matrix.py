"""The same fleet on every broker kind: mosquitto, amqtt, RabbitMQ (MQTT plugin), NATS (MQTT).

Each kind is started once for the module (RabbitMQ's Erlang node takes 5-15 s) on free
loopback ports with its own data dirs (lab/brokers.py), never the machine's services, and
runs one fleet: a planner, then two agents (LocalFleet, real processes), a seeded MLP
split in a pipeline over both agents. Per kind the tests check what a user relies on:

* the broker's own MQTT semantics the protocol uses (retained on subscribe, empty
  retained payload clearing, a QoS 1 message larger than NATS' default 1 MB limit,
  long client ids), with the known differences asserted as such: RabbitMQ sends
  retained messages only to subscriptions without wildcards;
* agents visible: ``status`` online and ``info`` retained, seen by a fresh subscriber;
* outputs of the partitioned model allclose to the whole model;
* the retained plan and assignments seen again by a client that reconnects;
* ``kill -9`` of an agent: its last will marks it offline, retained for newcomers.

The agents start (and their ``info`` is retained) before the planner: on RabbitMQ a
planner gets no retained ``info`` through its ``agents/+/info`` filter, so this checks that
it finds agents through their live telemetry and then reads their retained topics by exact
name (planner/service.py ``_follow``; the client does the same for its plan's agents).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    ONLINE,
    AssignmentDesired,
    Info,
    PlanMessage,
    Status,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.brokers import find_nats, rabbitmq_mqtt_available
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.server import LocalBroker, amqtt_available, find_mosquitto
from edgeslice.planner.modelspec import load_model

pytestmark = pytest.mark.integration

KINDS = [
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
    ),
    pytest.param(
        "amqtt", marks=pytest.mark.skipif(not amqtt_available(), reason="amqtt not installed")
    ),
    pytest.param(
        "rabbitmq",
        marks=pytest.mark.skipif(
            not rabbitmq_mqtt_available(), reason="rabbitmq-server (with rabbitmq_mqtt) missing"
        ),
    ),
    pytest.param(
        "nats", marks=pytest.mark.skipif(find_nats() is None, reason="nats-server not installed")
    ),
]
AGENTS = ("m1", "m2")  # no '.': RabbitMQ maps it to '/', NATS refuses it
FAST = ("--calibrate-seconds", "0.1")
WILDCARD_RETAINED = {"mosquitto": True, "amqtt": True, "rabbitmq": False, "nats": True}

MODEL_SOURCE = """
import torch
from torch import nn


def build():
    torch.manual_seed(11)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(128, 10)).eval()
    return model, (torch.randn(2, 128),)
"""


class Peer:
    """A plain paho client that waits for its acks and queues what it receives."""

    def __init__(self, server: LocalBroker, client_id: str | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._acks: queue.Queue[object] = queue.Queue()
        self.seen: list[mqtt.MQTTMessage] = []  # received, not yet taken by first()
        self.client_id = client_id or f"peer-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id)
        self.client.on_connect = lambda c, u, f, rc, p: self._acks.put(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._acks.put(rcs)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect(server.host, server.port)
        self.client.loop_start()
        code = self._acks.get(timeout=20)
        assert not code.is_failure, f"{server.kind} refused {self.client_id!r}: {code}"  # type: ignore[attr-defined]

    def subscribe(self, *filters: str) -> None:
        for topic_filter in filters:
            self.client.subscribe(topic_filter, qos=1)
            self._acks.get(timeout=20)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(20)

    def collect(self, seconds: float) -> list[mqtt.MQTTMessage]:
        out, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def until(
        self, done: Callable[[list[mqtt.MQTTMessage]], bool], timeout: float
    ) -> list[mqtt.MQTTMessage]:
        """What arrives until ``done`` says it is enough (or ``timeout`` passes)."""
        out: list[mqtt.MQTTMessage] = []
        end = time.monotonic() + timeout
        while not done(out) and (left := end - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                out.append(self.messages.get(timeout=left))
        return out

    def before_marker(
        self, sender: Peer, topic: str, timeout: float = 20.0
    ) -> list[mqtt.MQTTMessage]:
        """What this peer's subscriptions delivered before a marker ``sender`` publishes on
        ``topic`` (which they match) now: retained messages are sent on subscribe, ahead of
        anything published after it, so this is "what the subscribe brought", no waiting."""
        marker = b"marker-" + uuid.uuid4().hex.encode()
        sender.publish(topic, marker)
        got = self.until(lambda out: bool(out) and out[-1].payload == marker, timeout)
        assert got and got[-1].payload == marker, f"the marker on {topic} never came"
        return got[:-1]

    def first(
        self, topic: str, timeout: float = 30.0, where: Callable[[bytes], bool] | None = None
    ) -> mqtt.MQTTMessage:
        """The first message on ``topic`` whose payload passes ``where`` (others are kept)."""
        end = time.monotonic() + timeout
        while True:
            for msg in self.seen:
                if msg.topic == topic and (where is None or where(msg.payload)):
                    self.seen.remove(msg)
                    return msg
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nothing on {topic} within {timeout:.0f} s")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.messages.get(timeout=left))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Running:
    server: LocalBroker
    fleet: LocalFleet
    topics: Topics
    model: str
    inputs: tuple[torch.Tensor, ...]
    expected: torch.Tensor


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    broker = LocalBroker(kind=request.param).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def running(server: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    work = tmp_path_factory.mktemp(f"matrix-{server.kind}")
    source = Path(work, "matrix_model.py")
    source.write_text(MODEL_SOURCE)
    spec = f"{source}:build"
    loaded = load_model(spec)
    with torch.inference_mode():
        expected = loaded.module(*loaded.example_inputs)
    namespace = "mx" + uuid.uuid4().hex[:8]
    with LocalFleet(server.url, namespace, workdir=str(work / "fleet")) as fleet:
        t = Topics(namespace)
        peer = Peer(server)
        peer.subscribe(t.plan(loaded.name), *(t.info(a) for a in AGENTS))
        planner_args = ["--replan-delay", "1", "--strategy", "even-split", "--min-agents", "2"]
        if server.kind == "rabbitmq":
            # agents first, the planner after their info is retained: RabbitMQ sends no
            # retained messages to wildcard filters, so the planner must find the agents
            # through their live telemetry and read their retained topics by exact name
            for agent_id in AGENTS:
                fleet.start_agent(AgentSpec(agent_id, "x86-laptop", FAST))
            for agent_id in AGENTS:
                peer.first(t.info(agent_id), 120, lambda p: bool(p))
            fleet.start_planner(spec, planner_args)
        else:
            # on NATS, two agents started at once with a subscriber already on their
            # exact info topics once left one info unseen for 120 s (not explained yet):
            # the planner first, as before
            fleet.start_planner(spec, planner_args)
            for agent_id in AGENTS:
                fleet.start_agent(AgentSpec(agent_id, "x86-laptop", FAST))
        # agents are up, measured and serving once the plan is ready
        peer.first(t.plan(loaded.name), 180, lambda p: codec.decode(p, PlanMessage).ready)
        peer.close()
        yield Running(
            server, fleet, Topics(namespace), loaded.name, loaded.example_inputs, expected
        )
        for name in ("planner", *AGENTS):
            print(f"--- {server.kind}: {name} log tail ---\n{fleet.log_tail(name, 8)}")


def test_broker_semantics_the_protocol_relies_on(server: LocalBroker) -> None:
    """Retained on subscribe (exact; wildcard where the broker does it), an empty retained
    payload clears, a 1.5 MiB QoS 1 message passes, a 100-character client id is accepted."""
    root = f"sem{uuid.uuid4().hex[:8]}/v1/agents"
    pub = Peer(server, "planner-" + "x" * 92)  # long ids: planner-<id>-<hex>, client-<hex>
    try:
        pub.publish(f"{root}/a1/status", b"online", retain=True)
        exact, wild = Peer(server), Peer(server)
        exact.subscribe(f"{root}/a1/status")
        wild.subscribe(f"{root}/+/status")
        assert exact.first(f"{root}/a1/status").payload == b"online"
        got_wild = [m.payload for m in wild.before_marker(pub, f"{root}/a2/status")]
        assert (got_wild == [b"online"]) is WILDCARD_RETAINED[server.kind], got_wild

        pub.publish(f"{root}/a1/status", b"", retain=True)
        exact.first(f"{root}/a1/status")  # the clearing message itself is delivered
        fresh = Peer(server)
        fresh.subscribe(f"{root}/a1/status")
        cleared = [m.payload for m in fresh.before_marker(pub, f"{root}/a1/status")]
        assert cleared == [], "empty retained did not clear"

        big = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: above NATS' default max_payload
        exact.subscribe(f"{root}/a1/inbox/c1")
        pub.publish(f"{root}/a1/inbox/c1", big)
        assert exact.first(f"{root}/a1/inbox/c1").payload == big
        for peer in (exact, wild, fresh):
            peer.close()
    finally:
        pub.close()


def _online(payload: bytes) -> bool:
    return codec.decode(payload, Status).state == ONLINE


def _offline(payload: bytes) -> bool:
    return codec.decode(payload, Status).state == OFFLINE


def test_agents_visible_to_a_fresh_subscriber(running: Running) -> None:
    t = running.topics
    peer = Peer(running.server)
    try:
        for agent_id in AGENTS:
            peer.subscribe(t.status(agent_id), t.info(agent_id))
            assert peer.first(t.status(agent_id), 10, _online).retain
            info = peer.first(t.info(agent_id), 10)
            assert info.retain and codec.decode(info.payload, Info).agent_id == agent_id
        wild = Peer(running.server)
        filters = (t.all_agents("status"), t.all_agents("info"))
        wild.subscribe(*filters)
        # the marker is garbage to the planner on this topic: it drops it and serves on
        got = [m for m in wild.before_marker(peer, t.status("marker")) if m.retain]
        seen = {m.topic for m in got if any(mqtt.topic_matches_sub(f, m.topic) for f in filters)}
        stray = {m.topic for m in got} - seen
        # amqtt 0.12 also hands a new connection QoS 0 retained copies for *other*
        # clients' filters; readers dispatch by topic, so it is noise, not harm
        assert not stray or running.server.kind == "amqtt", stray
        wild.close()
        if WILDCARD_RETAINED[running.server.kind]:
            assert seen == {f(a) for a in AGENTS for f in (t.status, t.info)}
        else:  # RabbitMQ: retained messages only for filters without wildcards
            assert not seen, seen
    finally:
        peer.close()


def test_partitioned_model_matches_the_whole_model(running: Running) -> None:
    settings = parse_broker_url(running.server.url, running.fleet.namespace)

    async def scenario() -> None:
        async with InferenceClient(settings, running.model) as client:
            plan = await client.wait_ready(180)
            assert {a for s in plan.stages for a in s.agents} == set(AGENTS)
            for _ in range(5):
                result = await client.infer(running.inputs, timeout=60)
                torch.testing.assert_close(
                    result.outputs[0], running.expected, rtol=1e-4, atol=1e-4
                )
                assert set(result.route) == set(AGENTS)

    asyncio.run(scenario())


def test_retained_plan_and_assignments_survive_a_reconnect(running: Running) -> None:
    t = running.topics
    wanted = [t.plan(running.model), *(t.assignment_desired(a) for a in AGENTS)]
    client_id = f"reconnect-{uuid.uuid4().hex[:8]}"
    versions = []
    for _ in range(2):  # the same client id, disconnected and connected again
        peer = Peer(running.server, client_id)
        try:
            peer.subscribe(*wanted)

            def complete(out: list[mqtt.MQTTMessage]) -> bool:
                return {m.topic for m in out if m.retain} >= set(wanted)

            got = {m.topic: m for m in peer.until(complete, 10.0) if m.retain and m.topic in wanted}
        finally:
            peer.close()
        assert set(got) == set(wanted), sorted(got)
        plan = codec.decode(got[wanted[0]].payload, PlanMessage)
        desired = [codec.decode(got[w].payload, AssignmentDesired) for w in wanted[1:]]
        assert all(d.plan_version == plan.plan_version and d.stages for d in desired)
        versions.append(plan.plan_version)
    assert versions[0] == versions[1]


def test_kill9_agent_goes_offline_by_its_last_will(running: Running) -> None:
    t = running.topics
    victim = AGENTS[-1]
    peer = Peer(running.server)
    try:
        peer.subscribe(t.status(victim))
        peer.first(t.status(victim), 10, _online)  # the retained online one
        running.fleet.signal(victim, signal.SIGKILL)
        will = codec.decode(peer.first(t.status(victim), 60, _offline).payload, Status)
        assert will.reason == "lost"
        fresh = Peer(running.server)
        fresh.subscribe(t.status(victim))
        retained = fresh.first(t.status(victim), 10)
        fresh.close()
        assert retained.retain and _offline(retained.payload)
    finally:
        peer.close()
