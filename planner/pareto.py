"""Owns the latency/throughput trade-off: candidate plans, their Pareto front, and the pick.

Like ParetoPipe, the candidates come from the partition search itself
(:func:`~planner.search.search`, as :func:`~planner.partition.plan_partition` runs it): for
both objectives and every pipeline length :func:`~planner.search.stage_limits` tries, the
best pipeline of at most that many stages, once as it is and once with the spare devices
as replicas (:func:`~planner.search.add_replicas`). Each is priced by
:func:`~planner.plans.build_plan`, so its predicted latency (one request, primaries only)
and period (time per request at saturation) are the planner's own. Layouts found twice
are kept once, under the first way they were found.

:func:`pareto_front` keeps the candidates no other beats on both figures, sorted by
latency (so by falling period too). It holds the latency-optimal plan and, because the
throughput candidates are exactly those :func:`plan_partition` chooses among, the
throughput-optimal one (with ``margin=0``).

:func:`plan_under_latency` is what ``edgeslice planner --max-latency-ms X`` serves: the
point of highest throughput whose latency is within X, the served plan kept while it is
within X and not beaten by more than the decision margin. :func:`selecting_bounds` gives,
for each point of a front, a bound that selects exactly it on the same fleet (what
``edgeslice plan`` prints). All pure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.costmodel import DEFAULT_PARAMS, CostParams, Device, ModelCost
from edgeslice.planner.costtable import CostTable
from edgeslice.planner.margin import DEFAULT_MARGIN, worth_switching
from edgeslice.planner.partition import baseline_plan
from edgeslice.planner.plans import Plan, build_plan, validated
from edgeslice.planner.search import add_replicas, device_classes, search, stage_limits

OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class Candidate:
    """A priced plan and how the search found it, e.g. ``throughput, <=3 stages, replicas``."""

    plan: Plan
    found_by: str

    @property
    def latency_s(self) -> float:
        return self.plan.latency_s

    @property
    def period_s(self) -> float:
        return self.plan.period_s

    @property
    def devices(self) -> int:
        return sum(len(s.agents) for s in self.plan.stages)


def candidate_plans(
    model: ModelCost,
    devices: Sequence[Device],
    params: CostParams = DEFAULT_PARAMS,
    max_stages: int | None = None,
    exact: bool | None = None,
) -> list[Candidate]:
    """Every plan the search proposes over objectives x stage counts x replication.

    Raises :class:`~edgeslice.broker.protocol.errors.PlanningError` for invalid inputs (as
    :func:`plan_partition` does); an empty list when no pipeline fits the fleet.
    """
    devs = validated(model, devices, params, max_stages)
    t = CostTable(model, devs, params)
    limit = min(len(devs), t.n, max_stages or len(devs))
    classes = device_classes(devs, params)
    found: dict[tuple[tuple[int, int, tuple[int, ...]], ...], Candidate] = {}
    for objective in OBJECTIVES:
        for k in stage_limits(limit):
            stages, proven = search(t, classes, objective, k, exact, thorough=k == limit)
            if not stages:
                continue
            used = {d for _, _, d in stages}
            for replicas in (False, True):
                groups = [(i, j, [d]) for i, j, d in stages]
                if replicas:
                    add_replicas(t, groups, [d for d in range(len(devs)) if d not in used])
                key = tuple((i, j, tuple(ds)) for i, j, ds in groups)
                if key in found:
                    continue
                named = [(i, j, [devs[d].agent_id for d in ds]) for i, j, ds in groups]
                plan = build_plan(
                    model, devs, named, objective=objective, strategy="edgeslice", params=params
                )
                label = f"{objective}, <={k} stage{'s' * (k != 1)}"
                label += ", replicas" if replicas else ""
                found[key] = Candidate(dataclasses.replace(plan, exact=proven), label)
    return list(found.values())


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both latency and period, by rising latency.

    Of candidates with equal figures the first (fewest devices, then listed first) stays.
    """
    ranked = sorted(
        enumerate(candidates), key=lambda x: (x[1].latency_s, x[1].period_s, x[1].devices, x[0])
    )
    front: list[Candidate] = []
    for _, cand in ranked:
        if not front or cand.period_s < front[-1].period_s:
            front.append(cand)
    return front


def dominated(a: Candidate, b: Candidate) -> bool:
    """Whether ``b`` is at least as good as ``a`` on both figures and better on one."""
    no_worse = b.latency_s <= a.latency_s and b.period_s <= a.period_s
    return no_worse and (b.latency_s < a.latency_s or b.period_s < a.period_s)


def pick_under_latency(candidates: Sequence[Candidate], max_latency_s: float) -> Candidate | None:
    """The candidate of highest throughput with latency <= the bound (then lowest latency);
    None when none is within it."""
    within = [c for c in candidates if c.latency_s <= max_latency_s * (1 + 1e-9)]
    return min(within, key=lambda c: (c.period_s, c.latency_s, c.devices), default=None)


def selecting_bounds(front: Sequence[Candidate]) -> list[float]:
    """For each point of a front (by rising latency), a latency bound in ms, with as few
    decimals as needed, that :func:`pick_under_latency` answers with exactly that point."""
    bounds = []
    for k, cand in enumerate(front):
        ms = cand.latency_s * 1e3
        nxt = front[k + 1].latency_s * 1e3 if k + 1 < len(front) else math.inf
        for digits in range(1, 7):
            scale = 10**digits
            bound = math.ceil(ms * scale * (1 + 1e-12)) / scale
            if bound < nxt:
                break
        bounds.append(bound)
    return bounds


def plan_under_latency(
    model: ModelCost,
    devices: Sequence[Device],
    max_latency_s: float,
    params: CostParams = DEFAULT_PARAMS,
    max_stages: int | None = None,
    margin: float = DEFAULT_MARGIN,
    baseline: Sequence[tuple[int, int, Sequence[str]]] | None = None,
) -> tuple[Plan, bool]:
    """The highest-throughput plan within ``max_latency_s``, and whether the bound is met.

    When no plan meets the bound, the plan of least latency (the front's first point) and
    False. ``baseline`` (the served plan, re-priced with new spares as replicas) is kept
    while within the bound and not beaten on period by more than ``margin``. The plan's
    objective reads ``throughput``: it is the throughput objective under a latency bound.
    """
    front = pareto_front(candidate_plans(model, devices, params, max_stages))
    if not front:
        raise PlanningError(
            f"cannot plan model {model.name!r}: no split of its segments over the "
            f"{len(devices)} agent(s) fits their memory budgets; add devices or memory, "
            "or allow more stages"
        )
    chosen = pick_under_latency(front, max_latency_s)
    met = chosen is not None
    plan = (chosen or front[0]).plan
    kept = baseline_plan(model, devices, baseline or [], params, max_stages)
    if (
        kept is not None
        and met
        and kept.latency_s <= max_latency_s * (1 + 1e-9)
        and not worth_switching(plan.period_s, kept.period_s, margin)
    ):
        plan = kept
    return dataclasses.replace(plan, objective="throughput"), met
