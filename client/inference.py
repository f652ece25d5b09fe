"""The inference client (the Python API behind ``edgeslice infer``): route, send, await results.

``await client.infer(tensor)`` picks one agent per stage among the plan's replicas with
:func:`~edgeslice.client.scoring.pick_replica` (what the fleet says -- load from telemetry,
link latency from info, the plan -- folded by the shared :class:`FleetState`; what this
client measures itself -- its in-flight counts and recent stage times -- kept here), sends
the inputs as a chunked ``request`` carrying a :class:`RequestEnvelope` to the first
stage's inbox, and awaits the last stage's ``result`` on ``clients/{id}/results``.
Errors come back as :class:`RemoteStageError` naming the stage and agent; a retryable
one (the plan changed under the request, an agent overloaded) is retried on the
current plan, so a re-plan loses no request. Many ``infer`` calls may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import (
    Completed,
    Reassembler,
    Refused,
    TransferHeader,
    stream_transfer,
)
from edgeslice.broker.protocol.errors import (
    EdgesliceError,
    InferenceError,
    RemoteStageError,
    RequestTimeout,
)
from edgeslice.broker.protocol.messages import (
    ErrorReply,
    PlanMessage,
    RequestEnvelope,
    RouteHop,
    StageTiming,
)
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.settings import BrokerSettings
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.client.scoring import Candidate, Weights, pick_replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceResult:
    """Outputs of one request plus where its time went."""

    request_id: str
    outputs: list[Tensor]
    latency_s: float
    timings: list[dict[str, Any]]  # per stage: agent, recv/transfer/queue/compute seconds
    route: list[str]
    plan_version: int
    attempts: int = 1


@dataclass
class Measured:
    """What this client measured of one agent itself (the fleet's word is in FleetState)."""

    in_flight: int = 0  # this client's requests routed through the agent, not answered yet
    recent: dict[int, float] = field(default_factory=dict)  # stage -> EWMA queue+compute s
    compute: dict[int, float] = field(default_factory=dict)  # stage -> EWMA compute s


class InferenceClient:
    """One client connection; use ``async with InferenceClient(settings, model) as c``."""

    def __init__(
        self,
        settings: BrokerSettings,
        model: str,
        client_id: str | None = None,
        weights: Weights | None = None,
        chunk_size: int = 256 * 1024,
        transport: TransportFactory | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        # with the production ACLs a client may read only clients/<its username>/results
        self.client_id = client_id or settings.username or f"client-{uuid.uuid4().hex[:10]}"
        self.weights = weights or Weights()
        self.chunk_size = chunk_size
        self.topics = Topics(settings.namespace)
        self.fleet = FleetState(self.topics)  # info, telemetry and this model's plan
        self.measured: dict[str, Measured] = {}
        self._plan_changed = asyncio.Condition()
        self._waiting: dict[str, asyncio.Future[Completed]] = {}
        # results of requests nobody here waits for are refused at their header, half-finished
        # ones expire after a few idle seconds: a flood on our results topic cannot wedge us
        self._reassembler = Reassembler(
            max_open=512, max_age_s=120.0, idle_s=5.0, accept=self._awaited
        )
        self._expired_at = 0.0
        self._bad_plan: dict[str, str] = {}  # plan topic -> why its last payload was refused
        self._task: asyncio.Task[None] | None = None
        self.client = (transport or mqtt_transport(settings))(self.client_id)

    @property
    def plan(self) -> PlanMessage | None:
        """The current plan of this client's model, as last published (None: none yet)."""
        return self.fleet.plans.get(self.model)

    async def connect(self, timeout: float = 10.0) -> None:
        await self.client.connect(timeout)
        t = self.topics
        await self.client.subscribe(t.client_results(self.client_id), qos=1)
        await self.client.subscribe(t.plan(self.model), qos=1)
        await self.client.subscribe(t.all_agents("telemetry"), qos=0)
        await self.client.subscribe(t.all_agents("info"), qos=1)
        self._task = asyncio.create_task(self._consume())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    async def __aenter__(self) -> InferenceClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(
        self, timeout: float = 120.0, newer_than: int = 0, other_than: str = ""
    ) -> PlanMessage:
        """The current plan once every agent of it is ready (and its version > newer_than,
        and its plan id not ``other_than``: a restarted planner's plan)."""

        def ready() -> bool:
            p = self.plan
            return (
                p is not None
                and p.ready
                and p.plan_version > newer_than
                and p.plan_id != other_than
            )

        async with self._plan_changed:
            try:
                await asyncio.wait_for(self._plan_changed.wait_for(ready), timeout)
            except TimeoutError:
                state = (
                    "no plan published"
                    if self.plan is None
                    else (f"plan v{self.plan.plan_version} not ready")
                )
                if self.plan is None and self._bad_plan:
                    topic, why = next(iter(self._bad_plan.items()))
                    state = (
                        f"no valid plan: a malformed plan was seen on topic {topic} ({why}); "
                        "the planner replaces it when it publishes its next plan (restart it "
                        "to republish now)"
                    )
                raise RequestTimeout(
                    f"model {self.model!r}: {state} after {timeout:.0f}s on "
                    f"{self.settings.url} namespace {self.settings.namespace!r}; is "
                    "`edgeslice planner` running with enough agents?"
                ) from None
        assert self.plan is not None
        return self.plan

    # -- requests ---------------------------------------------------------------
    async def infer(
        self, inputs: Tensor | Sequence[Tensor], timeout: float = 60.0, retries: int = 3
    ) -> InferenceResult:
        """Run one request through the fleet; raises InferenceError subclasses on failure."""
        tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        deadline = time.time() + timeout
        last: EdgesliceError | None = None
        for attempt in range(1, retries + 2):
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            plan = await self.wait_ready(remaining, newer_than=0)
            check_inputs(plan, tensors)
            try:
                result = await self._attempt(plan, tensors, deadline)
                return InferenceResult(**{**result.__dict__, "attempts": attempt})
            except RemoteStageError as exc:
                last = exc
                if not exc.retryable:
                    raise
                log.info("client=%s retrying after: %s", self.client_id, exc)
                await self._wait_plan_change(plan, min(5.0, max(0.0, deadline - time.time())))
        if last is not None:
            raise last
        raise RequestTimeout(f"model {self.model!r}: no result within {timeout:.1f}s")

    async def _wait_plan_change(self, used: PlanMessage, timeout: float) -> None:
        """After a retryable error: give the planner a moment to publish what changed."""

        def changed() -> bool:
            p = self.plan
            return p is None or (p.plan_id, p.plan_version) != (used.plan_id, used.plan_version)

        async with self._plan_changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._plan_changed.wait_for(changed), timeout)

    def choose_route(self, plan: PlanMessage) -> list[str]:
        """One agent per stage among the stage's replicas, by :func:`pick_replica`."""
        now = time.time()
        route = []
        for stage in plan.stages:
            predicted = dict(zip(stage.agents, stage.replica_period_s, strict=False))
            cands = [
                self._candidate(a, stage.stage, predicted.get(a, 1.0), now) for a in stage.agents
            ]
            route.append(pick_replica(cands, plan.strategy, self.weights))
        return route

    def _candidate(self, agent_id: str, stage: int, predicted_s: float, now: float) -> Candidate:
        """One replica as the policy sees it: the fleet's word plus this client's measures."""
        own = self.measured.setdefault(agent_id, Measured())
        agent = self.fleet.agents.get(agent_id)
        tel = agent.fresh_telemetry(now, self.fleet.stale_after_s) if agent else None
        info = agent.info if agent else None
        return Candidate(
            agent_id=agent_id,
            resource_fit=max(0.0, 1.0 - tel.mem_percent / 100.0) if tel else 1.0,
            load=self.fleet.load(agent_id, now),  # stage-worker busy share, not host CPU
            recent_task_s=own.recent.get(stage, 0.0),
            in_flight=own.in_flight,
            latency_s=info.link_rtt_s if info else 0.0,
            compute_s=own.compute.get(stage, 0.0),
            predicted_period_s=predicted_s,
        )

    async def _attempt(
        self, plan: PlanMessage, tensors: list[Tensor], deadline: float
    ) -> InferenceResult:
        request_id = uuid.uuid4().hex
        route = self.choose_route(plan)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Completed] = loop.create_future()
        self._waiting[request_id] = fut
        for agent_id in route:
            self.measured[agent_id].in_flight += 1
        start = time.perf_counter()
        try:
            tensor_meta, payload = pack_tensors(tensors)
            envelope = RequestEnvelope(
                route=[RouteHop(a, s.artifact) for a, s in zip(route, plan.stages, strict=True)],
                reply_to=self.client_id,
                tensors=tensor_meta,
                model=plan.model,
                compression=plan.compression,
                sent_at=time.time(),
            )
            _header, chunks = stream_transfer(
                payload,
                request_id=request_id,
                kind="request",
                plan_id=plan.plan_id,
                plan_version=plan.plan_version,
                stage=0,
                deadline=deadline,
                meta=codec.to_wire(envelope),
                chunk_size=self.chunk_size,
            )
            topic = self.topics.inbox(route[0], self.client_id)  # ACL: our own segment only
            acks = [self.client.publish_nowait(topic, c, qos=1) for c in chunks]
            try:
                done = await asyncio.wait_for(fut, max(0.0, deadline - time.time()))
            except TimeoutError:
                raise RequestTimeout(
                    f"request {request_id} (model {plan.model!r}, plan v{plan.plan_version}) "
                    f"got no result within the deadline; route {' -> '.join(route)}. Check "
                    "`edgeslice monitor` for offline or overloaded agents."
                ) from None
            finally:
                for ack in acks:
                    ack.cancel()  # no-op when acknowledged; stops waiting otherwise
        finally:
            self._waiting.pop(request_id, None)
            for agent_id in route:
                self.measured[agent_id].in_flight -= 1
        latency = time.perf_counter() - start
        if done.header.kind == "error":
            failure = codec.from_wire(done.header.meta, ErrorReply)
            raise RemoteStageError(
                f"request {request_id} failed at stage {failure.stage} on agent "
                f"{failure.agent}: {failure.error}",
                stage=failure.stage,
                agent=failure.agent,
                retryable=failure.retryable,
                code=failure.code,
            )
        reply = codec.from_wire(done.header.meta, RequestEnvelope)
        outputs = unpack_tensors(reply.tensors, done.payload, share=True)
        self._learn(reply.timings)
        timings = [dataclasses.asdict(t) for t in reply.timings]
        return InferenceResult(request_id, outputs, latency, timings, route, plan.plan_version)

    def _learn(self, timings: Sequence[StageTiming]) -> None:
        """Fold a finished request's measured stage times into the EWMAs routing uses."""
        for t in timings:
            st = self.measured.setdefault(t.agent, Measured())
            prev = st.recent.get(t.stage)
            value = t.compute_s + t.queue_s
            st.recent[t.stage] = value if prev is None else 0.7 * prev + 0.3 * value
            last = st.compute.get(t.stage)
            st.compute[t.stage] = t.compute_s if last is None else 0.7 * last + 0.3 * t.compute_s

    # -- incoming ---------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                parsed = self.topics.parse(msg.topic)
                if parsed.kind is Kind.CLIENT_RESULTS:
                    self._on_result_chunk(msg.payload)
                elif parsed.kind is Kind.PLAN:
                    async with self._plan_changed:
                        self._apply_plan(msg.topic, msg.payload)
                        self._plan_changed.notify_all()
                else:  # info and telemetry: the shared fold keeps what routing reads
                    self.fleet.apply(msg.topic, msg.payload, time.time())
            except EdgesliceError as exc:
                log.warning("client=%s dropped message on %s: %s", self.client_id, msg.topic, exc)

    def _apply_plan(self, topic: str, payload: bytes) -> None:
        """Fold a plan message; a malformed one (retained garbage) is logged once and ignored
        (the last valid plan stays), and named by wait_ready's error if no valid one comes."""
        try:
            self.fleet.apply(topic, payload, time.time())
        except EdgesliceError as exc:
            if topic not in self._bad_plan:
                log.warning(
                    "client=%s ignoring malformed plan on %s: %s", self.client_id, topic, exc
                )
            self._bad_plan[topic] = f"{exc}"[:200]
            return
        self._bad_plan.pop(topic, None)

    def _awaited(self, header: TransferHeader) -> str | None:
        """Reassembler gate: only results of requests this client is waiting for."""
        if header.request_id in self._waiting:
            return None
        return f"request {header.request_id[:32]!r} is not one client {self.client_id} waits for"

    def _on_result_chunk(self, payload: bytes) -> None:
        now = time.time()
        if now - self._expired_at >= 1.0:  # drop half-finished results idle for a while
            self._expired_at = now
            self._reassembler.expire(now)
        result = self._reassembler.feed(payload, now)
        if isinstance(result, Refused):
            if result.is_error and result.reason != "unexpected":
                log.warning(
                    "client=%s result refused: %s %s", self.client_id, result.reason, result.detail
                )
            return
        if result is None:
            return
        fut = self._waiting.get(result.header.request_id)
        if fut is not None and not fut.done():
            fut.set_result(result)


def check_inputs(plan: PlanMessage, tensors: Sequence[Tensor]) -> None:
    """Raise InferenceError when inputs do not match the plan's input specs."""
    specs = plan.input_specs
    if len(specs) != len(tensors):
        raise InferenceError(f"model {plan.model!r} takes {len(specs)} inputs, got {len(tensors)}")
    for i, (spec, t) in enumerate(zip(specs, tensors, strict=True)):
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != list(spec.get("shape", [])) or dtype != spec.get("dtype"):
            raise InferenceError(
                f"input {i} of model {plan.model!r} must be {spec.get('dtype')}"
                f"{spec.get('shape')}, got {dtype}{list(t.shape)}"
            )
