"""agent/linkwatch.py: receive rates per window against a baseline, with hold and cooldown;
and the link test it asks for (agent/probe.py) on a busy link."""

from __future__ import annotations

import asyncio

from edgeslice.agent.linkwatch import LinkWatch, LinkWatchConfig, busy_time
from edgeslice.agent.probe import LinkTest

CFG = LinkWatchConfig(window_s=5.0, baseline_windows=3, hold_windows=3, cooldown_s=60.0)
MB = 1_000_000


def feed(watch: LinkWatch, start: float, rate_bps: float, windows: int) -> tuple[float, list[bool]]:
    """``windows`` busy windows from ``start``: 4 transfers of 400 kB per window at
    ``rate_bps``, one after the other; a tick at each window's end. (end, due per tick)"""
    due = []
    t = start
    for _ in range(windows):
        for i in range(4):
            first = t + i * 1.0
            watch.observe(400_000, first, first + 400_000 / rate_bps)
        t += CFG.window_s
        due.append(watch.due(t))
    return t, due


def test_busy_time_is_the_union_of_the_intervals() -> None:
    assert busy_time([(0, 1), (0.5, 2), (3, 4)]) == 3.0
    assert busy_time([(3, 4), (0, 10)]) == 10.0
    assert busy_time([]) == 0.0


def test_overlapping_transfers_share_the_link_time() -> None:
    watch = LinkWatch(CFG, now=0.0)
    for _ in range(2):  # two transfers of 1 MB arriving together over the same 2 s
        watch.observe(MB, 1.0, 3.0)
    watch.due(5.0)
    assert watch.rates == [1 * MB]  # 2 MB over 2 s of link time, not 0.5 MB/s each


def test_baseline_then_a_sustained_drop_asks_for_one_test() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, due = feed(watch, 0.0, 20 * MB, 3)  # baseline
    assert watch.baseline_bps is not None and abs(watch.baseline_bps - 20 * MB) < 1
    t, due = feed(watch, t, 20 * MB, 10)
    assert not any(due)
    t, due = feed(watch, t, 0.5 * MB, 3)  # the link drops 40x
    assert due == [False, False, True]
    t, due = feed(watch, t, 0.5 * MB, 6)  # still slow, not tested yet: no second request
    assert not any(due[:2])


def test_the_cooldown_holds_a_test_back_and_a_test_resets_the_baseline() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, due = feed(watch, 0.0, 20 * MB, 3)
    t, due = feed(watch, t, 1 * MB, 5)  # slow from the 4th window on: 40 s after the test
    assert not any(due)
    t, due = feed(watch, t, 1 * MB, 4)  # cooldown (60 s) over at t=60: now it asks
    assert True in due and watch.tests == 1
    watch.tested(t)
    assert watch.baseline_bps is None and watch.slow == 0
    t, due = feed(watch, t, 1 * MB, 30)  # slow for good: the new baseline is the slow rate
    assert not any(due) and watch.tests == 1
    assert watch.baseline_bps is not None and abs(watch.baseline_bps - 1 * MB) < 1


def test_one_good_window_restarts_the_count_and_quiet_windows_count_neither_way() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, _ = feed(watch, 0.0, 20 * MB, 15)
    t, due = feed(watch, t, 1 * MB, 2)
    t, due2 = feed(watch, t, 20 * MB, 1)  # a good window: the slow count starts over
    t, due3 = feed(watch, t, 1 * MB, 2)
    assert not any(due + due2 + due3)
    assert not watch.due(t + 30.0)  # nothing arrived for 30 s: quiet, no verdict
    watch.observe(10_000, t + 31, t + 32)  # too little to judge
    assert not watch.due(t + 36.0)
    assert watch.slow == 2
    _, due4 = feed(watch, t + 36.0, 1 * MB, 1)  # the third slow busy window
    assert due4 == [True]


