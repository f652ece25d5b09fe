"""broker/lifecycle.py: a stop signal that arrived before the handlers were installed
is honoured, not lost (an agent told to stop while asyncio.run built its loop)."""

from __future__ import annotations

import asyncio

from edgeslice.broker.lifecycle import run_until_signalled


def test_a_pending_signal_stops_the_service() -> None:
    seen: list[str] = []

    async def service(stop: asyncio.Event) -> None:
        await asyncio.wait_for(stop.wait(), timeout=30)  # only a set stop ends this
        seen.append("stopped")

    asyncio.run(run_until_signalled(service, pending=lambda: True))
    assert seen == ["stopped"]


def test_no_pending_signal_leaves_the_service_running_until_it_returns() -> None:
    async def service(stop: asyncio.Event) -> None:
        await asyncio.sleep(0)
        assert not stop.is_set()

    asyncio.run(run_until_signalled(service, pending=lambda: False))
