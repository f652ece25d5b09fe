"""Notices that the agent's link changed from what it receives, and says when to test it.

An agent measures its link at start-up (agent/probe.py's :class:`LinkTest`) and announces
the figure in ``info``; the planner prices every hop to and from the agent with it. A link
that degrades later would only be seen on ``cmd/calibrate``, so the data plane reports each
transfer it receives in several chunks (:meth:`LinkWatch.observe`: the bytes after its
first chunk and the time from the first chunk to the last), and the agent asks
:meth:`LinkWatch.due` on every telemetry tick whether to run the link test again.

* **Rate per window** (``window_s``): the bytes received after each transfer's first
  chunk, over the time at least one transfer was arriving (the union of their arrival
  intervals), so transfers arriving together share the link's time instead of each
  looking slow. A window with fewer than ``min_transfers`` such transfers or
  ``min_bytes`` is *quiet* and counts neither way (no traffic, no evidence).
* **Baseline**: the best rate the link sustained lately: the highest median of
  ``baseline_windows`` consecutive busy windows among the last ``history`` busy windows
  since the last link test (so one lucky window does not set it, and the slow windows
  after a drop do not pull it down). Not the announced figure: what a transfer's arrival
  shows is also bounded by the sender's link and the broker, so only a change against
  what this agent itself saw says something about its own link. A link that slows down
  before two of the first three busy windows after a test saw its usual rate gives no
  baseline above the slow rate, and is not noticed until the next test.
* **Slower**: ``hold_windows`` busy windows in a row below ``ratio`` x the baseline (one
  busy window at or above it starts the count again).
* **Faster**: the *reference* is the first baseline after a test (the median of its
  first ``baseline_windows`` busy windows); ``hold_windows`` busy windows in a row above
  reference / ``ratio``. So a link announced slower (or tested slower on a host too busy
  at that moment) is tested, and announced faster, again once transfers show it.
* Either, and at least ``cooldown_s`` since the last link test: :meth:`due` says yes
  once. The agent tests its link and calls :meth:`tested`, which starts a new baseline,
  so a link that is slow for good is tested once, not every window (no flapping). It
  re-announces only a link the test finds changed as much as the planner cares about
  (agent/announce.py's ``retest_link``: bandwidth or round trip 1.5x the way the
  transfers said, in two tests): a sender that got slower, or a host too busy to read
  its socket for a while, costs a test that finds the link as announced, changes
  nothing, and starts a new baseline.

Pure and clock-driven (times are the caller's clock, e.g. the data plane's); the agent
service does the test and the announcement.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkWatchConfig:
    window_s: float = 5.0
    baseline_windows: int = 3
    history: int = 20  # busy windows the baseline looks back over
    hold_windows: int = 3
    ratio: float = 0.5  # a busy window below ratio x baseline counts as slow
    cooldown_s: float = 60.0  # least time between two link tests
    min_transfers: int = 1
    min_bytes: int = 128 * 1024

    @classmethod
    def scaled(cls, window_s: float) -> LinkWatchConfig:
        """The defaults with every time scaled to ``window_s`` (cooldown: 12 windows)."""
        return cls(window_s=window_s, cooldown_s=12 * window_s)


class LinkWatch:
    """Receive rates per window against a baseline (see the module docstring)."""

    def __init__(self, config: LinkWatchConfig, now: float) -> None:
        self.config = config
        self.rates: list[float] = []  # busy windows' rates since the last test, newest last
        self.slow = 0  # busy windows in a row below ratio x baseline
        self.fast = 0  # busy windows in a row above reference / ratio
        self.reference_bps: float | None = None  # the first baseline since the last test
        self.suspect = ""  # why the last test was asked for: "slower" or "faster"
        self.tests = 0  # link tests this watch asked for
        self._spans: list[tuple[float, float]] = []
        self._bytes = 0
        self._window_start = now
        self._tested_at = now

    def observe(self, nbytes: int, first_at: float, last_at: float) -> None:
        """A transfer received: ``nbytes`` after its first chunk, arriving from ``first_at``
        (its first chunk) to ``last_at`` (its last)."""
        if nbytes <= 0 or last_at <= first_at:
            return
        self._spans.append((first_at, last_at))
        self._bytes += nbytes

    def due(self, now: float, may_test: bool = True) -> bool:
        """Close the window if it ended by ``now`` (call on every tick, so what it holds
        stays one window's worth); True once the link should be tested. ``may_test``
        False (the caller cannot test now: e.g. its CPU is the bottleneck) holds a due
        test back until a tick that may."""
        cfg = self.config
        if now - self._window_start >= cfg.window_s:  # ticks close windows: a few s apart
            self._close_window()
            self._window_start = now
        held = max(self.slow, self.fast) >= cfg.hold_windows
        if may_test and held and now - self._tested_at >= cfg.cooldown_s:
            self.suspect = "slower" if self.slow >= self.fast else "faster"
            self.slow = self.fast = 0
            self.tests += 1
            self._tested_at = now  # the cooldown holds even if no test follows
            return True
        return False

    def tested(self, now: float) -> None:
        """The link was tested (by this watch's request or a ``cmd/calibrate``): start over."""
        self._tested_at = now
        self.slow = self.fast = 0
        self.rates = []
        self.reference_bps = None

    @property
    def baseline_bps(self) -> float | None:
        """The best rate sustained lately (module docstring); None before enough windows."""
        k = self.config.baseline_windows
        runs = [self.rates[i : i + k] for i in range(len(self.rates) - k + 1)]
        return max((statistics.median(run) for run in runs), default=None)

    def _close_window(self) -> None:
        spans, nbytes = self._spans, self._bytes
        self._spans, self._bytes = [], 0
        cfg = self.config
        if len(spans) < cfg.min_transfers or nbytes < cfg.min_bytes:
            return  # quiet: neither evidence of a slow link nor of a good one
        rate = nbytes / busy_time(spans)
        baseline = self.baseline_bps
        self.rates = [*self.rates[1 - cfg.history :], rate]
        if baseline is not None:
            self.slow = self.slow + 1 if rate < cfg.ratio * baseline else 0
        if self.reference_bps is not None:
            self.fast = self.fast + 1 if rate * cfg.ratio > self.reference_bps else 0
        elif len(self.rates) >= cfg.baseline_windows:
            self.reference_bps = self.baseline_bps


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Length of the union of the intervals ``spans`` (each start < end)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total
