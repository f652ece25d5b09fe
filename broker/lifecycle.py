"""Runs a long-lived service (agent, planner) until SIGTERM or SIGINT asks it to stop.

Both services take an ``asyncio.Event`` and shut down cleanly once it is set (the agent
drains first: it finishes the requests it holds; both publish their offline status); this
is the one place that turns the signals into that event. A second signal means "now":
the service's task is cancelled, so it skips what is left of its drain (its ``finally``
still says offline) and this returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_until_signalled(
    run: Callable[[asyncio.Event], Awaitable[None]],
    pending: Callable[[], bool] | None = None,
) -> None:
    """Await ``run(stop)``; the first SIGTERM/SIGINT sets ``stop``, a second one cancels it.

    ``pending`` says whether a stop signal already arrived before this coroutine could
    install its handlers (while ``asyncio.run`` was still building the loop, say): a
    caller records signals with a plain flag across that hand-over instead of raising
    from a signal handler mid-construction, and the stop is honoured here.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run(stop))
    forced = False

    def on_signal(sig: signal.Signals) -> None:
        nonlocal forced
        if not stop.is_set():
            log.info("%s: stopping (send it again to stop at once)", sig.name)
            stop.set()
        elif not forced:
            log.warning("second %s: stopping at once", sig.name)
            forced = True
            task.cancel()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    if pending is not None and pending():
        on_signal(signal.SIGTERM)
    try:
        await task
    except asyncio.CancelledError:
        if not forced or not task.cancelled():
            raise  # cancelled from outside, not by a second signal
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
