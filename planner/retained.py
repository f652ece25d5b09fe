"""What the planner keeps retained on the broker, and publishing it again after a reconnect.

The planner's word to the fleet is three kinds of retained message: its status
(``planner/status``), the plan (``plans/{model}``) and one ``assignment/desired`` per
agent. :class:`RetainedState` remembers the last payload of each it published and
:meth:`RetainedState.republish` sends them all again: a broker restarted without
persistence has forgotten them, and agents and clients must find them again without
anyone restarting the planner. Re-sending a desired assignment is harmless: an agent
ignores a redelivery of the plan version it already runs.

The planner also listens to its own ``plans/{model}`` and ``assignment/desired`` topics
(:meth:`RetainedState.observe`). When what the broker holds there is not what the planner
last published -- malformed bytes, another plan id or version, a clear it did not make --
it publishes its own again, at most once per :data:`REPAIR_INTERVAL_S` per topic and after
a short settle (its own earlier publishes echo back in order), logging the first repair of
each topic and counting the rest: retained garbage is not left for late joiners to read
until the next re-plan.

:func:`desired_assignments` and :func:`plan_stages` turn a partition and its built
artifacts into the wire messages (pure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    PlanMessage,
    PlannerStatus,
    PlanStage,
    StageAssignment,
)
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.transport import Transport
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import CostParams, Device, ModelCost, stage_period_s
from edgeslice.planner.partition import Plan

log = logging.getLogger(__name__)

REPAIR_INTERVAL_S = 1.0  # at most one re-publish per topic per interval
SETTLE_S = 0.2  # wait for the echoes of the planner's own recent publishes before judging


def _identity(payload: bytes, kind: Kind) -> tuple[str, int, bool]:
    """(plan id, version, ready) of a plan or desired-assignment payload; raises DecodeError."""
    if kind is Kind.PLAN:
        plan = codec.decode(payload, PlanMessage)
        return plan.plan_id, plan.plan_version, plan.ready
    desired = codec.decode(payload, AssignmentDesired)
    return desired.plan_id, desired.plan_version, True


def foreign(held: bytes, seen: bytes, kind: Kind) -> str:
    """Why ``seen`` (what the broker holds) is not ``held`` (what the planner last published
    on a plan or desired-assignment topic); "" when it is. Pure.

    A re-encoding of the same plan id, version (and readiness) is the planner's own.
    """
    if seen == held:
        return ""
    if not seen:
        return "cleared by someone else"
    if not held:
        return "a message where the planner cleared it"
    try:
        theirs, ours = _identity(seen, kind), _identity(held, kind)
    except EdgesliceError as exc:
        return f"malformed ({f'{exc}'[:120]})"
    if theirs == ours:
        return ""
    return "plan {} v{} (ready={}), not the planner's {} v{} (ready={})".format(*theirs, *ours)


def describe_plan(plan: PlanMessage) -> str:
    """One line per published plan: version, model, stages with their agents, prediction."""
    if not plan.stages:
        return f"plan v{plan.plan_version} for {plan.model}: withdrawn ({plan.reason})"
    stages = " ".join(
        f"[{s.start_segment}-{s.end_segment - 1} on {','.join(s.agents)}]" for s in plan.stages
    )
    count = len(plan.stages)
    saturated = plan.predicted_saturated_period_s
    full = f" ({saturated * 1e3:.1f} batched)" if 0 < saturated < plan.predicted_period_s else ""
    no_batch = [str(s.stage) for s in plan.stages if s.max_batch == 1]
    return (
        f"plan v{plan.plan_version} for {plan.model}: {count} stage{'s' * (count != 1)} "
        f"{stages}; predicted {plan.predicted_period_s * 1e3:.1f} ms/req{full}, "
        f"{plan.predicted_latency_s * 1e3:.1f} ms latency ({plan.objective})"
        + (f"; stages {','.join(no_batch)} not batched (it slows them)" if no_batch else "")
    )


def summarize(plan: PlanMessage | None, min_agents: int) -> str:
    """The planner status' one-line summary of the plan it serves."""
    if plan is None:
        return f"waiting for {min_agents} agent(s)"
    if not plan.stages:
        return f"v{plan.plan_version} withdrawn: {plan.reason}"
    stages = ", ".join(f"{s.stage}:{'+'.join(s.agents)}" for s in plan.stages)
    state = "ready" if plan.ready else "loading"
    return f"v{plan.plan_version} {state}: {stages}"


