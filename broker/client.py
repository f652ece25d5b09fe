"""The one connection to a broker: a thin asyncio wrapper over paho-mqtt 2.x.

paho runs its network loop in its own thread (``loop_start``); every callback
hands its data to the asyncio loop through a :class:`~edgeslice.broker.handoff.LoopHandoff`
(in order, one loop wake-up per burst of messages or PUBACKs, not one each) and never
raises into paho (an exception in a paho callback silently stops its thread).
What this adds to paho, and why:

* ``connect()`` that fails with a :class:`BrokerError` naming the URL and the
  cause, instead of retrying silently forever;
* reconnect with backoff (paho's) *plus* resubscribe and an ``on_connect`` hook
  so services can re-announce themselves (birth messages) after a broker
  restart;
* QoS 1 ``publish`` that awaits its PUBACK without blocking the loop, and
  ``publish_nowait`` for pipelining many chunks and awaiting them together;
* TCP_NODELAY, because small control messages and chunk tails are latency
  sensitive;
* ``messages()``: an async iterator over incoming messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgeslice.broker.handoff import LoopHandoff
from edgeslice.broker.protocol.errors import BrokerError
from edgeslice.broker.settings import BrokerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IncomingMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes if this client vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


ConnectHook = Callable[[], Awaitable[None]]


class MqttClient:
    """One MQTT connection; see the module docstring. Use ``async with`` or connect/close."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        will: Will | None = None,
        on_connect: ConnectHook | None = None,
        max_inflight: int = 64,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self._on_connect_hook = on_connect
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handoff = LoopHandoff()  # paho's thread -> the loop
        self._queue: asyncio.Queue[IncomingMessage] = asyncio.Queue()
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pending_acks: dict[int, asyncio.Future[None]] = {}
        self._early_acks: OrderedDict[int, None] = OrderedDict()
        self._connected = asyncio.Event()
        self._first_connect: asyncio.Future[None] | None = None
        self._last_error = ""
        self._connect_error = ""  # why the last connect attempt failed (describe_connect_error)
        self._closing = False
        self.connect_count = 0

        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        client.suppress_exceptions = True
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set(
                ca_certs=settings.tls_ca,
                certfile=settings.tls_cert,
                keyfile=settings.tls_key,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            if settings.tls_insecure:
                client.tls_insecure_set(True)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._cb_connect
        client.on_connect_fail = self._cb_connect_fail
        client.on_disconnect = self._cb_disconnect
        client.on_message = self._cb_message
        client.on_publish = self._cb_publish
        self._paho = client

    # -- lifecycle -----------------------------------------------------------
    async def connect(self, timeout: float = 10.0) -> None:
        """Connect (retrying inside ``timeout``); BrokerError naming URL and cause on failure."""
        self._loop = asyncio.get_running_loop()
        self._handoff.bind(self._loop)
        self._first_connect = self._loop.create_future()
        try:
            self._paho.connect_async(
                self.settings.host, self.settings.port, keepalive=self.settings.keepalive
            )
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot connect to {self.settings.url}: {exc}") from None
        self._paho.loop_start()
        try:
            await asyncio.wait_for(asyncio.shield(self._first_connect), timeout)
        except TimeoutError:
            self._paho.loop_stop()
            if self._connect_error:  # the last attempt's cause, already a full sentence
                raise BrokerError(f"{self._connect_error} (gave up after {timeout:.0f}s)") from None
            cause = self._last_error or "no answer"
            raise BrokerError(
                f"cannot reach the MQTT broker at {self.settings.url} within {timeout:.0f}s "
                f"({cause}). Is a broker running there? For a local one run `edgeslice broker`; "
                "check --broker / EDGESLICE_BROKER."
            ) from None
        except BrokerError:
            self._paho.loop_stop()
            raise

    async def close(self) -> None:
        """Disconnect cleanly (no last will) and stop paho's thread."""
        self._closing = True
        with contextlib.suppress(Exception):
            self._paho.disconnect()
        await asyncio.to_thread(self._paho.loop_stop)
        for fut in self._pending_acks.values():
            if not fut.done():
                fut.set_exception(BrokerError(f"connection to {self.settings.url} closed"))
        self._pending_acks.clear()

    def drop_connection(self) -> None:
        """Close the socket without DISCONNECT, so the broker publishes the last will (tests)."""
        sock = self._paho.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    async def __aenter__(self) -> MqttClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    # -- publish / subscribe --------------------------------------------------
    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False
    ) -> asyncio.Future[None]:
        """Queue a publish; the returned future resolves on PUBACK (QoS 1) or when written."""
        loop = self._require_loop()
        fut: asyncio.Future[None] = loop.create_future()
        # Never hold self._lock while calling into paho: paho calls on_publish with its own
        # mutexes held, and _cb_publish takes self._lock (lock-order deadlock otherwise).
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            fut.set_exception(
                BrokerError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
            )
            return fut
        if qos == 0:  # nothing will acknowledge it: done once paho has it
            fut.set_result(None)
            return fut
        with self._lock:
            if info.mid in self._early_acks:
                del self._early_acks[info.mid]
                fut.set_result(None)
            else:
                self._pending_acks[info.mid] = fut
        return fut

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = 30.0,
    ) -> None:
        """Publish and wait until the broker has it (PUBACK for QoS 1)."""
        fut = self.publish_nowait(topic, payload, qos=qos, retain=retain)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BrokerError(
                f"no acknowledgement from {self.settings.url} for {topic!r} within {timeout}s"
            ) from None

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""
        self._subscriptions[topic_filter] = qos
        if self.connected:
            rc, _ = self._paho.subscribe(topic_filter, qos=qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerError(f"subscribe to {topic_filter!r} failed: {paho.error_string(rc)}")

    async def unsubscribe(self, topic_filter: str) -> None:
        self._subscriptions.pop(topic_filter, None)
        if self.connected:
            self._paho.unsubscribe(topic_filter)

    async def messages(self) -> AsyncIterator[IncomingMessage]:
        """Incoming messages in arrival order (one consumer)."""
        while True:
            yield await self._queue.get()

    async def next_message(self, timeout: float | None = None) -> IncomingMessage | None:
        """The next message, or None after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    @property
    def backlog(self) -> int:
        """Messages received but not consumed yet."""
        return self._queue.qsize()

    # -- paho callbacks (paho's thread: hand over, never raise) ----------------
    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise BrokerError("MqttClient used before connect()")
        return self._loop

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        self._handoff.call(fn, *args)

    def _cb_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        try:
            if reason.is_failure:
                self._last_error = f"broker refused the connection: {reason}"
                if reason.value in (4, 5, 134, 135):  # bad credentials / not authorised
                    self._call(
                        self._fail_first,
                        BrokerError(
                            f"{self.settings.url} refused client {self.client_id!r}: {reason}. "
                            "Check --username/--password (EDGESLICE_USERNAME/EDGESLICE_PASSWORD)."
                        ),
                    )
                return
            sock = client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for topic_filter, qos in list(self._subscriptions.items()):
                client.subscribe(topic_filter, qos=qos)
            self._call(self._on_connected)
        except Exception:  # never let paho's thread die
            log.exception("error in on_connect for %s", self.client_id)

    def _fail_first(self, exc: BrokerError) -> None:
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_exception(exc)

    def _on_connected(self) -> None:
        self.connect_count += 1
        self._connected.set()
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_result(None)
        elif self.connect_count > 1:
            log.warning("reconnected to %s as %s", self.settings.url, self.client_id)
        if self._on_connect_hook is not None:
            task = asyncio.ensure_future(self._on_connect_hook())
            task.add_done_callback(_log_task_error)

    def _cb_connect_fail(self, _client: paho.Client, _u: Any) -> None:
        # paho calls this from inside its ``except OSError`` around the connect attempt,
        # so the exception that made the attempt fail is still the one being handled
        try:
            message, final = describe_connect_error(self.settings, sys.exc_info()[1])
            self._last_error = "connection refused or unreachable"
            self._connect_error = message
            if final:  # retrying cannot help (no such host, not a TLS port): say so now
                self._call(self._fail_first, BrokerError(message))
        except Exception:  # never let paho's thread die
            log.exception("error in on_connect_fail for %s", self.client_id)

    def _cb_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._call(self._connected.clear)
        if not self._closing:
            self._last_error = f"disconnected: {reason}"
            log.warning("lost connection to %s (%s); reconnecting", self.settings.url, reason)

    def _cb_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
            item = IncomingMessage(msg.topic, payload, msg.qos, bool(msg.retain))
        except Exception:  # e.g. a topic that is not valid UTF-8
            log.warning("dropped a message with an undecodable topic")
            return
        self._call(self._queue.put_nowait, item)

    def _cb_publish(self, _c: paho.Client, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            fut = self._pending_acks.pop(mid, None)
            if fut is None:
                # Acked before publish_nowait registered it (or a QoS 0 publish): remember
                # the last few thousand mids; paho reuses a mid only after 65535 publishes.
                self._early_acks[mid] = None
                if len(self._early_acks) > 4096:
                    self._early_acks.popitem(last=False)
                return
        self._call(_resolve, fut)


def describe_connect_error(settings: BrokerSettings, exc: BaseException | None) -> tuple[str, bool]:
    """One line saying why a connect attempt failed and what to check; and whether it is
    final (retrying cannot help: an unknown host, a TLS/plain port mismatch)."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, socket.gaierror):
        unknown = exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
        return (
            f"cannot resolve host {settings.host!r} ({settings.url}): check the --broker URL "
            "(EDGESLICE_BROKER) / DNS",
            unknown,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate of {where} not trusted ({exc.verify_message}): give the broker's "
            "CA with --tls-ca (EDGESLICE_TLS_CA), and use the host name in the certificate",
            True,
        )
    plain_answer = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
    if isinstance(exc, ssl.SSLError) or (settings.tls and isinstance(exc, plain_answer)):
        return (
            f"TLS handshake with {where} failed: is the port a TLS listener? (mqtts:// needs a "
            "TLS port, usually 8883; use mqtt:// for a plain one)",
            True,
        )
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"nothing listens on {where}: is the broker running? (for a local one run "
            "`edgeslice broker`; check --broker / EDGESLICE_BROKER)",
            False,
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from {where}: check the address in --broker (EDGESLICE_BROKER) and "
            "any firewall between here and the broker",
            False,
        )
    if exc is None:
        return f"cannot connect to {where}: is the broker running?", False
    return f"cannot connect to {where}: {type(exc).__name__}: {exc}", False


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _log_task_error(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("on_connect hook failed", exc_info=task.exception())
