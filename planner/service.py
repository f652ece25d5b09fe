"""The planner service: tracks the fleet, plans, publishes assignments and serves artifacts.

Start-up loads and profiles the model (torch, off the event loop). Then every change in
the set of usable agents (online with a current ``info``) re-plans after a short quiet
period (``replan_delay_s``, so a fleet booting up yields one plan, not five): the pure
partitioner picks stages and agents, :func:`planner.stages.build_stages` cuts and signs
the artifacts (cached, so a known cut only re-signs), each agent gets its retained
``assignment/desired``, and ``plans/{model}`` is published with ``ready=False``; once
every agent of the plan reports ``ready`` for that version it is republished with
``ready=True``. Clients route by the ready plan. An agent that reports an error is left
out of the next plan until it restarts. Artifacts are served by planner/artifact_server.py;
each new plan is also handed to ``on_plan`` (the CLI prints :func:`describe_plan`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from edgeslice.broker.client import Will
from edgeslice.broker.fleetkey import key_fingerprint, load_signing_key
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    ONLINE,
    AssignmentDesired,
    PlanMessage,
    PlannerStatus,
    PlanStage,
    StageAssignment,
)
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.planner.artifact_server import ArtifactServer
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import CostParams, stage_period_s
from edgeslice.planner.partition import STRATEGIES, Objective, Plan, plan_partition
from edgeslice.planner.registry import Registry

log = logging.getLogger(__name__)


def describe_plan(plan: PlanMessage) -> str:
    """One line per published plan: version, model, stages with their agents, prediction."""
    stages = " ".join(
        f"[{s.start_segment}-{s.end_segment - 1} on {','.join(s.agents)}]" for s in plan.stages
    )
    count = len(plan.stages)
    return (
        f"plan v{plan.plan_version} for {plan.model}: {count} stage{'s' * (count != 1)} "
        f"{stages}; predicted {plan.predicted_period_s * 1e3:.1f} ms/req, "
        f"{plan.predicted_latency_s * 1e3:.1f} ms latency ({plan.objective})"
    )


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
        self.plan: Plan | None = None
        self.plan_message: PlanMessage | None = None
        self.assigned: dict[str, list[int]] = {}
        self.excluded: dict[str, int] = {}  # agent -> session in which it failed
        self.on_plan = on_plan
        self._replan = asyncio.Event()
        self.client = (transport or mqtt_transport(config.broker))(
            f"planner-{config.planner_id}-{uuid.uuid4().hex[:6]}",
            will=Will(self.topics.planner_status(), codec.encode(PlannerStatus(state=OFFLINE))),
            on_connect=self._on_connect,
        )
        self.artifacts = ArtifactServer(self.client, self.topics)

    # -- lifecycle -------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        from edgeslice.planner.modelspec import load_model
        from edgeslice.planner.profile import profile_model
        from edgeslice.planner.timing import timed_cost

        started = time.perf_counter()
        self.loaded = await asyncio.to_thread(load_model, self.config.model_spec)
        self.model_name = self.loaded.name
        self.profile = await asyncio.to_thread(
            profile_model,
            self.loaded.module,
            self.loaded.example_inputs,
            self.config.max_segments,
            self.model_name,
        )
        # price segments by their measured time, not raw FLOPs (see planner/timing.py)
        self.cost, reference = await asyncio.to_thread(
            timed_cost, self.profile, self.loaded.example_inputs
        )
        log.info(
            "planner model=%s segments=%d profiled and timed in %.1fs (%.2f GFLOP "
            "calibration-equivalent at %.1f GFLOP/s here; %.2f GFLOP counted)",
            self.model_name,
            len(self.profile.segments),
            time.perf_counter() - started,
            sum(seg.flops for seg in self.cost.segments) / 1e9,
            reference,
            self.profile.total_flops / 1e9,
        )
        await self.client.connect()
        # a plan retained by an earlier planner names stages agents may no longer hold
        await self.client.publish(self.topics.plan(self.model_name), b"", qos=1, retain=True)
        tasks = [asyncio.create_task(self._consume()), asyncio.create_task(self._planning_loop())]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            self.artifacts.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # nobody serves or re-plans this plan any more: clients must not route by it
            await self.client.publish(
                self.topics.plan(self.model_name), b"", qos=1, retain=True, timeout=5.0
            )
            await self.client.publish(
                self.topics.planner_status(),
                codec.encode(PlannerStatus(state=OFFLINE, ts=time.time())),
                qos=1,
                retain=True,
                timeout=5.0,
            )
            await self.client.close()

    async def _on_connect(self) -> None:
        t = self.topics
        for suffix in ("status", "info", "telemetry", "assignment/reported"):
            await self.client.subscribe(t.all_agents(suffix), qos=1)
        await self.client.subscribe(t.all_artifact_gets(), qos=1)
        await self._publish_status()

    async def _publish_status(self, summary: str = "") -> None:
        status = PlannerStatus(
            state=ONLINE,
            planner_id=self.config.planner_id,
            model=self.model_name,
            plan_id=self.plan_id,
            plan_version=self.version,
            summary=summary or self._summary(),
            ts=time.time(),
        )
        await self.client.publish(
            self.topics.planner_status(), codec.encode(status), qos=1, retain=True
        )

    def _summary(self) -> str:
        if self.plan_message is None:
            return f"waiting for {self.config.min_agents} agent(s)"
        stages = ", ".join(f"{s.stage}:{'+'.join(s.agents)}" for s in self.plan_message.stages)
        state = "ready" if self.plan_message.ready else "loading"
        return f"v{self.version} {state}: {stages}"

    # -- messages ----------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                parsed = self.topics.parse(msg.topic)
                if parsed.kind is Kind.ARTIFACT_GET:
                    self.artifacts.on_get(parsed.name)
                    continue
                if self.registry.apply(msg.topic, msg.payload, time.time()):
                    self._replan.set()
                if parsed.kind is Kind.ASSIGNMENT_REPORTED:
                    await self._on_reported(parsed.agent_id)
            except Exception as exc:
                log.warning("planner dropped message on %s: %s", msg.topic, exc)

    async def _on_reported(self, agent_id: str) -> None:
        view = self.registry.agents.get(agent_id)
        plan = self.plan_message
        if view is None or view.reported is None or plan is None:
            return
        rep = view.reported
        if rep.plan_id != self.plan_id or rep.plan_version != self.version:
            return
        if rep.state == "error":
            log.error("agent=%s cannot run plan v%d: %s", agent_id, self.version, rep.error)
            self.excluded[agent_id] = view.session
            self._replan.set()
            return
        if plan.ready:
            return
        waiting = [a for a in self.assigned if self.assigned[a] and not self._reported_ready(a)]
        if self.assigned and not waiting:
            self.plan_message = PlanMessage(**{**plan.__dict__, "ready": True, "ts": time.time()})
            await self._publish_plan()
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

    # -- planning ------------------------------------------------------------------
    async def _planning_loop(self) -> None:
        while True:
            await self._replan.wait()
            await asyncio.sleep(self.config.replan_delay_s)  # let a burst of joins settle
            self._replan.clear()
            try:
                await self._make_plan()
            except PlanningError as exc:
                log.error("planning model=%s failed: %s", self.model_name, exc)
                await self._publish_status(f"cannot plan: {exc}")
            except Exception:
                log.exception(
                    "planning model=%s crashed; will retry on the next change", self.model_name
                )

    def _candidates(self, now: float) -> list[Any]:
        devices = self.registry.devices(now)
        return [
            d
            for d in devices
            if self.excluded.get(d.agent_id) != self.registry.agents[d.agent_id].session
        ]

    async def _make_plan(self) -> None:
        from edgeslice.planner.stages import build_stages

        devices = self._candidates(time.time())
        if len(devices) < self.config.min_agents:
            log.info(
                "planner waiting: %d usable agent(s), need %d", len(devices), self.config.min_agents
            )
            await self._publish_status()
            return
        cost = self.cost
        now = time.time()
        previous = self.plan_message.stages if self.plan_message is not None else []
        params = CostParams(correction=self.registry.correction(cost, previous, now))
        if self.config.strategy == "edgeslice":
            objective = cast(Objective, self.config.objective)
            plan = plan_partition(
                cost, devices, objective, params, max_stages=self.config.max_stages
            )
        else:  # a baseline, priced by the same cost model so predictions stay comparable
            plan = STRATEGIES[self.config.strategy](cost, devices, params)
        boundaries = [s.start for s in plan.stages] + [len(cost.segments)]
        by_id = {d.agent_id: d for d in devices}
        started = time.perf_counter()
        artifacts = await asyncio.to_thread(
            build_stages,
            self.loaded.module,
            self.loaded.example_inputs,
            self.profile,
            boundaries,
            self.key,
        )
        self.version += 1
        for art in artifacts:
            self.artifacts.add(art.sha256, art.data)
        log.info(
            "plan model=%s v%d built %d artifacts in %.1fs",
            self.model_name,
            self.version,
            len(artifacts),
            time.perf_counter() - started,
        )
        self.plan = plan
        stages = [
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
            )
            for s, art in zip(plan.stages, artifacts, strict=True)
        ]
        self.plan_message = PlanMessage(
            model=self.model_name,
            plan_id=self.plan_id,
            plan_version=self.version,
            objective=plan.objective,
            strategy=plan.strategy,
            stages=stages,
            input_specs=[s.to_wire() for s in artifacts[0].input_specs],
            predicted_latency_s=plan.latency_s,
            predicted_period_s=plan.period_s,
            compression=self.config.compression or "",
            ready=False,
            ts=time.time(),
        )
        await self._publish_assignments(artifacts)
        await self._publish_plan()
        await self._publish_status()
        log.info("%s", describe_plan(self.plan_message))
        if self.on_plan is not None:
            self.on_plan(self.plan_message)

    async def _publish_assignments(self, artifacts: list[Any]) -> None:
        assert self.plan is not None
        wanted: dict[str, list[StageAssignment]] = {}
        for stage, art in zip(self.plan.stages, artifacts, strict=True):
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
                    )
                )
        usable = self.registry.usable_ids()
        previous = set(self.assigned)
        # set before publishing: reports for this version may arrive while we publish
        self.assigned = {a: [s.stage for s in st] for a, st in wanted.items()}
        for agent_id in sorted(previous | usable | set(wanted)):
            topic = self.topics.assignment_desired(agent_id)
            if agent_id not in usable and agent_id not in wanted:
                # gone: clear its retained assignment so it does not load a stale plan
                await self.client.publish(topic, b"", qos=1, retain=True)
                continue
            desired = AssignmentDesired(
                agent_id=agent_id,
                plan_id=self.plan_id,
                plan_version=self.version,
                model=self.model_name,
                stages=wanted.get(agent_id, []),
                ts=time.time(),
            )
            await self.client.publish(topic, codec.encode(desired), qos=1, retain=True)

    async def _publish_plan(self) -> None:
        assert self.plan_message is not None
        await self.client.publish(
            self.topics.plan(self.model_name), codec.encode(self.plan_message), qos=1, retain=True
        )