def withdrawn_plan(
    model: str, plan_id: str, version: int, config: PlannerConfig, reason: str
) -> PlanMessage:
    """The plan published when none is possible: no stages, and why (clients fail at once)."""
    return PlanMessage(
        model=model,
        plan_id=plan_id,
        plan_version=version,
        objective=config.objective,
        strategy=config.strategy,
        stages=[],
        ready=False,
        ts=time.time(),
        reason=reason,
    )


def desired_assignments(plan: Plan, artifacts: Sequence[Any]) -> dict[str, list[StageAssignment]]:
    """Agent -> the stages it should run under ``plan`` (artifacts in stage order)."""
    wanted: dict[str, list[StageAssignment]] = {}
    for stage, art in zip(plan.stages, artifacts, strict=True):
        for agent_id in stage.agents:
            wanted.setdefault(agent_id, []).append(
                StageAssignment(
                    stage=stage.index,
                    artifact=art.sha256,
                    size=art.size,
                    start_segment=stage.start,
                    end_segment=stage.end,
                    input_specs=[s.to_wire() for s in art.input_specs],
                    output_specs=[s.to_wire() for s in art.output_specs],
                    max_batch=stage.max_batch,
                )
            )
    return wanted


def plan_stages(
    plan: Plan,
    artifacts: Sequence[Any],
    cost: ModelCost,
    devices: Sequence[Device],
    params: CostParams,
) -> list[PlanStage]:
    """The published stages of ``plan``: segments, replicas, artifacts and predictions."""
    by_id = {d.agent_id: d for d in devices}
    return [
        PlanStage(
            stage=s.index,
            start_segment=s.start,
            end_segment=s.end,
            agents=list(s.agents),
            artifact=art.sha256,
            predicted_compute_s=s.compute_s,
            predicted_transfer_s=s.in_transfer_s,
            out_bytes=cost.segments[s.end - 1].out_bytes,
            replica_period_s=[
                stage_period_s(cost, s.start, s.end, by_id[a], params) for a in s.agents
            ],
            param_bytes=art.param_bytes,
            max_batch=s.max_batch,
        )
        for s, art in zip(plan.stages, artifacts, strict=True)
    ]