def test_single_chunk_and_instant_transfers_are_ignored() -> None:
    watch = LinkWatch(CFG, now=0.0)
    watch.observe(0, 1.0, 2.0)
    watch.observe(MB, 2.0, 2.0)
    watch.due(5.0)
    assert watch.rates == []


def test_scaled_config() -> None:
    cfg = LinkWatchConfig.scaled(2.0)
    assert (cfg.window_s, cfg.cooldown_s, cfg.hold_windows) == (2.0, 24.0, 3)


def test_a_drop_while_the_baseline_forms_is_noticed_once_two_windows_were_usual() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, _ = feed(watch, 0.0, 20 * MB, 2)
    t, due = feed(watch, t, 1 * MB, 20)  # median(20, 20, 1) = 20: the usual rate is known
    assert True in due and watch.tests == 1
    watch = LinkWatch(CFG, now=0.0)
    t, _ = feed(watch, 0.0, 20 * MB, 1)
    t, due = feed(watch, t, 1 * MB, 20)  # median(20, 1, 1) = 1: nothing to compare against
    assert not any(due)


def test_the_baseline_is_the_best_sustained_rate_over_the_recent_windows() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, _ = feed(watch, 0.0, 10 * MB, 3)
    t, _ = feed(watch, t, 100 * MB, 1)  # one lucky window does not raise it
    assert watch.baseline_bps is not None and abs(watch.baseline_bps - 10 * MB) < 1
    t, _ = feed(watch, t, 4 * MB, 25)  # slow for longer than the history (test held back)
    assert watch.baseline_bps is not None and abs(watch.baseline_bps - 4 * MB) < 1


def test_a_link_that_got_faster_again_is_tested_again() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, _ = feed(watch, 0.0, 20 * MB, 3)
    t, due = feed(watch, t, 1 * MB, 12)
    assert True in due and watch.suspect == "slower"
    watch.tested(t)
    t, due = feed(watch, t, 1 * MB, 12)  # the reference after the test: 1 MB/s
    assert not any(due) and watch.reference_bps is not None
    assert abs(watch.reference_bps - 1 * MB) < 1
    t, due = feed(watch, t, 20 * MB, 3)  # cooldown over (60 s): 3 windows above 2 MB/s
    assert due == [False, False, True] and watch.suspect == "faster" and watch.tests == 2
    watch.tested(t)
    t, due = feed(watch, t, 20 * MB, 30)  # fast for good: the new reference, no more tests
    assert not any(due) and watch.tests == 2


def test_a_test_held_back_comes_once_it_may_and_windows_close_meanwhile() -> None:
    watch = LinkWatch(CFG, now=0.0)
    t, _ = feed(watch, 0.0, 20 * MB, 12)
    for _ in range(6):  # slow, but the caller may not test (its CPU is the bottleneck)
        watch.observe(400_000, t + 1.0, t + 1.4)
        t += CFG.window_s
        assert not watch.due(t, may_test=False)
        assert len(watch._spans) == 0  # each window closed: nothing piles up
    assert watch.slow == 6
    assert watch.due(t + 0.1)  # the first tick that may test


class _EchoLink:
    """A broker that echoes probe payloads back: small ones late (queued behind traffic),
    large ones soon."""

    def __init__(self) -> None:
        self.test: LinkTest | None = None

    async def publish(self, topic: str, payload: bytes, **_: object) -> None:
        assert self.test is not None
        delay = 0.05 if len(payload) <= 8 else 0.005
        asyncio.get_running_loop().call_later(delay, self.test.on_probe, payload)


def test_a_link_test_whose_probes_queued_longer_than_its_bulk_part_stays_sane() -> None:
    async def scenario() -> tuple[float, float]:
        echo = _EchoLink()
        test = LinkTest(echo, "probe")  # type: ignore[arg-type]
        echo.test = test
        return await test.run(256 * 1024)

    rtt, bps = asyncio.run(scenario())
    assert 0.04 < rtt < 0.5
    # the bulk part took ~5 ms, less than a small probe: at most 2 x size / its time
    assert bps <= 2 * 256 * 1024 / 0.005, bps
