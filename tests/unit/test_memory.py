"""The in-memory broker behaves like mosquitto where services depend on it."""

from __future__ import annotations

import asyncio

import pytest

from edgeslice.broker.client import Will
from edgeslice.broker.memory import MemoryBroker, topic_matches
from edgeslice.broker.protocol.errors import BrokerError


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+/c", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/c", False),
    ],
)
def test_wildcards(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_retained_delivered_on_subscribe_and_cleared_by_empty_payload() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        pub, sub = broker.client("pub"), broker.client("sub")
        await pub.connect()
        await sub.connect()
        await pub.publish("ns/x", b"one", qos=1, retain=True)
        await pub.publish("ns/x", b"two", qos=1, retain=True)
        await sub.subscribe("ns/+", qos=1)
        first = await sub.next_message(0.1)
        assert first is not None and (first.payload, first.retain) == (b"two", True)
        await pub.publish("ns/x", b"", qos=1, retain=True)
        cleared = await sub.next_message(0.1)
        assert cleared is not None and (cleared.payload, cleared.retain) == (b"", False)
        await sub.subscribe("ns/#", qos=1)  # a new subscription: nothing retained any more
        assert await sub.next_message(0.05) is None
        assert broker.retained_payload("ns/x") is None

    asyncio.run(scenario())


def test_one_copy_per_client_and_qos_is_the_minimum() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        client = broker.client("c")
        await client.connect()
        await client.subscribe("a/#", qos=0)
        await client.subscribe("a/+", qos=0)
        await client.publish("a/b", b"x", qos=1)
        msg = await client.next_message(0.1)
        assert msg is not None and msg.qos == 0 and not msg.retain
        assert await client.next_message(0.05) is None
        await client.unsubscribe("a/#")
        await client.unsubscribe("a/+")
        await client.publish("a/b", b"y", qos=1)
        assert client.backlog == 0

    asyncio.run(scenario())


def test_publish_nowait_futures_resolve_on_the_next_turn() -> None:
    async def scenario() -> None:
        client = MemoryBroker().client("c")
        with pytest.raises(BrokerError, match="before connect"):
            client.publish_nowait("a", b"")
        await client.connect()
        fut = client.publish_nowait("a", b"x", qos=1)
        assert not fut.done()
        await fut
        await client.close()
        with pytest.raises(BrokerError, match="offline"):
            await client.publish("a", b"x", qos=1)

    asyncio.run(scenario())


def test_will_on_crash_and_on_takeover_not_on_close() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        watch = broker.client("watch")
        await watch.connect()
        await watch.subscribe("w/#")
        will = Will("w/status", b"gone")
        clean = broker.client("clean", will=will)
        await clean.connect()
        await clean.close()
        assert await watch.next_message(0.05) is None
        crashing = broker.client("crash", will=will)
        await crashing.connect()
        crashing.crash()
        msg = await watch.next_message(0.1)
        assert msg is not None and msg.payload == b"gone"
        assert broker.retained_payload("w/status") == b"gone"
        first = broker.client("same", will=Will("w/first", b"first gone"))
        await first.connect()
        second = broker.client("same")
        await second.connect()
        msg = await watch.next_message(0.1)
        assert msg is not None and msg.topic == "w/first"
        assert not first.connected and second.connected

    asyncio.run(scenario())


def test_dropped_connection_reconnects_resubscribes_and_reruns_the_hook() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        hooks = []

        async def on_connect() -> None:
            hooks.append(client.connect_count)
            await client.publish("s/status", b"online", qos=1, retain=True)

        client = broker.factory("svc", will=Will("s/status", b"lost"), on_connect=on_connect)
        await client.connect()
        await client.subscribe("s/in")
        await asyncio.sleep(0)
        assert hooks == [1] and broker.retained_payload("s/status") == b"online"
        client.drop_connection()
        assert broker.retained_payload("s/status") == b"lost"
        await asyncio.sleep(0.01)
        assert hooks == [1, 2] and broker.retained_payload("s/status") == b"online"
        other = broker.client("other")
        await other.connect()
        await other.publish("s/in", b"hello", qos=1)
        msg = await client.next_message(0.1)
        assert msg is not None and msg.payload == b"hello"

    asyncio.run(scenario())


def test_messages_iterates_in_arrival_order() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        client = broker.client("c")
        await client.connect()
        await client.subscribe("q")
        for i in range(3):
            client.publish_nowait("q", bytes([i]))
        seen = []
        async for msg in client.messages():
            seen.append(msg.payload[0])
            if len(seen) == 3:
                break
        assert seen == [0, 1, 2]

    asyncio.run(scenario())
