"""The inference client (the Python API behind ``edgeslice infer``): route, send, await results.

``await client.infer(tensor)`` picks one agent per stage among the plan's replicas with
:func:`~edgeslice.client.scoring.pick_replica` (what the fleet says -- load from telemetry,
link latency from info, the plan -- folded by the shared :class:`FleetState`; what this
client measures itself -- its in-flight counts and recent stage times -- kept here), sends
the inputs as a chunked ``request`` carrying a :class:`RequestEnvelope` to the first
stage's inbox, and awaits the last stage's ``result`` on ``clients/{id}/results``.
Errors come back as :class:`RemoteStageError` naming the stage and agent; a retryable
one (the plan changed under the request, an agent overloaded) is retried on the
current plan. A request whose route loses an agent (plan change, last will, draining)
or that may have been lost by a broker restart is re-sent at once under the same
request id (client/requests.py: first result wins, duplicates dropped and counted), so
no request is lost and none waits out its timeout. A withdrawn plan fails requests at
once with the planner's reason (:class:`NoPlanError`). Many ``infer`` calls may run at once.
Watching the plan and waiting for a ready one is client/planwatch.py's. A tiled plan's
request is sent as pieces to its first stage's tiles and gathered from its last stage's
(client/tiled.py); retries, re-sends and timeouts are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence

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
    NoPlanError,
    RemoteStageError,
    RequestTimeout,
    StageUnavailableError,
)
from edgeslice.broker.protocol.messages import (
    ErrorReply,
    PlanMessage,
    RequestEnvelope,
    RouteHop,
)
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.settings import BrokerSettings
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.client.planwatch import PlanWatch
from edgeslice.client.requests import (
    GatheredResult,
    InferenceResult,
    InFlight,
    RequestTracker,
    check_inputs,
    routable,
)
from edgeslice.client.routing import Router
from edgeslice.client.scoring import Weights
from edgeslice.client.tiled import (
    ResultGather,
    Scattered,
    is_tiled_plan,
    route_of,
    scatter,
    stage_agents,
)

__all__ = ["InferenceClient", "InferenceResult"]  # what infer() returns: part of the API

log = logging.getLogger(__name__)

RESEND_AFTER_RECONNECT_S = 3.0  # second re-send pass after a reconnect (paho retries in 1-2 s)
STALE_RESENDS = 8  # re-sends after "the plan changed" errors, not counted as retries
STALE_WAIT_S = 20.0  # ... each after waiting at most this long for a newer ready plan


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
        self.router = Router(self.fleet, self.weights)
        self.measured = self.router.measured  # agent -> what this client measured of it
        self.watch = PlanWatch(settings, model, self.client_id, self.fleet, self.router.offline)
        self.requests = RequestTracker()  # in flight: routes, re-sends, duplicates
        self._connects = 0
        self._reconnected_at = float("-inf")
        # results of requests nobody here waits for are refused at their header, half-finished
        # ones expire after a few idle seconds: a flood on our results topic cannot wedge us
        self._reassembler = Reassembler(
            max_open=512, max_age_s=120.0, idle_s=5.0, accept=self._awaited
        )
        self._pieces = ResultGather()  # a tiled plan's result pieces (client/tiled.py)
        self._expired_at = 0.0
        self.dropped = 0  # messages and results refused as unusable (malformed, foreign)
        self._followed: set[str] = set()  # agents subscribed to by exact topic
        self._task: asyncio.Task[None] | None = None
        self.client = (transport or mqtt_transport(settings))(
            self.client_id, on_connect=self._on_connect
        )

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
        await self.client.subscribe(t.all_agents("status"), qos=1)  # last wills: re-send now
        await self.client.subscribe(t.planner_status(), qos=1)
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
        and its plan id not ``other_than``: a restarted planner's plan); client/planwatch.py."""
        return await self.watch.wait_ready(timeout, newer_than, other_than)

    # -- requests ---------------------------------------------------------------
    async def infer(
        self, inputs: Tensor | Sequence[Tensor], timeout: float = 60.0, retries: int = 3
    ) -> InferenceResult:
        """Run one request through the fleet; raises InferenceError subclasses on failure.

        ``retries`` bounds re-sends after a retryable *error*; re-sends because the fleet
        changed under the request (module docstring) are not counted against it.
        """
        tensors = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        deadline = time.time() + timeout
        tensor_meta, payload = pack_tensors(tensors)
        loop = asyncio.get_running_loop()
        req = InFlight(uuid.uuid4().hex, tensor_meta, payload, deadline, loop.create_future())
        req.inputs = tensors
        self.requests.add(req)
        start = time.perf_counter()
        last: EdgesliceError | None = None
        tries_left, stale_left = retries + 1, STALE_RESENDS
        try:
            while tries_left > 0:
                remaining = deadline - time.time()
                if remaining <= 0:
                    break
                plan = await self.wait_ready(remaining, newer_than=0)
                check_inputs(plan, tensors)
                if not req.future.done():
                    self._send(req, plan)
                try:
                    done = await asyncio.wait_for(
                        asyncio.shield(req.future), max(0.0, deadline - time.time())
                    )
                except TimeoutError:
                    raise RequestTimeout(
                        f"request {req.request_id} (model {plan.model!r}, plan "
                        f"v{req.plan_version}) got no result within the deadline after "
                        f"{req.sends} send(s); route {' -> '.join(req.route)}. Check "
                        "`edgeslice monitor` for offline or overloaded agents."
                    ) from None
                if done.header.kind != "error":
                    return self._result(req, done, time.perf_counter() - start)
                failure = codec.from_wire(done.header.meta, ErrorReply)
                last = RemoteStageError(
                    f"request {req.request_id} failed at stage {failure.stage} on agent "
                    f"{failure.agent}: {failure.error}",
                    stage=failure.stage,
                    agent=failure.agent,
                    retryable=failure.retryable,
                    code=failure.code,
                )
                if not last.retryable:
                    raise last
                log.info(
                    "client=%s req=%s retrying after: %s", self.client_id, req.request_id, last
                )
                req.future = loop.create_future()
                if last.code == StageUnavailableError.code and stale_left > 0:
                    # the agent no longer holds this plan's stage: the plan changed under the
                    # request, so wait for a newer ready plan (a re-send on the same one
                    # fails the same way while the new one loads); not counted as a retry
                    stale_left -= 1
                    await self.watch.wait_newer_ready(
                        plan, min(STALE_WAIT_S, max(0.0, deadline - time.time()))
                    )
                    continue
                tries_left -= 1
                await self.watch.wait_change(plan, min(5.0, max(0.0, deadline - time.time())))
        finally:
            self._release(req)
        if last is not None:
            raise last
        raise RequestTimeout(f"model {self.model!r}: no result within {timeout:.1f}s")

    def choose_route(self, plan: PlanMessage) -> list[str]:
        """One agent per stage among the stage's replicas (client/routing.py)."""
        return self.router.choose_route(plan)

    def _send(self, req: InFlight, plan: PlanMessage) -> None:
        """(Re-)send ``req`` along a fresh route of ``plan`` (same request id); for a tiled
        plan, as pieces to every tile of its first stage (client/tiled.py)."""
        tiled = is_tiled_plan(plan.stages)
        tiles = self.router.choose_tiles(plan) if tiled else []
        route = route_of(tiles) if tiled else self.choose_route(plan)
        self.router.track(req.route, route)
        if req.sends:
            self.requests.resends += 1
        req.route, req.plan_id, req.plan_version = route, plan.plan_id, plan.plan_version
        req.stage_agents = stage_agents(tiles)
        req.sends += 1
        req.parked = False
        req.sent_at = time.time()
        envelope = RequestEnvelope(
            route=[]
            if tiled
            else [RouteHop(a, s.artifact) for a, s in zip(route, plan.stages, strict=True)],
            reply_to=self.client_id,
            tensors=req.tensor_meta,
            model=plan.model,
            compression=plan.compression,
            sent_at=req.sent_at,
            attempt=req.sends,
        )
        pieces = (
            scatter(req.inputs, tiles, envelope)
            if tiled
            else [Scattered(route[0], envelope, req.payload)]
        )
        for ack in req.acks:
            ack.cancel()  # no-op when acknowledged; stops waiting otherwise
        req.acks = []
        for piece in pieces:
            _header, chunks = stream_transfer(
                piece.payload,
                request_id=req.request_id,
                kind="request",
                plan_id=plan.plan_id,
                plan_version=plan.plan_version,
                stage=0,
                deadline=req.deadline,
                meta=piece.meta if piece.meta is not None else codec.to_wire(piece.envelope),
                chunk_size=self.chunk_size,
            )
            topic = self.topics.inbox(piece.agent_id, self.client_id)  # ACL: our own segment
            req.acks += [self.client.publish_nowait(topic, c, qos=1) for c in chunks]

    def _release(self, req: InFlight) -> None:
        self.requests.close(req.request_id)
        self._pieces.forget(req.request_id)
        for ack in req.acks:
            ack.cancel()
        self.router.track(req.route, [])
        req.route = []

    def _result(
        self, req: InFlight, done: Completed | GatheredResult, latency: float
    ) -> InferenceResult:
        if isinstance(done, GatheredResult):  # a tiled plan's, assembled from its pieces
            outputs, stage_timings = done.outputs, done.timings
        else:
            reply = codec.from_wire(done.header.meta, RequestEnvelope)
            outputs = unpack_tensors(reply.tensors, done.payload, share=True)
            stage_timings = reply.timings
        self.router.learn(stage_timings)
        timings = [dataclasses.asdict(t) for t in stage_timings]
        route = [t.agent for t in stage_timings] or list(req.route)
        return InferenceResult(
            req.request_id, outputs, latency, timings, route, done.header.plan_version, req.sends
        )

    def _reroute(self, everything: bool = False, via: str = "", before: float = 0.0) -> None:
        """Re-send requests whose route is no good any more (or ``everything``, or those sent
        ``before`` a time, ``via`` an agent if given); park those no plan routes yet."""
        plan, offline = self.watch.usable_plan(), self.router.offline()
        todo = self.requests.to_resend(plan, offline, everything, via, before)
        if not todo:
            return
        why = self.watch.no_plan_reason()
        for req in todo:
            if plan is not None and routable(plan, offline):
                log.info(
                    "client=%s req=%s re-sent on plan v%d (was %s)",
                    self.client_id,
                    req.request_id,
                    plan.plan_version,
                    "->".join(req.route),
                )
                self._send(req, plan)
            elif why and not req.future.done():
                req.future.set_exception(NoPlanError(f"request {req.request_id}: {why}"))
            else:
                req.parked = True

    async def _on_connect(self) -> None:
        """After a reconnect the broker may have lost what was in flight: send it again."""
        self._connects += 1
        if self._connects > 1:
            self._reconnected_at = time.time()
            self._reroute(everything=True)
            first_pass = time.time()
            # agents may reconnect after us (their chunks were then lost again): each one's
            # re-announced status re-sends what it holds (_on_status); one more pass for
            # what is still unanswered, in case an agent does not re-announce itself
            await asyncio.sleep(RESEND_AFTER_RECONNECT_S)
            self._reroute(before=first_pass)

    # -- incoming ---------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                parsed = self.topics.parse(msg.topic)
                if parsed.kind is Kind.CLIENT_RESULTS:
                    self._on_result_chunk(msg.payload)
                elif parsed.kind is Kind.PLAN:
                    await self.watch.on_plan(msg.topic, msg.payload)
                    await self._follow_plan_agents()
                    self._reroute()
                elif parsed.kind in (Kind.STATUS, Kind.PLANNER_STATUS):
                    self._on_status(parsed.agent_id, msg.topic, msg.payload)
                    await self.watch.notify()
                else:  # info and telemetry: the shared fold keeps what routing reads
                    self.fleet.apply(msg.topic, msg.payload, time.time())
            except EdgesliceError as exc:
                self._dropped("dropped message on %s: %s", msg.topic, exc)

    async def _follow_plan_agents(self) -> None:
        """Subscribe to the plan's agents' status and info by exact topic, once each:
        RabbitMQ delivers retained messages only to subscriptions without wildcards."""
        plan = self.plan
        for agent_id in sorted({a for s in plan.stages for a in s.agents} if plan else ()):
            if agent_id not in self._followed:
                self._followed.add(agent_id)
                await self.client.subscribe(self.topics.status(agent_id), qos=1)
                await self.client.subscribe(self.topics.info(agent_id), qos=1)

    def _dropped(self, what: str, *args: object) -> None:
        """Log a message this client could not use: garbage must not become a flood of log
        lines (the first 20, then every 1000th, with the count), as in the agents."""
        self.dropped += 1
        (log.warning if self.dropped <= 20 or self.dropped % 1000 == 0 else log.debug)(
            "client=%s " + what + " (%d dropped so far)", self.client_id, *args, self.dropped
        )

    def _on_status(self, agent_id: str, topic: str, payload: bytes) -> None:
        """An agent (or the planner) said how it is: re-send what it can no longer answer."""
        now = time.time()
        self.fleet.apply(topic, payload, now)
        state = self.fleet.agents.get(agent_id) if agent_id else None
        if state is not None and state.online and now - self._reconnected_at < 30.0:
            # back after a broker restart: what was sent to it before may be lost
            self._reroute(via=agent_id, before=now)
        else:  # a last will or a drain: re-send what it holds; a planner gone: fail parked
            self._reroute()

    def _awaited(self, header: TransferHeader) -> str | None:
        """Reassembler gate: only results of requests this client is waiting for."""
        if header.request_id in self.requests.open and not self.requests.count_duplicate(
            header.request_id
        ):
            return None
        if self.requests.finished(header.request_id):
            self.requests.count_duplicate(header.request_id)
            return f"request {header.request_id[:32]!r} was answered already (a duplicate)"
        return f"request {header.request_id[:32]!r} is not one client {self.client_id} waits for"

    def _on_result_chunk(self, payload: bytes) -> None:
        now = time.time()
        if now - self._expired_at >= 1.0:  # drop half-finished results idle for a while
            self._expired_at = now
            self._reassembler.expire(now)
            self._pieces.expire(now)
        result = self._reassembler.feed(payload, now)
        if isinstance(result, Refused):
            if result.is_error and result.reason != "unexpected":
                self._dropped("result refused: %s %s", result.reason, result.detail)
            return
        if result is None:
            return
        req = self.requests.open.get(result.header.request_id)
        if req is None or self.requests.count_duplicate(req.request_id):
            return
        if result.header.kind == "error":
            failure = codec.from_wire(result.header.meta, ErrorReply)
            if self.requests.is_stale_error(
                req, result.header.plan_version, failure.stage, failure.agent
            ):
                return  # from a send this request was re-sent after: its new route answers
        elif isinstance(result.header.meta, dict) and result.header.meta.get("tiles"):
            gathered = self._pieces.add(result, now)  # one piece of a tiled plan's result
            if isinstance(gathered, str):
                self._dropped("%s", gathered)
            if not isinstance(gathered, GatheredResult):
                return
            req.future.set_result(gathered)
            return
        req.future.set_result(result)
