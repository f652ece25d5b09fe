"""Owns the hand-off from paho's network thread to the asyncio loop: batched, in order.

paho delivers every incoming message and every PUBACK on its own thread. Handing each one
over with ``loop.call_soon_threadsafe`` costs a self-pipe write and a loop wake-up per
message: 256 of each for a 64 MiB activation in 256 KiB chunks, on the receiver and (for the
PUBACKs) on the sender. :class:`LoopHandoff` queues calls in a deque (appends are thread-safe)
and wakes the loop only when no drain is already scheduled, so a burst that arrives while the
loop is busy costs one wake-up. Calls run on the loop in the order they were handed over.

Why no wake-up is lost: the paho side appends, *then* reads ``_scheduled``; the drain clears
``_scheduled``, *then* pops. A call that saw ``_scheduled`` set was appended before the flag
was cleared, so the drain that cleared it pops it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class LoopHandoff:
    """Calls from any thread, run on one asyncio loop in order, one wake-up per batch."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._scheduled = False
        self.wakeups = 0  # loop wake-ups requested so far (tests, benchmarks)
        self.handed = 0  # calls handed over so far

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run calls on ``loop`` from now on (``connect()`` binds the running loop)."""
        self._loop = loop

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon; safe from any thread, never raises. Dropped when
        no loop is bound or it is closed (shutdown), as ``call_soon_threadsafe`` would."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self._calls.append((fn, args))
        self.handed += 1
        if self._scheduled:
            return
        self._scheduled = True
        self.wakeups += 1
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed in between: nothing will run these
            self._scheduled = False

    def _drain(self) -> None:
        """On the loop: run what was handed over up to now (later calls scheduled a drain of
        their own when they found ``_scheduled`` cleared)."""
        self._scheduled = False
        calls = self._calls
        for _ in range(len(calls)):
            fn, args = calls.popleft()
            try:
                fn(*args)
            except Exception:  # one bad call must not strand the rest of the batch
                log.exception("hand-off call %r failed", fn)
