"""The transport seam: what a service needs from a broker connection, as a typing.Protocol.

:class:`~edgeslice.broker.client.MqttClient` (paho, a real broker) and
:class:`~edgeslice.broker.memory.MemoryClient` (an in-process broker, for unit tests) both
satisfy :class:`Transport`. Services do not construct connections themselves; they take a
:class:`TransportFactory` (``client_id, will, on_connect -> Transport``) so a test can hand
them in-memory connections, and they default to :func:`mqtt_transport` over their
:class:`~edgeslice.broker.settings.BrokerSettings`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from edgeslice.broker.client import ConnectHook, IncomingMessage, Will
    from edgeslice.broker.settings import BrokerSettings


class Transport(Protocol):
    """One MQTT connection as services use it (see broker/client.py for the semantics)."""

    client_id: str

    async def connect(self, timeout: float = 10.0) -> None: ...

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool: ...

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> asyncio.Future[None]: ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = 30.0,
    ) -> None: ...

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None: ...

    async def unsubscribe(self, topic_filter: str) -> None: ...

    def messages(self) -> AsyncIterator[IncomingMessage]: ...

    async def next_message(self, timeout: float | None = None) -> IncomingMessage | None: ...


class TransportFactory(Protocol):
    """Opens a (not yet connected) transport: what services take instead of settings."""

    def __call__(
        self,
        client_id: str,
        will: Will | None = None,
        on_connect: ConnectHook | None = None,
    ) -> Transport: ...


def mqtt_transport(settings: BrokerSettings) -> TransportFactory:
    """The production factory: :class:`MqttClient` connections to ``settings``' broker."""
    from edgeslice.broker.client import MqttClient

    def make(
        client_id: str, will: Will | None = None, on_connect: ConnectHook | None = None
    ) -> Transport:
        return MqttClient(settings, client_id, will=will, on_connect=on_connect)

    return make
