"""One client's requests in flight: where each is routed, when to re-send it, which result wins.

A request keeps one request id for its whole life; every (re-)send of it is one more
transfer of the same inputs along a route of the current ready plan. The client re-sends
at once -- it does not wait out a timeout -- when a route it used stops being good:

* the plan changed and no longer names one of the route's agents;
* one of the route's agents says it is not online (last will ``offline``, ``draining``);
* the client itself reconnected, or a route agent re-announced itself after that (a
  broker restart loses QoS 1 messages in flight).

A re-send that cannot go out yet (no ready plan routes around the lost agent) is
*parked* and goes out with the next ready plan. The first result for a request id wins;
later ones are duplicates, dropped and counted; an error from an earlier send (another
plan version or another agent than the current route names) is stale and ignored.

A request of a tiled plan (protocol 1.4) is sent as pieces to every tile of its first
stage and answered by pieces from every tile of its last; its route is then every agent
that holds a tile (each one's loss re-sends it), ``stage_agents`` the agents per stage.

Pure: :class:`RequestTracker` holds values and answers questions; the client performs
the sends. Also here: the result value handed to callers and the input check.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from edgeslice.broker.protocol.chunking import Completed, TransferHeader
from edgeslice.broker.protocol.errors import InferenceError
from edgeslice.broker.protocol.messages import OFFLINE, PlanMessage, PlannerStatus, StageTiming


@dataclass(frozen=True)
class InferenceResult:
    """Outputs of one request plus where its time went."""

    request_id: str
    outputs: list[Tensor]
    latency_s: float
    timings: list[dict[str, Any]]  # per stage: agent, recv/transfer/queue/compute seconds
    route: list[str]
    plan_version: int
    attempts: int = 1  # sends of this request id (re-sends and retries included)


@dataclass
class Measured:
    """What this client measured of one agent itself (the fleet's word is in FleetState)."""

    in_flight: int = 0  # this client's requests routed through the agent, not answered yet
    recent: dict[int, float] = field(default_factory=dict)  # stage -> EWMA queue+compute s
    compute: dict[int, float] = field(default_factory=dict)  # stage -> EWMA compute s


@dataclass
class InFlight:
    """One request: its packed inputs, where it was last sent, and the future its result sets."""

    request_id: str
    tensor_meta: list[dict[str, Any]]
    payload: bytes | memoryview
    deadline: float
    future: asyncio.Future[Completed | GatheredResult]
    route: list[str] = field(default_factory=list)  # empty: not sent yet
    plan_id: str = ""
    plan_version: int = 0
    sent_at: float = 0.0
    sends: int = 0
    parked: bool = False  # to be re-sent as soon as a ready plan routes it
    acks: list[asyncio.Future[None]] = field(default_factory=list)
    inputs: list[Tensor] = field(default_factory=list)  # kept to cut a tiled plan's pieces
    stage_agents: list[list[str]] = field(default_factory=list)  # last send: agents per stage


@dataclass(frozen=True)
class GatheredResult:
    """A tiled request's answer: outputs assembled from the last stage's pieces (the
    request's future holds this instead of a transfer); ``header`` is the last piece's."""

    header: TransferHeader
    outputs: list[Tensor]
    timings: list[StageTiming]


def plan_agents(plan: PlanMessage) -> set[str]:
    return {a for stage in plan.stages for a in stage.agents} | {
        t.agent_id for stage in plan.stages for t in stage.tiles
    }


def routable(plan: PlanMessage | None, offline: Iterable[str]) -> bool:
    """A ready plan with stages, and an agent not known to be offline for every stage
    (for a tiled stage: every tile's agent)."""
    if plan is None or not plan.ready or not plan.stages:
        return False
    down = set(offline)
    return all(
        all(t.agent_id not in down for t in stage.tiles)
        if stage.tiles
        else any(a not in down for a in stage.agents)
        for stage in plan.stages
    )


class RequestTracker:
    """The open requests of one client and the ids of recently finished ones."""

    def __init__(self, remember: int = 4096) -> None:
        self.open: dict[str, InFlight] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self.duplicates = 0  # results for a request that already had one
        self.stale_errors = 0  # errors from an earlier send of a request re-sent since
        self.resends = 0  # sends beyond a request's first

    def add(self, req: InFlight) -> None:
        self.open[req.request_id] = req

    def close(self, request_id: str) -> InFlight | None:
        req = self.open.pop(request_id, None)
        self._finished[request_id] = None
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)
        return req

    def finished(self, request_id: str) -> bool:
        return request_id in self._finished

    def count_duplicate(self, request_id: str) -> bool:
        """True (and counted) when a result for ``request_id`` comes after it was answered."""
        req = self.open.get(request_id)
        if request_id in self._finished or (req is not None and req.future.done()):
            self.duplicates += 1
            return True
        return False

    def needs_resend(self, req: InFlight, plan: PlanMessage | None, offline: set[str]) -> bool:
        """Is the route ``req`` was last sent along no good any more (module docstring)?"""
        if not req.route or req.future.done():
            return False
        if req.parked or any(a in offline for a in req.route):
            return True
        if plan is not None and plan.stages:
            return not set(req.route) <= plan_agents(plan)
        return False

    def to_resend(
        self,
        plan: PlanMessage | None,
        offline: set[str],
        everything: bool = False,
        via: str = "",
        before: float = 0.0,
    ) -> list[InFlight]:
        """Requests to send again: all sent ones (``everything``: after a reconnect), those
        last sent ``before`` a time (``via`` an agent if given: it came back since), else
        those whose route is no good any more."""
        sent = [r for r in self.open.values() if r.route and not r.future.done()]
        if everything:
            return sent
        if before:
            return [r for r in sent if r.sent_at <= before and (not via or via in r.route)]
        return [r for r in sent if self.needs_resend(r, plan, offline)]

    def is_stale_error(self, req: InFlight, plan_version: int, stage: int, agent: str) -> bool:
        """An error from an earlier send: another plan version or agent than the route's."""
        if req.stage_agents:
            current = 0 <= stage < len(req.stage_agents) and agent in req.stage_agents[stage]
        else:
            current = 0 <= stage < len(req.route) and req.route[stage] == agent
        if current and plan_version in (0, req.plan_version):  # error transfers may carry 0
            return False
        self.stale_errors += 1
        return True


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


def no_plan_reason(
    plan: PlanMessage | None, planner: PlannerStatus | None, offline: Iterable[str]
) -> str:
    """Why no request can be served now ("" if one may be): a withdrawn plan, or a kept
    plan with a stage no online agent runs whose planner is offline (nobody will re-plan).
    No plan at all is not a reason: a planner may be starting (the caller's timeout says)."""
    if plan is None:
        return ""
    if not plan.stages and plan.reason:
        return plan.reason
    if (
        planner is not None
        and planner.state == OFFLINE
        and planner.ts > 0  # stopped on purpose; a last will (crash, broker stop) may return
        and planner.model in ("", plan.model)
        and plan.ready
        and not routable(plan, offline)
    ):
        return (
            f"its planner is offline ({planner.summary or 'stopped'}) and plan "
            f"v{plan.plan_version} has a stage with no online agent; start the planner"
        )
    return ""
