"""The inference client (the Python API behind ``edgeslice infer``): route, send, await results.

``await client.infer(tensor)`` picks one agent per stage among the plan's replicas with
AMP4EC scoring (load from telemetry, link latency from info, this client's own in-flight
counts and recent stage times), sends the inputs as a chunked ``request`` to the first
stage's inbox, and awaits the last stage's ``result`` on ``clients/{id}/results``.
Errors come back as :class:`RemoteStageError` naming the stage and agent; a retryable
one (the plan changed under the request, an agent overloaded) is retried on the
current plan, so a re-plan loses no request. Many ``infer`` calls may run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, Refused, stream_transfer
from edgeslice.broker.protocol.errors import (
    EdgesliceError,
    InferenceError,
    RemoteStageError,
    RequestTimeout,
)
from edgeslice.broker.protocol.messages import Info, PlanMessage, Telemetry
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.settings import BrokerSettings
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.client.scoring import Candidate, Weights, choose

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
class _AgentState:
    load: float = 0.0
    mem_free: float = 1.0
    rtt_s: float = 0.0
    in_flight: int = 0
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
        self.plan: PlanMessage | None = None
        self.agents: dict[str, _AgentState] = {}
        self._plan_changed = asyncio.Condition()
        self._waiting: dict[str, asyncio.Future[Completed]] = {}
        self._reassembler = Reassembler(max_open=512, max_age_s=120.0)
        self._task: asyncio.Task[None] | None = None
        self.client = (transport or mqtt_transport(settings))(self.client_id)

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
        """One agent per stage among the stage's replicas.

        Plans of the ``amp4ec`` strategy take the paper's eligibility filter and weighted
        score. edgeslice plans take the replica that should finish
        soonest, ``(in flight + 1) x its stage time`` (measured by this client, else the
        planner's prediction), among replicas within AMP4EC's link-latency threshold: the
        score's balance term spreads requests evenly, which
        starves a fast replica beside a slow one, while the planner sized replicas assuming
        each serves in proportion to its speed.
        """
        route = []
        for stage in plan.stages:
            cands = []
            for agent_id in stage.agents:
                st = self.agents.setdefault(agent_id, _AgentState())
                cands.append(
                    Candidate(
                        agent_id=agent_id,
                        resource_fit=st.mem_free,
                        load=st.load,
                        recent_task_s=st.recent.get(stage.stage, 0.0),
                        in_flight=st.in_flight,
                        latency_s=st.rtt_s,
                    )
                )
            if plan.strategy == "amp4ec" or len(cands) == 1:
                route.append(choose(cands, self.weights).agent_id)
                continue
            # AMP4EC's link-latency threshold only: at saturation every fast replica is busier
            # than max_load *because of our own requests*, and the finish estimate already
            # counts those; filtering on load would hand everything to the idle slow ones
            far = self.weights.max_latency_s
            pool = [c for c in cands if c.latency_s <= far] or cands
            predicted = dict(zip(stage.agents, stage.replica_period_s, strict=False))
            finish = {
                c.agent_id: (c.in_flight + 1)
                * (
                    self.agents[c.agent_id].compute.get(stage.stage)
                    or predicted.get(c.agent_id, 1.0)
                )
                for c in pool
            }
            route.append(min(pool, key=lambda c: (finish[c.agent_id], c.agent_id)).agent_id)
        return route

    async def _attempt(
        self, plan: PlanMessage, tensors: list[Tensor], deadline: float
    ) -> InferenceResult:
        request_id = uuid.uuid4().hex
        route = self.choose_route(plan)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Completed] = loop.create_future()
        self._waiting[request_id] = fut
        for agent_id in route:
            self.agents[agent_id].in_flight += 1
        start = time.perf_counter()
        try:
            tensor_meta, payload = pack_tensors(tensors)
            meta = {
                "route": [[a, s.artifact] for a, s in zip(route, plan.stages, strict=True)],
                "reply_to": self.client_id,
                "tensors": tensor_meta,
                "model": plan.model,
                "compression": plan.compression,
                "sent_at": time.time(),
                "timings": [],
            }
            _header, chunks = stream_transfer(
                payload,
                request_id=request_id,
                kind="request",
                plan_id=plan.plan_id,
                plan_version=plan.plan_version,
                stage=0,
                deadline=deadline,
                meta=meta,
                chunk_size=self.chunk_size,
            )
            topic = self.topics.inbox(route[0])
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
                self.agents[agent_id].in_flight -= 1
        latency = time.perf_counter() - start
        hmeta = done.header.meta
        timings = list(hmeta.get("timings", []))
        if done.header.kind == "error":
            raise RemoteStageError(
                f"request {request_id} failed at stage {hmeta.get('stage')} on agent "
                f"{hmeta.get('agent')}: {hmeta.get('error')}",
                stage=hmeta.get("stage"),
                agent=hmeta.get("agent"),
                retryable=bool(hmeta.get("retryable")),
            )
        outputs = unpack_tensors(hmeta["tensors"], done.payload, share=True)
        for t in timings:
            st = self.agents.setdefault(str(t.get("agent")), _AgentState())
            stage = int(t.get("stage", 0))
            prev = st.recent.get(stage)
            value = float(t.get("compute_s", 0.0)) + float(t.get("queue_s", 0.0))
            st.recent[stage] = value if prev is None else 0.7 * prev + 0.3 * value
            busy = float(t.get("compute_s", 0.0))
            last = st.compute.get(stage)
            st.compute[stage] = busy if last is None else 0.7 * last + 0.3 * busy
        return InferenceResult(request_id, outputs, latency, timings, route, plan.plan_version)

    # -- incoming ---------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                parsed = self.topics.parse(msg.topic)
                if parsed.kind is Kind.CLIENT_RESULTS:
                    self._on_result_chunk(msg.payload)
                elif parsed.kind is Kind.PLAN:
                    plan = codec.decode(msg.payload, PlanMessage) if msg.payload else None
                    async with self._plan_changed:
                        self.plan = plan
                        self._plan_changed.notify_all()
                elif parsed.kind is Kind.TELEMETRY:
                    tel = codec.decode(msg.payload, Telemetry)
                    st = self.agents.setdefault(parsed.agent_id, _AgentState())
                    # the agent's own stage-worker utilisation: host CPU% would blame
                    # an agent for its neighbours when several share one machine
                    st.load = tel.busy
                    st.mem_free = max(0.0, 1.0 - tel.mem_percent / 100.0)
                elif parsed.kind is Kind.INFO and msg.payload:
                    info = codec.decode(msg.payload, Info)
                    self.agents.setdefault(parsed.agent_id, _AgentState()).rtt_s = info.link_rtt_s
            except EdgesliceError as exc:
                log.warning("client=%s dropped message on %s: %s", self.client_id, msg.topic, exc)

    def _on_result_chunk(self, payload: bytes) -> None:
        result = self._reassembler.feed(payload, time.time())
        if isinstance(result, Refused):
            if result.is_error:
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
