"""An in-process MQTT broker and clients with MqttClient's interface, for unit tests.

Services take a :class:`~edgeslice.broker.transport.TransportFactory`; a test passes
``MemoryBroker().factory`` and runs agents, planners, clients and monitors in one event
loop, with no broker process and no sockets. What it keeps of a real broker (mosquitto 2,
MQTT 3.1.1), because services depend on it:

* topic filters with ``+`` and ``#`` (``$``-topics never match a leading wildcard), one
  copy per client however many of its filters match, QoS = min(publish, subscription);
* retained messages: delivered (``retain=True``) on every SUBSCRIBE that matches them,
  replaced by a newer one, cleared by an empty retained payload (which live subscribers
  still receive, as with mosquitto); live deliveries carry ``retain=False``;
* per-publisher ordering; ``publish`` returns once the broker has the message (the PUBACK
  of QoS 1 resolves on the next loop turn, so ``publish_nowait`` futures are pending first);
* client ids: connecting with an id in use takes the old connection over, and the broker
  publishes the old connection's last will (mosquitto does);
* last will: published when a connection ends without a clean ``close()``:
  :meth:`MemoryClient.crash` (like ``kill -9``: the client is gone for good) and
  :meth:`MemoryClient.drop_connection` (a network blip: the client reconnects, resubscribes
  and runs its ``on_connect`` hook again, as paho's reconnect does).

Differences kept on purpose: delivery is immediate (no network), and a publish on a
crashed or closed client fails with :class:`BrokerError` instead of being queued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from edgeslice.broker.client import ConnectHook, IncomingMessage, Will
from edgeslice.broker.protocol.errors import BrokerError

log = logging.getLogger(__name__)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest (and the parent level)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    fparts = topic_filter.split("/")
    tparts = topic.split("/")
    for i, part in enumerate(fparts):
        if part == "#":
            return True
        if i >= len(tparts) or (part != "+" and part != tparts[i]):
            return False
    return len(fparts) == len(tparts)


@dataclass
class _Published:
    """Every message the broker accepted, in order (what tests assert on)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    sender: str


@dataclass
class MemoryBroker:
    """The broker: retained messages, connected clients by id, and a log of publishes."""

    retained: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    sessions: dict[str, MemoryClient] = field(default_factory=dict)
    published: list[_Published] = field(default_factory=list)

    def factory(
        self, client_id: str, will: Will | None = None, on_connect: ConnectHook | None = None
    ) -> MemoryClient:
        """A :class:`~edgeslice.broker.transport.TransportFactory` for services."""
        return MemoryClient(self, client_id, will=will, on_connect=on_connect)

    def client(self, client_id: str, will: Will | None = None) -> MemoryClient:
        return MemoryClient(self, client_id, will=will)

    def retained_payload(self, topic: str) -> bytes | None:
        entry = self.retained.get(topic)
        return None if entry is None else entry[0]

    # -- broker side ----------------------------------------------------------------
    def _attach(self, client: MemoryClient) -> None:
        old = self.sessions.get(client.client_id)
        if old is not None and old is not client:
            log.info("memory broker: client %s taken over", client.client_id)
            self._detach(old, publish_will=True)
            old._lost(reconnect=False)
        self.sessions[client.client_id] = client

    def _detach(self, client: MemoryClient, publish_will: bool) -> None:
        if self.sessions.get(client.client_id) is client:
            del self.sessions[client.client_id]
        will = client.will
        if publish_will and will is not None:
            self._route(will.topic, will.payload, will.qos, will.retain, client.client_id)

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool, sender: str) -> None:
        self.published.append(_Published(topic, payload, qos, retain, sender))
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        for client in list(self.sessions.values()):
            granted = client._granted_qos(topic)
            if granted is not None:
                client._deliver(IncomingMessage(topic, payload, min(qos, granted), False))

    def _send_retained(self, client: MemoryClient, topic_filter: str, qos: int) -> None:
        for topic, (payload, msg_qos) in list(self.retained.items()):
            if topic_matches(topic_filter, topic):
                client._deliver(IncomingMessage(topic, payload, min(qos, msg_qos), True))


