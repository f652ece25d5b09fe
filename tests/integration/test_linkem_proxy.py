"""Link emulation on real sockets: real mosquitto, paho clients, in-process and process proxies.

The figures checked are the ones the testbed relies on: a shaped link carries
about its configured bandwidth, a one-way latency shows up twice in a round
trip, bytes arrive intact and in order even on a lossy link, and the process
form leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeslice.broker.protocol.errors import BrokerError
from edgeslice.lab.linkem import LinkProxy, LinkSpec
from edgeslice.lab.linkproc import LinkProxyProcess
from edgeslice.lab.server import LocalBroker

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


class Client:
    """A paho client on its own network thread that records message arrival times."""

    def __init__(self, host: str, port: int, subscribe: str | None = None) -> None:
        self.received: list[tuple[float, bytes]] = []
        self._cond = threading.Condition()
        self.paho = paho.Client(CallbackAPIVersion.VERSION2, client_id="l" + uuid.uuid4().hex)
        self.paho.on_message = self._on_message
        self.paho.connect(host, port)
        self.paho.loop_start()
        if subscribe is not None:
            subscribed = threading.Event()
            self.paho.on_subscribe = lambda *args: subscribed.set()
            self.paho.subscribe(subscribe, qos=0)
            assert subscribed.wait(10), f"no SUBACK for {subscribe} via port {port}"

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.received.append((time.monotonic(), bytes(msg.payload)))
            self._cond.notify_all()

    def wait_count(self, count: int, timeout: float = 30.0) -> tuple[float, bytes]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.received) >= count, timeout)
            assert ok, f"only {len(self.received)} of {count} messages arrived in {timeout} s"
            return self.received[count - 1]

    def close(self) -> None:
        self.paho.disconnect()  # first, so the network thread wakes up and loop_stop is quick
        self.paho.loop_stop()


@pytest.fixture
def start_proxy(broker: LocalBroker) -> Iterator[Callable[..., LinkProxy]]:
    """Starts in-process proxies to the session broker on an event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxies: list[LinkProxy] = []

    def start(spec: LinkSpec, seed: int | None = None) -> LinkProxy:
        proxy = LinkProxy(seed=seed)
        coro = proxy.start("127.0.0.1", 0, broker.host, broker.port, spec)
        proxies.append(asyncio.run_coroutine_threadsafe(coro, loop).result(10))
        return proxy

    yield start
    for proxy in proxies:
        asyncio.run_coroutine_threadsafe(proxy.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def one_way_rate(broker: LocalBroker, proxy: LinkProxy, size: int) -> float:
    """Bytes/s of one ``size``-byte publish: publisher through the proxy, subscriber direct."""
    topic = "linkem/" + uuid.uuid4().hex
    receiver = Client(broker.host, broker.port, subscribe=topic)
    sender = Client("127.0.0.1", proxy.port)
    try:
        started = time.monotonic()
        sender.paho.publish(topic, b"\x5a" * size, qos=0)
        arrived, payload = receiver.wait_count(1, timeout=60)
        assert len(payload) == size
        return size / (arrived - started)
    finally:
        sender.close()
        receiver.close()


def test_shaped_link_delivers_its_bandwidth(
    broker: LocalBroker, start_proxy: Callable[..., LinkProxy]
) -> None:
    spec = LinkSpec.from_mbit(8, 0)  # 1 MB/s
    shaped = one_way_rate(broker, start_proxy(spec), 2 * MIB)
    assert 0.8 * spec.bandwidth_bps <= shaped <= 1.2 * spec.bandwidth_bps, shaped
    unshaped = one_way_rate(broker, start_proxy(LinkSpec()), 2 * MIB)
    assert unshaped > 4 * shaped, (shaped, unshaped)


def median_round_trip(host: str, port: int, samples: int = 9) -> float:
    """Median time for a client to receive its own small QoS 0 publish."""
    topic = "linkem/" + uuid.uuid4().hex
    client = Client(host, port, subscribe=topic)
    try:
        times = []
        for i in range(samples):
            started = time.monotonic()
            client.paho.publish(topic, b"ping", qos=0)
            arrived, _ = client.wait_count(i + 1, timeout=10)
            times.append(arrived - started)
        return statistics.median(times)
    finally:
        client.close()


def test_one_way_latency_shows_up_twice_in_a_round_trip(
    broker: LocalBroker, start_proxy: Callable[..., LinkProxy]
) -> None:
    proxy = start_proxy(LinkSpec.from_mbit(0, 20))
    direct = median_round_trip(broker.host, broker.port)
    shaped = median_round_trip("127.0.0.1", proxy.port)
    added = shaped - direct
    assert 0.038 <= added <= 0.065, f"added {added * 1000:.1f} ms, expected about 40 ms"


def test_lossy_link_delivers_every_byte_in_order(
    broker: LocalBroker, start_proxy: Callable[..., LinkProxy]
) -> None:
    proxy = start_proxy(LinkSpec.from_mbit(0, 1, loss_pct=2.0), seed=3)
    topic = "linkem/" + uuid.uuid4().hex
    receiver = Client("127.0.0.1", proxy.port, subscribe=topic)
    sender = Client("127.0.0.1", proxy.port)
    try:
        payloads = [os.urandom(64 * 1024) for _ in range(8)]
        for payload in payloads:
            sender.paho.publish(topic, payload, qos=1)
        receiver.wait_count(len(payloads))
        assert [p for _, p in receiver.received] == payloads
    finally:
        sender.close()
        receiver.close()
    stats = proxy.stats()
    assert stats.held_back_up + stats.held_back_down > 0  # the loss did happen
    assert stats.bytes_up >= 8 * 64 * 1024 and stats.bytes_down >= 8 * 64 * 1024


def test_process_form_forwards_mqtt_and_leaves_nothing_behind(broker: LocalBroker) -> None:
    spec = LinkSpec.from_mbit(50, 2)
    with LinkProxyProcess(broker.host, broker.port, spec) as proc:
        pid = proc.pid
        assert pid is not None and proc.url == f"mqtt://127.0.0.1:{proc.port}"
        expected = f"linkem: listening on 127.0.0.1:{proc.port} -> {broker.host}:{broker.port}"
        assert expected + " (50 Mbit/s, 2 ms one-way, 0 % loss)" in proc.log_tail()
        topic = "linkem/" + uuid.uuid4().hex
        client = Client("127.0.0.1", proc.port, subscribe=topic)
        try:
            client.paho.publish(topic, b"through the proxy process", qos=1)
            assert client.wait_count(1, timeout=10)[1] == b"through the proxy process"
        finally:
            client.close()
    assert proc.returncode == 0  # SIGTERM is a clean stop
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_process_form_reports_a_taken_port_with_its_log(broker: LocalBroker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = LinkProxyProcess(broker.host, broker.port, LinkSpec(), listen_port=port)
        with pytest.raises(
            BrokerError, match=rf"(?s)log tail.*cannot listen on 127.0.0.1:{port}.*in use"
        ):
            proc.start(timeout=10)
    assert not proc.is_running()
