"""The agent's upkeep on telemetry ticks: re-testing a link that slowed down (and
re-announcing it), and giving malloc's kept memory back once requests stop."""

from __future__ import annotations

import asyncio
import ctypes.util
import platform
import time
from pathlib import Path

import pytest
from memfleet import agent_config, eventually, running

from edgeslice.agent.announce import Measured, retest_link
from edgeslice.agent.linkwatch import LinkWatch, LinkWatchConfig
from edgeslice.agent.memtrim import IdleTrim, rss_bytes
from edgeslice.agent.probe import LinkTest
from edgeslice.agent.service import AgentService
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import Info
from edgeslice.broker.protocol.topics import Topics

T = Topics("unit")


def _info(broker: MemoryBroker, agent_id: str) -> Info | None:
    payload = broker.retained_payload(T.info(agent_id))
    return None if payload is None else codec.decode(payload, Info)


class StubLink(LinkTest):
    """The service's link test, answering with the figures a test would find on a link of
    ``bandwidth_bps`` and ``rtt_s`` (the in-memory broker has no link to slow down)."""

    def __init__(self, real: LinkTest, bandwidth_bps: float, rtt_s: float) -> None:
        super().__init__(real.client, real.topic)
        self.figures = rtt_s, bandwidth_bps

    async def run(self, test_bytes: int) -> tuple[float, float]:
        return self.figures


async def _slow_down(tmp_path: Path, tested: float) -> tuple[AgentService, Info, Info]:
    """An agent whose transfers arrive 40x slower after a baseline, and whose link then
    tests at ``tested`` x its announced bandwidth: (service, its first info, its info 1 s
    after the test)."""
    broker = MemoryBroker()
    config = agent_config("a1", tmp_path, telemetry_interval=0.1, link_watch_s=0.2)
    service = AgentService(config, transport=broker.factory)
    slow = asyncio.Event()

    async def transfers() -> None:  # what the data plane would report: 4 per window
        while True:
            now = time.time()
            duration = 0.04 if slow.is_set() else 0.001  # 400 kB at 10 MB/s vs 400 MB/s
            service.dataplane.on_received(400_000, now - duration, now)
            await asyncio.sleep(0.05)

    async with running(service.run):
        first = await eventually(lambda: _info(broker, "a1"), what="info")
        assert first is not None
        feeding = asyncio.ensure_future(transfers())
        watch = service.linkwatch
        assert watch is not None
        await eventually(lambda: watch.baseline_bps, what="a baseline")
        was = service.measured
        service.link = StubLink(service.link, tested * was.link_bandwidth_bps, was.link_rtt_s)
        slow.set()
        await eventually(lambda: watch.tests == 1 and not service._measuring.locked(), 10.0)
        await asyncio.sleep(1.0)  # still slow: the new baseline is the slow rate
        assert watch.tests == 1 and watch.baseline_bps is not None
        feeding.cancel()
        last = _info(broker, "a1")
        assert last is not None
        return service, first, last


def test_slow_transfers_make_the_agent_retest_its_link_and_announce_it_once(
    tmp_path: Path,
) -> None:
    _, first, last = asyncio.run(_slow_down(tmp_path, tested=0.01))
    assert last.ts > first.ts and last.session == first.session
    assert last.link_bandwidth_bps == 0.01 * first.link_bandwidth_bps


@pytest.mark.parametrize("tested", [1.3, 3.0])
def test_a_link_that_does_not_test_slower_is_not_announced_again(
    tmp_path: Path, tested: float
) -> None:
    # the transfers slowed down elsewhere (a slower sender, a busy host), or the test
    # says faster while the transfers say slower (noise): nothing changes
    service, first, last = asyncio.run(_slow_down(tmp_path, tested=tested))
    assert last == first and service.measured.link_bandwidth_bps == first.link_bandwidth_bps


def test_link_watch_off() -> None:
    config = agent_config("a1", Path("/nonexistent"), link_watch_s=0)
    assert AgentService(config, transport=MemoryBroker().factory).linkwatch is None


def test_idle_trim_trims_once_per_idle_spell_after_work() -> None:
    resident = [500]
    trim = IdleTrim(trim=lambda: resident.__setitem__(0, 400), rss=lambda: resident[0])
    assert trim.tick(holding=0, done=0) is None  # nothing ran yet
    assert trim.tick(holding=3, done=10) is None  # busy: memory in use stays
    assert trim.tick(holding=0, done=12) is None  # a gap between requests, not idle
    assert trim.tick(holding=0, done=12) == 100  # a whole tick without a request
    assert trim.tick(holding=0, done=12) is None  # still the same idle spell
    resident[0] = 450
    assert trim.tick(holding=0, done=13) is None
    assert trim.tick(holding=1, done=13) is None  # one arrived (e.g. waits for its batch)
    assert trim.tick(holding=0, done=13) == 50
    assert (trim.trims, trim.released_bytes) == (2, 150)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
    or not ctypes.util.find_library("c"),
    reason="malloc_trim is glibc's",
)  # fmt: skip
def test_idle_trim_gives_freed_heap_memory_back_on_glibc() -> None:
    # 64 KiB blocks come from the heap (below the mmap threshold); every 16th one kept
    # stops the heap's top from shrinking by itself, so the rest stays resident until trimmed
    blocks = [bytearray(b"x" * 65536) for _ in range(3000)]  # ~190 MiB, touched
    kept = blocks[::16]
    del blocks
    trim = IdleTrim()
    trim.tick(holding=0, done=1)
    released = trim.tick(holding=0, done=1)
    assert released is not None and released > 100 * 2**20, released
    assert rss_bytes() > 0 and len(kept) == 188


@pytest.mark.parametrize(
    ("suspect", "bandwidth", "rtt", "announced"),
    [
        ("slower", 0.5, 1.0, True),
        ("slower", 1.0, 2.0, True),  # round trip up
        ("slower", 3.0, 1.0, False),  # faster while transfers said slower: noise
        ("faster", 3.0, 1.0, True),
        ("faster", 1.0, 0.5, True),  # round trip down
        ("faster", 0.5, 1.0, False),
        ("faster", 1.2, 1.0, False),  # within the planner's 1.5x
    ],
)
def test_a_retest_announces_only_a_move_the_way_the_transfers_said(
    suspect: str, bandwidth: float, rtt: float, announced: bool
) -> None:
    before = Measured(gflops=5.0, link_rtt_s=0.01, link_bandwidth_bps=10e6)
    watch = LinkWatch(LinkWatchConfig(), now=0.0)
    watch.rates, watch.suspect = [1e6], suspect
    stub = StubLink(LinkTest(None, "probe"), bandwidth * 10e6, rtt * 0.01)  # type: ignore[arg-type]
    config = agent_config("a1", Path("/nonexistent"))
    now = asyncio.run(retest_link(watch, time.time, before, stub, config))
    assert (now is not None) == announced
    if now is not None:
        assert (now.link_bandwidth_bps, now.link_rtt_s) == (bandwidth * 10e6, rtt * 0.01)
        assert now.gflops == 5.0