class RetainedState:
    """The planner's retained messages, as last published (see the module docstring)."""

    def __init__(self, client: Transport, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.status: bytes | None = None
        self.plan: tuple[str, bytes] | None = None  # (topic, payload); b"" = cleared
        self.desired: dict[str, bytes] = {}  # agent -> payload; b"" = cleared
        self.seen: dict[str, bytes] = {}  # topic -> what the broker last said it holds
        self.repairs: dict[str, int] = {}  # topic -> re-publishes over foreign payloads
        self._repaired_at: dict[str, float] = {}  # topic -> monotonic time of the last one
        self._checks: dict[str, asyncio.TimerHandle] = {}  # topic -> pending check
        self._publishing: set[asyncio.Task[None]] = set()

    async def publish_status(self, status: PlannerStatus, timeout: float | None = 30.0) -> None:
        self.status = codec.encode(status)
        await self.client.publish(
            self.topics.planner_status(), self.status, qos=1, retain=True, timeout=timeout
        )

    async def publish_plan(self, plan: PlanMessage) -> None:
        topic = self.topics.plan(plan.model)
        self.plan = (topic, codec.encode(plan))
        await self.client.publish(topic, self.plan[1], qos=1, retain=True)

    async def clear_plan(self, model: str, timeout: float | None = 30.0) -> None:
        topic = self.topics.plan(model)
        self.plan = (topic, b"")
        await self.client.publish(topic, b"", qos=1, retain=True, timeout=timeout)

    def adopt_desired(self, agent_id: str, payload: bytes) -> None:
        """A desired assignment retained by an earlier planner that this one now owns."""
        self.desired[agent_id] = payload

    async def publish_desired(self, agent_id: str, payload: bytes) -> None:
        """Publish (``payload``) or clear (``b""``) one agent's desired assignment."""
        self.desired[agent_id] = payload
        topic = self.topics.assignment_desired(agent_id)
        await self.client.publish(topic, payload, qos=1, retain=True)

    async def publish_assignments(
        self,
        plan_id: str,
        version: int,
        model: str,
        wanted: dict[str, list[StageAssignment]],
        usable: frozenset[str],
    ) -> None:
        """Every agent's desired assignment for a new plan version; agents that are gone
        have theirs cleared, so they do not load a stale plan when they come back."""
        for agent_id in sorted(set(self.desired) | usable | set(wanted)):
            if agent_id not in usable and agent_id not in wanted:
                if self.desired.get(agent_id) != b"":
                    await self.publish_desired(agent_id, b"")
                continue
            desired = AssignmentDesired(
                agent_id=agent_id,
                plan_id=plan_id,
                plan_version=version,
                model=model,
                stages=wanted.get(agent_id, []),
                ts=time.time(),
            )
            await self.publish_desired(agent_id, codec.encode(desired))

    async def republish(self) -> None:
        """Everything again, after a (re)connect: status first, then assignments, then plan."""
        started = time.perf_counter()
        if self.status is not None:
            await self.client.publish(self.topics.planner_status(), self.status, qos=1, retain=True)
        for agent_id, payload in sorted(self.desired.items()):
            topic = self.topics.assignment_desired(agent_id)
            await self.client.publish(topic, payload, qos=1, retain=True)
        if self.plan is not None:
            await self.client.publish(self.plan[0], self.plan[1], qos=1, retain=True)
        log.info(
            "planner re-published its retained state (%d assignments%s) in %.3fs",
            len(self.desired),
            ", plan" if self.plan is not None else "",
            time.perf_counter() - started,
        )

    # -- what the broker holds on our topics --------------------------------------
    def held(self, topic: str) -> tuple[Kind, bytes] | None:
        """What the planner last published on ``topic`` (None: not one of its topics)."""
        if self.plan is not None and topic == self.plan[0]:
            return Kind.PLAN, self.plan[1]
        parsed = self.topics.parse(topic)
        if parsed.kind is Kind.ASSIGNMENT_DESIRED and parsed.agent_id in self.desired:
            return Kind.ASSIGNMENT_DESIRED, self.desired[parsed.agent_id]
        return None

    def observe(self, topic: str, payload: bytes) -> None:
        """A message on a topic the planner keeps retained: schedule a repair check if it is
        not the planner's own (module docstring). Call from the event loop."""
        held = self.held(topic)
        if held is None:
            return
        self.seen[topic] = payload
        if topic in self._checks or not foreign(held[1], payload, held[0]):
            return
        now = time.monotonic()
        delay = max(SETTLE_S, self._repaired_at.get(topic, -1e9) + REPAIR_INTERVAL_S - now)
        self._checks[topic] = asyncio.get_running_loop().call_later(delay, self._check, topic)

    def _check(self, topic: str) -> None:
        self._checks.pop(topic, None)
        held, seen = self.held(topic), self.seen.get(topic)
        why = foreign(held[1], seen, held[0]) if held is not None and seen is not None else ""
        if held is None or not why:
            return  # our own publish arrived meanwhile
        self._repaired_at[topic] = time.monotonic()
        count = self.repairs[topic] = self.repairs.get(topic, 0) + 1
        (log.warning if count == 1 else log.debug)(
            "planner re-publishes its retained %s: the broker held %s (repair %d of this topic)",
            topic,
            why,
            count,
        )
        task = asyncio.create_task(self._republish_one(topic, held[1]))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _republish_one(self, topic: str, payload: bytes) -> None:
        try:
            await self.client.publish(topic, payload, qos=1, retain=True)
        except EdgesliceError as exc:  # the broker is away: the reconnect re-publishes all
            log.warning("planner could not re-publish %s: %s", topic, exc)

    def cancel(self) -> None:
        """Stop pending repair checks and re-publishes (the planner is stopping)."""
        for handle in self._checks.values():
            handle.cancel()
        self._checks.clear()
        for task in self._publishing:
            task.cancel()
