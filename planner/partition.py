"""Owns the choice of a pipeline plan: contiguous stages on distinct devices, plus replicas.

The problem: cut a model's ``n`` segments into contiguous stages and give each
stage its own device (devices differ in speed, memory and link) so that every
stage fits its device's memory, minimising either one request's latency
(``latency``) or the steady-state time per request, i.e. the slowest stage
(``throughput``, ties broken by latency). Because every hop goes through the
broker, a stage's cost depends only on its own range and its own device
(:class:`~planner.costmodel.CostTable`): latency is a *sum* over stages, the
period a *max*. Choosing which devices and in which order is what makes it hard
(heterogeneous chains-to-chains partitioning is NP-complete), so:

1. **Exact DP** over (cut point, multiset of used device classes). Devices whose
   cost numbers are identical form a class; a state counts the devices used per
   class, ``S = prod(count_k + 1)`` states (``2**D`` when all differ). Adding one
   stage on class ``c`` to a state's best prefix values costs O(n) for latency
   (memory limits make the valid stage starts a sliding window: monotone deque)
   and O(n·w) for the bottleneck, ``w`` being the starts that stay under the
   best known period. Throughput runs twice: the least period ``T*``, then the
   least latency over stages of period <= ``T*``. Time O(S·C·n) (latency) or
   O(S·C·n·w) (throughput), memory O(S·n). Exact for the cost model; used when
   its estimated time is under ``EXACT_BUDGET_US`` (40 ms) or when ``exact=True``.
2. **Latency, any fleet: lazy constraints.** Relax distinctness (devices may
   repeat; O(n·D) with sliding minima), then make every device the answer repeats
   "tracked" (used at most once: one layer of prefix values per subset of tracked
   devices, O(2**u·n·D)) and solve again. Every round is a lower bound, so the
   first answer that repeats no device is the exact optimum (``exact=True``).
   Latency wants few stages, so ``u`` stays at 0-2 in practice; if the rounds
   outgrow the budget (or the answer has more than ``max_stages`` stages), step
   1 runs when affordable, else the exact DP on the best devices that fit the
   budget and a greedy order compete (``exact=False``).
3. **Throughput, large fleets.** Binary search on the bottleneck ``T`` with a
   greedy probe (left to right, the unused device that reaches furthest within
   ``T``, unless the devices left could no longer hold the rest of the model's
   memory or FLOPs; O(D²·log n) per probe). Then a local search on the device
   order from three starts (the greedy's order, fastest first, slowest first):
   swap two devices or move one, keep a move that lowers the bottleneck by 0.1 %,
   as proven by a fixed-order furthest-reach probe (memoised, resumed from the
   first changed place); the scan goes on from the last gain and stops after a
   full round without one or 1500 probes per start. Finally the exact DP
   restricted to the best order (any subsequence of it) re-cuts it, O(k·n·w).
   ``exact=False``; ``benchmarks/planner_bench.py`` measures the gap to the
   exact DP.
4. **Replicas**: spare devices join the stage with the largest effective period
   (replicas share requests, so rates add: ``1 / sum(1 / period_a)``) while that
   stage fits the spare; the fastest fitting spare goes first. For throughput,
   a shorter pipeline leaves more devices to replicate (a model that fits one
   board is often fastest as pure data parallelism), so pipelines limited to
   1, 2, ..., 8, 16, 32, ... stages and the unlimited one are each searched (the
   shorter ones with a quarter of the exact-DP budget and a cheaper local
   search) and completed with replicas. From the shortest up, a deeper one
   wins only if its period is lower by more than ``margin``
   (:mod:`planner.margin`: the model's measured prediction error, 10 % by
   default): every stage adds hops, and a gain smaller than the error is noise.
5. **Baseline** (the plan being served): re-priced on the current fleet, given
   the new spare devices as replicas, and kept unless the search's plan beats it
   by more than ``margin``. Re-planning after a device joins therefore never
   predicts a lower throughput than before (the old plan plus a replica is
   always a candidate), and never deepens the pipeline for a gain within the
   error; the same rule is the hysteresis against flapping.

``Plan.exact`` is True exactly when step 1 ran or step 2 ended without a
repeated device. It speaks for the pipeline of primaries (replicas are added
greedily): with ``replicas=False`` it means no plan of at most ``max_stages``
stages does better on the objective under the cost model.

A stage's period is ``max(CPU, downlink, uplink)`` with the CPU counting both
sides of its hops (:mod:`planner.costmodel`), and a plan's period is never below
the client's own (:func:`~planner.costmodel.client_period_s`); the broker's
capacity is not modelled as a bottleneck. For ``throughput`` the period searched is the
saturated one: on devices whose agents batch, a stage's compute is divided by the batch
gains measured per segment (:mod:`planner.batchcost`); the plan still *reports* its
batch-1 period (:class:`~planner.plans.Plan`), the one measured with few requests in
flight, and its saturated period beside it.

Plans are priced in :mod:`planner.plans`; baselines for benchmarks (same
:class:`Plan`, same cost model) are in :mod:`planner.baselines` (:data:`STRATEGIES`);
:func:`brute_force_partition` is the test oracle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations, pairwise, permutations
from typing import Literal

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.baselines import (
    STRATEGIES,
    amp4ec_balanced,
    even_split,
    memory_proportional,
    monolithic,
)
from edgeslice.planner.costmodel import DEFAULT_PARAMS, CostParams, Device, ModelCost, fits
from edgeslice.planner.costtable import CostTable
from edgeslice.planner.margin import DEFAULT_MARGIN, gain, worth_switching
from edgeslice.planner.plans import Plan, StagePlan, build_plan, pipeline_cost, validated
from edgeslice.planner.search import (
    EXACT_BUDGET_US,
    Group,
    add_replicas,
    device_classes,
    group_cost,
    plan_groups,
)

__all__ = [
    "EXACT_BUDGET_US",
    "STRATEGIES",
    "Plan",
    "StagePlan",
    "amp4ec_balanced",
    "baseline_plan",
    "brute_force_partition",
    "build_plan",
    "even_split",
    "memory_proportional",
    "monolithic",
    "plan_partition",
]
Objective = Literal["latency", "throughput"]


def plan_partition(
    model: ModelCost,
    devices: Sequence[Device],
    objective: Objective,
    params: CostParams = DEFAULT_PARAMS,
    max_stages: int | None = None,
    replicas: bool = True,
    *,
    exact: bool | None = None,
    margin: float = DEFAULT_MARGIN,
    baseline: Sequence[tuple[int, int, Sequence[str]]] | None = None,
) -> Plan:
    """The best pipeline for ``objective`` (see the module docstring for how and when exact).

    ``exact=None`` runs the exponential DP only when its estimated work is small,
    ``True`` always (exponential in distinct devices), ``False`` never (a latency
    plan may still come out proven by the lazy relaxation). ``Plan.exact`` says
    whether the result is proven optimal. ``margin`` is the relative gain a deeper
    pipeline (or any plan other than ``baseline``) must show
    (:func:`~planner.margin.decision_margin`); ``baseline`` is the plan being
    served as ``(start, end, agents)``, kept (with spare devices as new replicas)
    unless beaten by more than ``margin``; agents no longer in the fleet are
    dropped from it and it is ignored when a stage loses all of them. Raises
    :class:`PlanningError` when no plan fits the fleet or the inputs are invalid.
    """
    if objective not in ("latency", "throughput"):
        raise PlanningError(f"unknown objective {objective!r}; use 'latency' or 'throughput'")
    devs = validated(model, devices, params, max_stages)
    t = CostTable(model, devs, params, batched=objective == "throughput")
    limit = min(len(devs), t.n, max_stages or len(devs))
    classes = device_classes(devs, params)
    groups, proven = plan_groups(t, classes, objective, limit, exact, replicas, margin)
    if any(t.batching):
        t1 = CostTable(model, devs, params, batched=False)
        plain = plan_groups(t1, classes, objective, limit, exact, replicas, margin)
        groups, proven = _batch_guard(t, t1, (groups, proven), plain, margin)
    kept = _baseline_groups(t, devs, baseline or [], replicas, max_stages)
    if kept is not None and groups:
        pick = 0 if objective == "throughput" else 1
        new, old = group_cost(t, groups)[pick], group_cost(t, kept)[pick]
        if kept == groups or not worth_switching(new, old, margin):
            groups, proven = kept, proven and kept == groups
    if not groups:
        how = "" if proven else " (heuristic search for this fleet size; exact=True is exhaustive)"
        raise PlanningError(
            f"cannot plan model {model.name!r}: no split of its {t.n} segments over at most "
            f"{limit} distinct devices fits their memory budgets{how}; the weights alone need "
            f"{math.ceil(t.weights[-1])} bytes and the fleet offers {sum(t.budget)} bytes; "
            "add devices or memory, or allow more stages"
        )
    named = [(i, j, [devs[d].agent_id for d in ds]) for i, j, ds in groups]
    return build_plan(
        model, devs, named, objective=objective, strategy="edgeslice", params=params, exact=proven
    )


def _batch_guard(
    t: CostTable,
    t1: CostTable,
    batched: tuple[list[Group], bool],
    plain: tuple[list[Group], bool],
    margin: float,
) -> tuple[list[Group], bool]:
    """The plan priced with batch gains only when it earns it; else the batch-1 plan.

    Batch gains price a *saturated* stage; below saturation (a few requests in flight per
    agent) batches are small and a plan chosen for its saturated period can be slower.
    So the batched plan (priced on ``t``) replaces the batch-1 plan (priced on ``t1``)
    only when its saturated period is better by more than ``margin`` (the planner's own
    prediction error) and its batch-1 period is not worse by more than ``margin``.
    """
    if not plain[0] or not batched[0] or plain[0] == batched[0]:
        return batched if batched[0] else plain
    saturated = worth_switching(group_cost(t, batched[0])[0], group_cost(t, plain[0])[0], margin)
    light = gain(group_cost(t1, batched[0])[0], group_cost(t1, plain[0])[0]) >= -margin
    return batched if saturated and light else plain


def baseline_plan(
    model: ModelCost,
    devices: Sequence[Device],
    baseline: Sequence[tuple[int, int, Sequence[str]]],
    params: CostParams = DEFAULT_PARAMS,
    max_stages: int | None = None,
    replicas: bool = True,
    objective: str = "throughput",
) -> Plan | None:
    """``baseline`` (the plan being served) re-priced on today's fleet as
    :func:`plan_partition` keeps it (spare devices as replicas), or None when it no longer
    fits the fleet or the limits."""
    if not baseline:
        return None
    devs = validated(model, devices, params, max_stages)
    t = CostTable(model, devs, params, batched=objective == "throughput")
    kept = _baseline_groups(t, devs, baseline, replicas, max_stages)
    if kept is None:
        return None
    named = [(i, j, [devs[d].agent_id for d in ds]) for i, j, ds in kept]
    return build_plan(model, devs, named, objective=objective, strategy="edgeslice", params=params)


def _baseline_groups(
    t: CostTable,
    devs: Sequence[Device],
    baseline: Sequence[tuple[int, int, Sequence[str]]],
    replicas: bool,
    max_stages: int | None,
) -> list[Group] | None:
    """``baseline`` on today's fleet (gone or no longer fitting agents dropped, spares
    as replicas), or None when it no longer covers the model or breaks a limit."""
    index = {d.agent_id: k for k, d in enumerate(devs)}
    groups: list[Group] = []
    pos = 0
    for start, end, agents in baseline:
        if start != pos or end <= start or end > t.n:
            return None
        ds = [index[a] for a in agents if a in index and t.fits(start, end, index[a])]
        if not ds:
            return None
        groups.append((start, end, ds))
        pos = end
    used = [d for _, _, ds in groups for d in ds]
    if pos != t.n or len(used) != len(set(used)) or len(groups) > (max_stages or t.n):
        return None
    if not replicas and len(used) > len(groups):
        return None
    if replicas:
        add_replicas(t, groups, [d for d in range(len(devs)) if d not in set(used)])
    return groups


def brute_force_partition(
    model: ModelCost,
    devices: Sequence[Device],
    objective: Objective,
    params: CostParams = DEFAULT_PARAMS,
    max_stages: int | None = None,
) -> Plan:
    """Test oracle: every ordered choice of devices and every set of cuts; no replicas.

    Exponential (sum over k of P(D, k) * C(n - 1, k - 1) pipelines): only for tiny instances.
    """
    devs = validated(model, devices, params, max_stages)
    n = len(model.segments)
    found: list[tuple[float, float, list[tuple[int, int]], tuple[Device, ...]]] = []
    for k in range(1, min(len(devs), n, max_stages or n) + 1):
        for cuts in combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            ranges = list(pairwise(bounds))
            for chosen in permutations(devs, k):
                if all(
                    fits(model, a, b, d, params) for (a, b), d in zip(ranges, chosen, strict=True)
                ):
                    latency, period = pipeline_cost(model, ranges, chosen, params)
                    found.append((period, latency, ranges, chosen))
    if not found:
        raise PlanningError(f"cannot plan model {model.name!r}: no pipeline fits the fleet")
    if objective == "throughput":
        cap = min(f[0] for f in found) * (1 + 1e-9) + 1e-15
        found = [f for f in found if f[0] <= cap]
    _, _, ranges, chosen = min(found, key=lambda f: f[1])
    stages = [(a, b, (d.agent_id,)) for (a, b), d in zip(ranges, chosen, strict=True)]
    return build_plan(
        model, devs, stages, objective=objective, strategy="brute-force", params=params, exact=True
    )
