"""Integration fixtures: a real broker process per session, a fresh namespace and fleet per test.

Tests never use a broker they did not start: the session broker listens on a free loopback
port (mosquitto when installed, else amqtt) and each test gets its own topic namespace, so
tests cannot see each other's retained messages.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeslice.broker.protocol.topics import Topics
from edgeslice.lab.fleet import LocalFleet
from edgeslice.lab.server import LocalBroker


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    server = LocalBroker(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def topics(namespace: str) -> Topics:
    return Topics(namespace)


@pytest.fixture
def fleet(broker: LocalBroker, namespace: str, tmp_path) -> Iterator[LocalFleet]:  # type: ignore[no-untyped-def]
    with LocalFleet(broker.url, namespace, workdir=str(tmp_path / "fleet")) as f:
        yield f


@dataclass
class Seen:
    topic: str
    payload: bytes
    retain: bool
    at: float


class Watcher:
    """A plain paho client in its own thread that records every message on some filters."""

    def __init__(self, broker: LocalBroker, filters: list[str]) -> None:
        self.messages: list[Seen] = []
        self._cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="w" + uuid.uuid4().hex)
        self.client.on_message = self._on_message
        self._filters = filters
        self.client.on_connect = lambda c, *_: [c.subscribe(f, qos=1) for f in self._filters]
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Seen(msg.topic, bytes(msg.payload), bool(msg.retain), time.time()))
            self._cond.notify_all()

    def wait_for(
        self,
        predicate: Callable[[Seen], bool],
        timeout: float = 30.0,
        after: float = 0.0,
        what: str = "a message",
    ) -> Seen:
        """The first message (received after ``after``) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for seen in self.messages:
                    if seen.at >= after and predicate(seen):
                        return seen
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = sorted({m.topic for m in self.messages})
                    raise AssertionError(f"timed out waiting for {what}; saw topics {topics}")
                self._cond.wait(remaining)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def watcher_factory(broker: LocalBroker) -> Iterator[Callable[[list[str]], Watcher]]:
    made: list[Watcher] = []

    def make(filters: list[str]) -> Watcher:
        w = Watcher(broker, filters)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()
