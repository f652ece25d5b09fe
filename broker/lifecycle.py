"""Runs a long-lived service (agent, planner) until SIGTERM or SIGINT asks it to stop.

Both services take an ``asyncio.Event`` and shut down cleanly once it is set (publishing
their offline status); this is the one place that turns the signals into that event.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


async def run_until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Await ``run(stop)``; SIGTERM/SIGINT set ``stop`` instead of killing the process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)
