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
   1, 2, 3, 4, 8, 16, ... stages and the unlimited one are each searched (the
   shorter ones with a quarter of the exact-DP budget and a cheaper local
   search), completed with replicas, and the lowest period wins.

``Plan.exact`` is True exactly when step 1 ran or step 2 ended without a
repeated device. It speaks for the pipeline of primaries (replicas are added
greedily): with ``replicas=False`` it means no plan of at most ``max_stages``
stages does better on the objective under the cost model.

The period counts each stage's own link (receive + send) and compute; the
client's link and the broker's own capacity are not modelled as bottlenecks.

Baselines for benchmarks (same :class:`Plan`, same cost model) are in
:data:`STRATEGIES`; :func:`brute_force_partition` is the test oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise, permutations
from typing import Literal

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    CostTable,
    Device,
    ModelCost,
    compute_s,
    fits,
    stage_in_bytes,
    stage_memory_bytes,
    stage_period_s,
    transfer_s,
)
from edgeslice.planner.search import EXACT_BUDGET_US, device_classes, plan_groups

__all__ = [
    "EXACT_BUDGET_US",
    "STRATEGIES",
    "Plan",
    "StagePlan",
    "amp4ec_balanced",
    "brute_force_partition",
    "build_plan",
    "even_split",
    "memory_proportional",
    "monolithic",
    "plan_partition",
]
Objective = Literal["latency", "throughput"]


@dataclass(frozen=True)
class StagePlan:
    """One stage: segments ``[start, end)`` on ``agents`` (first = primary, rest = replicas)."""

    index: int
    start: int
    end: int
    agents: tuple[str, ...]
    compute_s: float  # on the primary
    in_transfer_s: float  # previous primary (or the client) -> this primary
    memory_bytes: int
    period_s: float  # busy time per request, replicas sharing the load


@dataclass(frozen=True)
class Plan:
    """A placement with its predictions.

    ``exact`` says the search proved the pipeline of primaries optimal for the
    objective among pipelines of its length limit; replicas are added greedily.
    """

    model: str
    objective: str
    strategy: str
    stages: tuple[StagePlan, ...]
    latency_s: float  # client -> stages -> client, one request, primaries only
    period_s: float  # slowest stage's effective period
    throughput_rps: float
    exact: bool = False


def build_plan(
    model: ModelCost,
    devices: Sequence[Device],
    stages: Sequence[tuple[int, int, Sequence[str]]],
    *,
    objective: str,
    strategy: str,
    params: CostParams = DEFAULT_PARAMS,
    exact: bool = False,
) -> Plan:
    """Price ``(start, end, agents)`` stages with the reference cost functions."""
    by_id = {d.agent_id: d for d in devices}
    out: list[StagePlan] = []
    latency, prev = 0.0, None
    for index, (start, end, agents) in enumerate(stages):
        missing = [a for a in agents if a not in by_id]
        if missing:
            raise PlanningError(f"stage {index} names agents {missing} that are not in the fleet")
        primary = by_id[agents[0]]
        comp = compute_s(model, start, end, primary, params)
        hop = transfer_s(stage_in_bytes(model, start), prev, primary, params)
        rate = sum(1.0 / stage_period_s(model, start, end, by_id[a], params) for a in agents)
        mem = stage_memory_bytes(model, start, end, params)
        out.append(StagePlan(index, start, end, tuple(agents), comp, hop, mem, 1.0 / rate))
        latency += hop + comp
        prev = primary
    latency += transfer_s(model.output_bytes, prev, None, params)
    period = max(s.period_s for s in out)
    return Plan(model.name, objective, strategy, tuple(out), latency, period, 1.0 / period, exact)


def _validated(
    model: ModelCost, devices: Sequence[Device], params: CostParams, max_stages: int | None = None
) -> list[Device]:
    """Check inputs and the one-segment memory bound; devices sorted by id (determinism)."""
    where = f"cannot plan model {model.name!r}"
    if not model.segments:
        raise PlanningError(f"{where}: it has no segments; profile it first")
    if not devices:
        raise PlanningError(f"{where}: no devices are available; start an agent and retry")
    if len({d.agent_id for d in devices}) != len(devices):
        raise PlanningError(f"{where}: duplicate agent ids in the fleet")
    for d in devices:
        if not (d.gflops > 0 and d.bandwidth_bps > 0 and d.rtt_s >= 0 and d.memory_bytes >= 0):
            raise PlanningError(f"{where}: agent {d.agent_id!r} reports {d}; recalibrate it")
    if max_stages is not None and max_stages < 1:
        raise PlanningError(f"{where}: max_stages must be at least 1, got {max_stages}")
    largest = max(devices, key=lambda d: (d.memory_bytes, d.agent_id))
    for k in range(len(model.segments)):
        need = stage_memory_bytes(model, k, k + 1, params)
        if need > largest.memory_bytes:
            raise PlanningError(
                f"{where}: segment {k} needs {need} bytes (x{params.memory_factor} headroom) but "
                f"the largest budget is {largest.memory_bytes} bytes (agent "
                f"{largest.agent_id!r}); add a device with more memory or cut the model finer"
            )
    return sorted(devices, key=lambda d: d.agent_id)


