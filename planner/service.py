"""The planner service: tracks the fleet, plans, publishes assignments and serves artifacts.

Start-up loads and prices the model, connects, rebuilds its view from the retained topics
and adopts a plan retained by an earlier planner when it is still valid (same model,
strategy, compression; its agents online and ready for it; its cut rebuilds to the same
artifact shas: planner/startup.py), serving it on under the same plan id and version;
otherwise the plan is cleared and a new one made, numbered on from it.

Re-planning follows planner/replan.py: a join waits for ``replan_delay_s`` of quiet, a
leave (or an error from an agent of a new plan) re-plans at once, ``min_agents`` gates
only the first plan, a failed agent sits out with a growing back-off, an agent busy far
above the rest for long is planned with its effective rate. A plan (planner/planning.py
decides it): the partitioner picks stages and agents, :func:`planner.stages.build_stages`
cuts and signs artifacts (cached per cut); this service publishes it -- agents get their
retained ``assignment/desired``, ``plans/{model}`` goes out with ``ready=False`` and again
with ``ready=True`` once every agent reports ready. A re-plan giving the layout already
served publishes nothing; when no plan is possible the plan is **withdrawn** (no stages, a
``reason``: clients fail at once saying why).

After every (re)connect all retained state is published again, and whatever else the
broker comes to hold on the planner's plan and assignment topics (garbage, a foreign plan)
is replaced by the planner's own within a second or so (planner/retained.py). The
planner does not plan while its connection is down (a plan decided across a reconnect is
dropped), and after a reconnect the agents of the served plan get ``reconnect_grace_s``
to re-announce before it re-plans without them or withdraws the plan: a broker restarted
without persistence holds no agent status yet, and the last wills it sent as it stopped
say nothing about agents that are reconnecting at the same moment. On
stop the plan is kept (agents serve on; a restarted planner adopts it) and the status says
``offline``; ``clear_plan_on_exit`` clears it instead (the fleet is retired).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from edgeslice.broker.client import Will
from edgeslice.broker.fleetkey import key_fingerprint, load_signing_key
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import OFFLINE, ONLINE, PlanMessage, PlannerStatus
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.planner import planning, replan, retained
from edgeslice.planner.artifact_server import ArtifactServer
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.registry import Registry
from edgeslice.planner.replan import JOIN, LEAVE
from edgeslice.planner.retained import describe_plan
from edgeslice.planner.startup import examine_retained, load_and_price

__all__ = ["PlannerService"]

log = logging.getLogger(__name__)


class PlannerService:
    """See the module docstring. ``await run(stop)``.

    ``transport`` opens the broker connection (default: MqttClient to ``config.broker``);
    ``on_plan`` is called with every new plan version as it is published.
    """

    def __init__(
        self,
        config: PlannerConfig,
        transport: TransportFactory | None = None,
        on_plan: Callable[[PlanMessage], None] | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.broker.namespace)
        self.registry = Registry(self.topics)
        self.key = load_signing_key(config.fleet_key_file)
        log.info("planner signs artifacts with fleet key %s", key_fingerprint(self.key))
        self.plan_id = uuid.uuid4().hex[:12]
        self.version = 0
        self.model_name = ""
        self.loaded: Any = None
        self.profile: Any = None
        self.cost: Any = None  # the profile's ModelCost with measured, timed segment costs
        self.pricing: Any = None  # --cost-model: planner/learnedcost.py's LearnedPricing
        self.plan_message: PlanMessage | None = None
        self.assigned: dict[str, list[int]] = {}
        self.served = False  # a plan was served: min_agents no longer applies
        self.schedule = replan.ReplanSchedule(config.replan_delay_s)
        self.backoff = replan.Backoff()
        self.loadshift = replan.LoadShift(config.load_shift)
        self.on_plan = on_plan
        self._wake = asyncio.Event()
        self._load_checked = 0.0
        self._empty_since: float | None = None  # when the last usable agent went away
        self.dropped = 0  # messages that could not be understood (malformed, foreign)
        self._exact: set[str] = set()  # agents subscribed to by exact topic (_follow)
        self._connects = 0  # (re)connects so far: a plan decided across one is dropped
        self._settle_until = 0.0  # monotonic: agents re-announce after a reconnect until then
        self._settle_timer: asyncio.TimerHandle | None = None  # re-plans when the grace ends
        self._settled_at = 0.0  # the _settle_until that timer is for
        self._heard: set[str] = set()  # agents whose status came since the last reconnect
        self.client = (transport or mqtt_transport(config.broker))(
            f"planner-{config.planner_id}-{uuid.uuid4().hex[:6]}",
            will=Will(self.topics.planner_status(), codec.encode(PlannerStatus(state=OFFLINE))),
            on_connect=self._on_connect,
        )
        self.retained = retained.RetainedState(self.client, self.topics)
        self.artifacts = ArtifactServer(self.client, self.topics)

    # -- lifecycle -------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if not await _unless_stopped(self._start_up(), stop):
            log.info("planner stopped during start-up")
            await self.client.close()
            return
        tasks = [asyncio.create_task(self._consume())]
        try:
            adopted = await self._adopt_or_clear()  # the retained view comes via _consume
            tasks.append(asyncio.create_task(self._planning_loop()))
            if not adopted:
                self._request(LEAVE)  # plan now on the agents already known
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            if self._settle_timer is not None:
                self._settle_timer.cancel()
            self.artifacts.cancel()
            self.retained.cancel()
            # bounded: on 3.11 a wait_for finishing as it is cancelled can eat the cancel
            await asyncio.wait(tasks, timeout=2.0)
            await self._shutdown()

    async def _start_up(self) -> None:
        """Load and price the model, then connect (a stop signal ends it: run)."""
        self.loaded, self.profile, self.cost = await asyncio.to_thread(
            load_and_price, self.config.model_spec, self.config.max_segments
        )
        self.model_name = self.loaded.name
        if self.config.cost_model:  # the learned estimator where it beat the timed model
            from edgeslice.planner.calibrate import load_pricing

            self.pricing = await asyncio.to_thread(
                load_pricing,
                self.config.cost_model,
                self.profile,
                self.loaded.example_inputs,
                self.config.refit_interval_s,
            )
        await self.client.connect()

    async def _adopt_or_clear(self) -> bool:
        """Serve on a valid plan retained by an earlier planner, else clear it (module doc)."""
        started = time.perf_counter()
        found = await examine_retained(
            self.registry.fleet,
            self.model_name,
            self.config.strategy,
            self.config.compression or "",
            self.loaded,
            self.profile,
            self.key,
            objective=self.config.objective,
            max_latency_s=self.config.max_latency_s,
        )
        plan = found.plan
        if plan is None:
            return False
        if found.problem is not None:
            log.info("planner not adopting retained plan v%d: %s", plan.plan_version, found.problem)
            self.version = plan.plan_version  # number on from it, under a new plan id
            # its stages may not be what this planner would cut: nobody routes by it now
            await self.retained.clear_plan(self.model_name)
            return False
        for art in found.artifacts:
            self.artifacts.add(art.sha256, art.data)
        self.plan_id, self.version, self.plan_message = plan.plan_id, plan.plan_version, plan
        self.assigned = {}
        for stage in plan.stages:
            for agent_id in stage.agents:
                self.assigned.setdefault(agent_id, []).append(stage.stage)
        for agent_id, payload in found.desired.items():
            self.retained.adopt_desired(agent_id, payload)
        self.retained.plan = (self.topics.plan(self.model_name), codec.encode(plan))
        self.served = True
        await self._publish_status()
        log.info(
            "planner adopted the retained plan v%d (%s) in %.2fs",
            self.version,
            self._summary(),
            time.perf_counter() - started,
        )
        return True

    async def _shutdown(self) -> None:
        if self.config.clear_plan_on_exit:
            # the fleet is retired: clients must not route by this plan any more
            await self.retained.clear_plan(self.model_name, timeout=5.0)
            summary = "stopped; plan cleared"
        else:
            summary = f"stopped; plan v{self.version} kept for its agents ({self._summary()})"
        status = dataclasses.replace(self._status(summary), state=OFFLINE)
        await self.retained.publish_status(status, timeout=5.0)
        await self.client.close()

    async def _on_connect(self) -> None:
        self._connects += 1
        self._heard.clear()
        t = self.topics
        for suffix in ("status", "info", "telemetry", "assignment/reported", "assignment/desired"):
            await self.client.subscribe(t.all_agents(suffix), qos=1)
        await self.client.subscribe(t.plan(self.model_name), qos=1)
        await self.client.subscribe(t.all_artifact_gets(), qos=1)
        if self.retained.status is None:
            await self._publish_status()
        else:  # a reconnect: the broker may have lost every retained message (no persistence)
            self._settle_until = time.monotonic() + self.config.reconnect_grace_s
            await self.retained.republish()
            self._request(LEAVE)  # look at the fleet again (_make_plan waits out the grace)

    def _status(self, summary: str = "") -> PlannerStatus:
        return PlannerStatus(
            state=ONLINE,
            planner_id=self.config.planner_id,
            model=self.model_name,
            plan_id=self.plan_id,
            plan_version=self.version,
            summary=summary or self._summary(),
            ts=time.time(),
        )

    async def _publish_status(self, summary: str = "") -> None:
        await self.retained.publish_status(self._status(summary))

    def _summary(self) -> str:
        return retained.summarize(self.plan_message, self.config.min_agents)

    # -- messages ----------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                parsed = self.topics.parse(msg.topic)
                if parsed.kind is Kind.ARTIFACT_GET:
                    self.artifacts.on_get(parsed.name)
                    continue
                if parsed.kind in (Kind.PLAN, Kind.ASSIGNMENT_DESIRED):
                    self.retained.observe(msg.topic, msg.payload)  # garbage: ours again
                before = self.registry.usable_ids()
                had = self.registry.agents.get(parsed.agent_id or "")
                info = had.info if had is not None else None
                self.registry.apply(msg.topic, msg.payload, time.time())
                if parsed.kind is Kind.STATUS and parsed.agent_id:
                    self._heard.add(parsed.agent_id)
                change = replan.classify(before, self.registry.usable_ids())
                if change is None and had and replan.capability_changed(info, had.info):
                    log.info("agent=%s re-measured itself: re-planning", parsed.agent_id)
                    change = JOIN  # priced at its new figures, after the quiet period
                if change is not None:
                    self._request(change)
                if parsed.kind is Kind.ASSIGNMENT_REPORTED:
                    await self._on_reported(parsed.agent_id)
                elif parsed.kind is Kind.TELEMETRY:
                    await self._follow(parsed.agent_id)
                    self._check_load()
                    if self.pricing is not None:  # serving timings: samples, periodic refit
                        self.pricing.learn(self.registry, self.plan_message, time.time())
            except Exception as exc:
                self.dropped += 1
                # garbage must not become a flood of log lines: the first 20, then every 1000th
                (log.warning if self.dropped <= 20 or self.dropped % 1000 == 0 else log.debug)(
                    "planner dropped message on %s (%d dropped so far): %s",
                    msg.topic,
                    self.dropped,
                    exc,
                )

    async def _follow(self, agent_id: str) -> None:
        """Subscribe to a live agent's retained topics by exact name, once.

        RabbitMQ's MQTT plugin delivers retained messages only to subscriptions without
        wildcards, so a planner that starts after its agents would never see their
        retained status and info through ``agents/+/...``; live telemetry names them.
        """
        if agent_id in self._exact:
            return
        self._exact.add(agent_id)
        t = self.topics
        for topic in (t.status(agent_id), t.info(agent_id), t.assignment_reported(agent_id)):
            await self.client.subscribe(topic, qos=1)

    def _request(self, change: str) -> None:
        """Ask for a re-plan: now for a leave, after a quiet period for a join."""
        now = time.monotonic()
        if change == LEAVE:
            self.schedule.leave(now)
        else:
            self.schedule.join(now)
        self._wake.set()

    def _check_load(self) -> None:
        """At most once a second: has an agent been busy far above the rest for long?"""
        now = time.time()
        if now - self._load_checked < 1.0 or not self.served:
            return
        self._load_checked = now
        loads = {a: self.registry.load(a, now) for a in self.registry.usable_ids()}
        plan = self.plan_message
        serving = plan is not None and plan.ready  # windows restart when it is (below)
        if self.loadshift.observe(loads, now, serving):
            log.info("planner load shift: derated agents now %s", self.loadshift.derated or "none")
            self._request(JOIN)

    async def _on_reported(self, agent_id: str) -> None:
        view = self.registry.agents.get(agent_id)
        plan = self.plan_message
        if view is None or view.reported is None or plan is None:
            return
        rep = view.reported
        if rep.plan_id != self.plan_id or rep.plan_version != self.version:
            return
        if rep.state == "error":
            wait = self.backoff.fail(agent_id, view.session, time.time())
            log.error(
                "agent=%s cannot run plan v%d: %s; re-planning without it, retried in %.0fs",
                agent_id,
                self.version,
                rep.error,
                wait,
            )
            self._request(LEAVE)
            # its back-off over: re-plan at once (one known event, not a burst of joins)
            asyncio.get_running_loop().call_later(wait + 0.01, self._request, LEAVE)
            return
        if rep.state == "ready":
            self.backoff.clear(agent_id)
        if plan.ready or not plan.stages:
            return
        waiting = [a for a in self.assigned if self.assigned[a] and not self._reported_ready(a)]
        if self.assigned and not waiting:
            self.plan_message = dataclasses.replace(plan, ready=True, ts=time.time())
            self.loadshift.restart(time.time())  # busy during the switch says nothing
            await self.retained.publish_plan(self.plan_message)
            await self._publish_status()
            log.info("plan model=%s v%d ready: %s", self.model_name, self.version, self._summary())

    def _reported_ready(self, agent_id: str) -> bool:
        view = self.registry.agents.get(agent_id)
        rep = view.reported if view else None
        return (
            rep is not None
            and rep.plan_id == self.plan_id
            and rep.plan_version == self.version
            and rep.state == "ready"
        )

    # -- planning (planner/planning.py decides; this publishes) -----------------
    async def _planning_loop(self) -> None:
        await planning.planning_loop(
            self.schedule, self._wake, self._make_plan, self._withdraw, self.model_name
        )

    async def _make_plan(self) -> None:
        started = time.perf_counter()
        now = time.time()
        if not self.client.connected:
            log.info("planner not planning while its broker connection is down")
            return  # the reconnect asks for a plan again
        if self._settling():
            return
        connects = self._connects
        sessions = {a: v.session for a, v in self.registry.agents.items()}
        devices, sitting_out = replan.candidates(
            self.registry.devices(now), sessions, self.backoff, self.loadshift, now
        )
        gate = replan.first_plan_gate(len(devices), self.config.min_agents, self.served)
        if gate is not None:
            log.info("planner %s", gate)
            await self._publish_status(gate)
            return
        if not devices:
            # every agent gone at once is most often the broker going away (it publishes
            # every last will as it stops): withdraw only if they are still gone after a grace
            if self._empty_since is None and not sitting_out:
                self._empty_since = time.monotonic()
                self.schedule.join(time.monotonic(), min(self.config.replan_delay_s, 2.0))
                self._wake.set()
                return
            why = "no usable agent"
            if sitting_out:
                why += f" ({', '.join(sitting_out)} sitting out after an assignment error)"
            await self._withdraw(why)
            return
        self._empty_since = None
        current = self.plan_message
        previous = current.stages if current is not None else []
        cost = self.cost if self.pricing is None else self.pricing.cost_for(self.cost, devices)
        samples = self.registry.timing_samples(cost, previous, now)
        proposal = await planning.propose(
            self.config, cost, self.loaded, self.profile, self.key, devices, samples, previous
        )
        for art in proposal.artifacts:
            self.artifacts.add(art.sha256, art.data)
        if not self.client.connected or self._connects != connects:
            log.info("planner dropped a plan decided while its broker connection went away")
            return  # the reconnect asks for a plan again, after the agents re-announce
        if current is not None and replan.layout(current) == replan.layout(None, proposal.stages):
            log.info("plan model=%s v%d unchanged: still served", self.model_name, self.version)
            return
        self.version += 1
        self.plan_message = planning.plan_message(
            self.model_name, self.plan_id, self.version, proposal, self.config
        )
        self.served = True
        # set before publishing: reports for this version may arrive while we publish
        wanted = proposal.assignments  # a tiled plan's own (planner/intraplan.py)
        if wanted is None:
            wanted = retained.desired_assignments(proposal.plan, proposal.artifacts)
        self.assigned = {a: [s.stage for s in st] for a, st in wanted.items()}
        await self.retained.publish_assignments(
            self.plan_id, self.version, self.model_name, wanted, self.registry.usable_ids()
        )
        await self.retained.publish_plan(self.plan_message)
        await self._publish_status()
        log.info(
            "%s (built and published in %.2fs)",
            describe_plan(self.plan_message),
            time.perf_counter() - started,
        )
        if self.on_plan is not None:
            self.on_plan(self.plan_message)

    def _settling(self) -> bool:
        """True (and a re-plan set for the end of the grace) while the agents of the served
        plan may still be re-announcing after the planner's own reconnect (module doc)."""
        plan = self.plan_message
        expected = frozenset(a for s in plan.stages for a in s.agents) if plan else frozenset()
        usable, heard = self.registry.usable_ids(), frozenset(self._heard)
        now = time.monotonic()
        wait = replan.reconnect_wait(expected, usable, heard, now, self._settle_until)
        if wait <= 0:
            return False
        log.info(
            "planner reconnected: waiting up to %.1fs for %s to re-announce before re-planning",
            wait,
            ", ".join(sorted(expected - usable - heard)),
        )
        if self._settle_timer is None or self._settled_at != self._settle_until:
            if self._settle_timer is not None:
                self._settle_timer.cancel()  # an earlier reconnect's
            loop = asyncio.get_running_loop()
            self._settle_timer = loop.call_later(wait + 0.01, self._request, LEAVE)
            self._settled_at = self._settle_until
        return True

    async def _withdraw(self, reason: str) -> None:
        """No plan is possible: publish a plan with no stages and the reason (once)."""
        current = self.plan_message
        if current is not None and not current.stages and current.reason == reason:
            return
        self.version += 1
        self.assigned = {}
        self.plan_message = retained.withdrawn_plan(
            self.model_name, self.plan_id, self.version, self.config, reason
        )
        log.error("plan model=%s v%d withdrawn: %s", self.model_name, self.version, reason)
        await self.retained.publish_plan(self.plan_message)
        await self._publish_status()
        if self.on_plan is not None:
            self.on_plan(self.plan_message)


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first: True when it finished (its error raised),
    False when it was cancelled for the stop. A planner still loading or connecting (10 s
    of retries when nothing listens yet) must end at SIGTERM, not when that is over: a
    supervisor waits only so long before it kills. A model load already running in its
    thread still finishes before the process exits (a thread cannot be cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
        return False
    task.result()
    return True