class MemoryClient:
    """One connection to a :class:`MemoryBroker`; the interface of ``MqttClient``."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        will: Will | None = None,
        on_connect: ConnectHook | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self._on_connect_hook = on_connect
        self._queue: asyncio.Queue[IncomingMessage] = asyncio.Queue()
        self._subscriptions: dict[str, int] = {}
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead = False
        self._hooks: set[asyncio.Task[None]] = set()
        self.connect_count = 0

    # -- lifecycle ----------------------------------------------------------------
    async def connect(self, timeout: float = 10.0) -> None:
        if self._dead:
            raise BrokerError(f"memory client {self.client_id!r} was closed or crashed")
        self._loop = asyncio.get_running_loop()
        self._establish()

    async def close(self) -> None:
        """Disconnect cleanly: no last will."""
        self._dead = True
        self.broker._detach(self, publish_will=False)
        self._connected.clear()

    def crash(self) -> None:
        """Vanish without DISCONNECT (``kill -9``): the broker publishes the will; no reconnect."""
        self._dead = True
        self.broker._detach(self, publish_will=True)
        self._connected.clear()

    def drop_connection(self) -> None:
        """Lose the connection (the will is published), then reconnect as paho would."""
        self.broker._detach(self, publish_will=True)
        self._lost(reconnect=True)

    async def __aenter__(self) -> MemoryClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def _establish(self) -> None:
        self.broker._attach(self)
        self.connect_count += 1
        self._connected.set()
        for topic_filter, qos in list(self._subscriptions.items()):
            self.broker._send_retained(self, topic_filter, qos)
        if self._on_connect_hook is not None:
            task = asyncio.ensure_future(self._on_connect_hook())
            self._hooks.add(task)
            task.add_done_callback(self._hook_done)

    def _hook_done(self, task: asyncio.Task[None]) -> None:
        self._hooks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_connect hook failed", exc_info=task.exception())

    def _lost(self, reconnect: bool) -> None:
        self._connected.clear()
        if not reconnect:
            self._dead = True  # taken over: paho would fight back; tests want it to stay out
            return
        loop = self._loop
        if loop is not None and not self._dead:
            loop.call_soon(self._reconnect)

    def _reconnect(self) -> None:
        if not self._dead:
            self._establish()

    # -- publish / subscribe ----------------------------------------------------------
    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None:
            raise BrokerError("MqttClient used before connect()")
        fut: asyncio.Future[None] = loop.create_future()
        if not self.connected:
            fut.set_exception(BrokerError(f"publish to {topic!r}: {self.client_id} is offline"))
            return fut
        if "+" in topic or "#" in topic or not topic:
            fut.set_exception(BrokerError(f"publish to {topic!r} failed: invalid topic"))
            return fut
        self.broker._route(topic, bytes(payload), qos, retain, self.client_id)
        if qos == 0:
            fut.set_result(None)
        else:
            loop.call_soon(_resolve, fut)
        return fut

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = 30.0,
    ) -> None:
        await asyncio.wait_for(self.publish_nowait(topic, payload, qos, retain), timeout)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._subscriptions[topic_filter] = qos
        if self.connected:
            self.broker._send_retained(self, topic_filter, qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        while True:
            yield await self._queue.get()

    async def next_message(self, timeout: float | None = None) -> IncomingMessage | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    # -- broker side --------------------------------------------------------------------
    def _granted_qos(self, topic: str) -> int | None:
        """The highest QoS of this client's filters that match ``topic`` (None: no match)."""
        granted = [q for f, q in self._subscriptions.items() if topic_matches(f, topic)]
        return max(granted) if granted else None

    def _deliver(self, msg: IncomingMessage) -> None:
        self._queue.put_nowait(msg)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