def plan_partition(
    model: ModelCost,
    devices: Sequence[Device],
    objective: Objective,
    params: CostParams = DEFAULT_PARAMS,
    max_stages: int | None = None,
    replicas: bool = True,
    *,
    exact: bool | None = None,
) -> Plan:
    """The best pipeline for ``objective`` (see the module docstring for how and when exact).

    ``exact=None`` runs the exponential DP only when its estimated work is small,
    ``True`` always (exponential in distinct devices), ``False`` never (a latency
    plan may still come out proven by the lazy relaxation). ``Plan.exact`` says
    whether the result is proven optimal. Raises :class:`PlanningError` when no
    plan fits the fleet or the inputs are invalid.
    """
    if objective not in ("latency", "throughput"):
        raise PlanningError(f"unknown objective {objective!r}; use 'latency' or 'throughput'")
    devs = _validated(model, devices, params, max_stages)
    t = CostTable(model, devs, params)
    limit = min(len(devs), t.n, max_stages or len(devs))
    classes = device_classes(devs, params)
    groups, proven = plan_groups(t, classes, objective, limit, exact, replicas)
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


def _pipeline_cost(
    model: ModelCost, ranges: Sequence[tuple[int, int]], chosen: Sequence[Device], p: CostParams
) -> tuple[float, float]:
    """(latency, period) of single-agent stages, from the reference cost functions."""
    latency, prev, period = 0.0, None, 0.0
    for (start, end), d in zip(ranges, chosen, strict=True):
        latency += transfer_s(stage_in_bytes(model, start), prev, d, p)
        latency += compute_s(model, start, end, d, p)
        period = max(period, stage_period_s(model, start, end, d, p))
        prev = d
    return latency + transfer_s(model.output_bytes, prev, None, p), period


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
    devs = _validated(model, devices, params, max_stages)
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
                    latency, period = _pipeline_cost(model, ranges, chosen, params)
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


def _contiguous(
    model: ModelCost,
    devices: Sequence[Device],
    counts: Sequence[int],
    params: CostParams,
    strategy: str,
) -> Plan:
    """Consecutive runs of ``counts[k]`` segments on ``devices[k]`` (zero counts skipped)."""
    stages, pos = [], 0
    for d, count in zip(devices, counts, strict=True):
        if count:
            if not fits(model, pos, pos + count, d, params):
                need = stage_memory_bytes(model, pos, pos + count, params)
                raise PlanningError(
                    f"{strategy}: segments [{pos}, {pos + count}) need {need} bytes but agent "
                    f"{d.agent_id!r} has {d.memory_bytes}; this strategy cannot run on this fleet"
                )
            stages.append((pos, pos + count, (d.agent_id,)))
            pos += count
    return build_plan(model, devices, stages, objective="none", strategy=strategy, params=params)


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` items in proportion to ``weights`` (largest remainder, sums exactly)."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda k: (counts[k] - shares[k], k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def monolithic(
    model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
) -> Plan:
    """The whole model on the one device that fits and answers fastest (AMP4EC's baseline)."""
    devs = _validated(model, devices, params)
    n = len(model.segments)
    fitting = [d for d in devs if fits(model, 0, n, d, params)]
    if not fitting:
        need = stage_memory_bytes(model, 0, n, params)
        raise PlanningError(f"monolithic: model {model.name!r} needs {need} bytes on one device")
    best = min(fitting, key=lambda d: _pipeline_cost(model, [(0, n)], [d], params)[0])
    return _contiguous(model, [best], [n], params, "monolithic")


def even_split(
    model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
) -> Plan:
    """Equal numbers of segments per device in the given order (distributed-llama style)."""
    _validated(model, devices, params)
    k = min(len(devices), len(model.segments))
    base, extra = divmod(len(model.segments), k)
    counts = [base + (idx < extra) for idx in range(k)]
    return _contiguous(model, devices[:k], counts, params, "even-split")


def memory_proportional(
    model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
) -> Plan:
    """Segments in proportion to memory, largest memory first (exo's ring placement)."""
    _validated(model, devices, params)
    devs = sorted(devices, key=lambda d: (-d.memory_bytes, d.agent_id))
    counts = _apportion(len(model.segments), [max(d.memory_bytes, 1) for d in devs])
    return _contiguous(model, devs, counts, params, "memory-proportional")


def amp4ec_balanced(
    model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
) -> Plan:
    """AMP4EC: contiguous cuts balancing FLOPs in proportion to each device's capacity.

    Devices keep the given order; capacity is the calibrated rate left by the
    current load. Cut ``m`` goes where cumulative FLOPs come closest to the
    first ``m`` devices' share, keeping at least one segment per device.
    """
    _validated(model, devices, params)
    n = len(model.segments)
    devs = list(devices[: min(len(devices), n)])
    capacity = [d.gflops * (1.0 - min(max(d.load, 0.0), 0.9)) for d in devs]
    flops = [0.0]
    for seg in model.segments:
        flops.append(flops[-1] + seg.flops)
    cuts, share = [0], 0.0
    for m in range(1, len(devs)):
        share += capacity[m - 1] / sum(capacity)
        lo, hi = cuts[-1] + 1, n - (len(devs) - m)
        cuts.append(min(range(lo, hi + 1), key=lambda p: abs(flops[p] - share * flops[n])))
    cuts.append(n)
    counts = [b - a for a, b in pairwise(cuts)]
    return _contiguous(model, devs, counts, params, "amp4ec")


Strategy = Callable[[ModelCost, Sequence[Device], CostParams], Plan]
STRATEGIES: dict[str, Strategy] = {
    "monolithic": monolithic,
    "even-split": even_split,
    "memory-proportional": memory_proportional,
    "amp4ec": amp4ec_balanced,
}
