"""paho's thread -> asyncio loop hand-off: batched wake-ups, nothing lost, nothing reordered."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import pytest

from edgeslice.broker.client import MqttClient
from edgeslice.broker.handoff import LoopHandoff
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.settings import parse_broker_url
from edgeslice.broker.transport import Transport


def _hand_over(handoff: LoopHandoff, sink: list[int], count: int, yield_every: int = 0) -> None:
    for i in range(count):
        handoff.call(sink.append, i)
        if yield_every and i % yield_every == 0:
            threading.Event().wait(0)  # let the loop thread run a drain in between


def test_a_burst_handed_over_while_the_loop_is_busy_costs_one_wakeup_and_keeps_order() -> None:
    async def scenario() -> tuple[list[int], LoopHandoff]:
        handoff, got = LoopHandoff(), list[int]()
        handoff.bind(asyncio.get_running_loop())
        thread = threading.Thread(target=_hand_over, args=(handoff, got, 5000))
        thread.start()
        thread.join()  # the loop is blocked meanwhile, like one busy with a reassembly
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return got, handoff

    got, handoff = asyncio.run(scenario())
    assert got == list(range(5000))
    assert (handoff.handed, handoff.wakeups) == (5000, 1)


def test_calls_from_a_thread_while_the_loop_runs_all_arrive_in_order() -> None:
    count = 50_000

    async def scenario() -> tuple[list[int], LoopHandoff]:
        handoff, got = LoopHandoff(), list[int]()
        handoff.bind(asyncio.get_running_loop())
        thread = threading.Thread(target=_hand_over, args=(handoff, got, count, 997))
        thread.start()
        async with asyncio.timeout(60):  # a guard against a lost wake-up, not a timing
            while len(got) < count:
                await asyncio.sleep(0.001)
        thread.join()
        return got, handoff

    got, handoff = asyncio.run(scenario())
    assert got == list(range(count))
    assert 1 <= handoff.wakeups <= handoff.handed == count


def test_a_failing_call_does_not_strand_the_rest_of_its_batch() -> None:
    async def scenario() -> list[str]:
        handoff, got = LoopHandoff(), list[str]()
        handoff.bind(asyncio.get_running_loop())

        def boom() -> None:
            raise ValueError("bad")

        handoff.call(got.append, "a")
        handoff.call(boom)
        handoff.call(got.append, "b")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return got

    assert asyncio.run(scenario()) == ["a", "b"]


def test_calls_without_a_loop_or_after_it_closed_are_dropped_quietly() -> None:
    handoff, got = LoopHandoff(), list[int]()
    handoff.call(got.append, 1)  # before connect(): nothing to run it on
    loop = asyncio.new_event_loop()
    handoff.bind(loop)
    loop.close()
    handoff.call(got.append, 2)  # paho delivering during shutdown
    assert got == [] and handoff.handed == 0


async def _publish_burst_and_collect(sender: Transport, receiver: Transport, count: int) -> None:
    topic = f"edgeslice-test/handoff/{uuid.uuid4().hex[:8]}"
    await receiver.subscribe(topic, qos=1)
    await asyncio.sleep(0.2)  # SUBACK before the first publish
    acks = [sender.publish_nowait(topic, i.to_bytes(4, "big") * 64, qos=1) for i in range(count)]
    got: list[int] = []
    async with asyncio.timeout(60):  # a guard, not a timing
        async for msg in receiver.messages():
            assert msg.topic == topic and len(msg.payload) == 256
            got.append(int.from_bytes(msg.payload[:4], "big"))
            if len(got) == count:
                break
        await asyncio.gather(*acks)
    assert got == list(range(count))


def test_a_quick_burst_arrives_in_order_through_the_in_memory_broker() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        async with broker.client("tx") as tx, broker.client("rx") as rx:
            await _publish_burst_and_collect(tx, rx, 3000)

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def real_broker_url() -> Iterator[str]:
    from edgeslice.lab.server import LocalBroker  # mosquitto when installed, else amqtt

    server = LocalBroker(port=0).start()
    yield server.url
    server.stop()


@pytest.mark.integration
def test_a_quick_burst_arrives_in_order_through_a_real_broker(real_broker_url: str) -> None:
    async def scenario() -> tuple[int, int]:
        settings = parse_broker_url(real_broker_url)
        tx = MqttClient(settings, "handoff-tx-" + uuid.uuid4().hex[:6])
        rx = MqttClient(settings, "handoff-rx-" + uuid.uuid4().hex[:6])
        async with tx, rx:
            await _publish_burst_and_collect(tx, rx, 3000)
            return rx._handoff.handed, rx._handoff.wakeups

    handed, wakeups = asyncio.run(scenario())
    assert handed >= 3000 and 1 <= wakeups <= handed
