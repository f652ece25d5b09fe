"""Graceful drain: when a stopping agent may stop taking requests, and waiting for its work.

On SIGTERM/SIGINT the agent (agent/service.py) publishes ``status`` ``draining`` and keeps
serving until no client will route a *new* request to it, then refuses new requests
(:class:`~edgeslice.broker.protocol.errors.AgentDrainingError`, retryable, code
``draining``) and finishes what it holds. Clients route by the newest *ready* plan of
``plans/{model}`` (a plan that is not ready yet makes them wait), so the moment comes when:

* the agent holds no stage at all (nothing can be routed to it), or
* there is no plan for its model (cleared: the planner stopped or withdrew it), or
* no planner is online (``planner/status``): nobody will publish a plan without it, so
  waiting would only delay the stop (clients keep the plan and retry elsewhere), or
* the newest plan is ready and names the agent in none of its stages.

:func:`traffic_moved` decides this from plain values; :class:`PlanWatch` follows the plan
of the model the agent serves (it subscribes as soon as an assignment names the model, so
the current plan is known before a stop signal comes). A drain timeout
(``--drain-timeout``) bounds the wait when the planner never publishes such a plan (it
crashed, or it is an older planner that keeps the agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import ONLINE, PlanMessage, PlannerStatus
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport


def traffic_moved(
    agent_id: str, plan: PlanMessage | None, holds_stages: bool, planner_online: bool
) -> str | None:
    """Why no new request will be routed to ``agent_id`` any more, or why waiting for that
    is pointless; None while the planner may still move requests away."""
    if not holds_stages:
        return "it holds no stage"
    if plan is None:
        return "no plan is published for its model"
    if not planner_online:
        return "no planner is online to re-plan"
    if plan.ready and not any(agent_id in stage.agents for stage in plan.stages):
        return f"plan {plan.plan_id} v{plan.plan_version} is ready without it"
    return None


class PlanWatch:
    """The current plan of the model this agent serves (``plans/{model}``, retained)."""

    def __init__(self, client: Transport, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.model = ""
        self.plan: PlanMessage | None = None
        self.planner_online = False
        self.changed = asyncio.Event()

    async def follow(self, model: str) -> None:
        """Watch ``model``'s plan from now on (the retained one arrives right away)."""
        if not model or model == self.model:
            return
        if self.model:
            await self.client.unsubscribe(self.topics.plan(self.model))
        else:
            await self.client.subscribe(self.topics.planner_status(), qos=1)
        self.model, self.plan = model, None
        await self.client.subscribe(self.topics.plan(model), qos=1)

    def on_plan(self, model: str, payload: bytes) -> None:
        """A ``plans/{model}`` message (empty: the plan was withdrawn); raises if malformed."""
        if model != self.model:
            return
        self.plan = codec.decode(payload, PlanMessage) if payload else None
        self.changed.set()

    def on_planner_status(self, payload: bytes) -> None:
        """``planner/status`` (empty: cleared); raises if malformed."""
        status = codec.decode(payload, PlannerStatus) if payload else None
        self.planner_online = status is not None and status.state == ONLINE
        self.changed.set()

    def moved(self, agent_id: str, holds_stages: bool) -> str | None:
        return traffic_moved(agent_id, self.plan, holds_stages, self.planner_online)

    async def wait_moved(
        self, agent_id: str, holds_stages: Callable[[], bool], timeout_s: float
    ) -> str:
        """Wait until :func:`traffic_moved` says so, at most ``timeout_s``; the reason."""
        deadline = time.monotonic() + timeout_s
        while (why := self.moved(agent_id, holds_stages())) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"drain timeout ({timeout_s:g} s) with plan still naming it"
            self.changed.clear()
            with contextlib.suppress(TimeoutError):  # look again now and then too
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return why


async def wait_idle(in_flight: Callable[[], int], timeout_s: float) -> int:
    """Wait until nothing is queued, computing or being sent; what is left after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (left := in_flight()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return left
