"""Owns the baseline placements benchmarks compare edgeslice with (same Plan, same cost model).

Each takes ``(model, devices, params)`` and returns a :class:`~planner.plans.Plan`
priced by :func:`~planner.plans.build_plan`; none searches: they place the way the
systems they are named after do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    fits,
    stage_memory_bytes,
)
from edgeslice.planner.plans import Plan, build_plan, pipeline_cost, validated


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
    devs = validated(model, devices, params)
    n = len(model.segments)
    fitting = [d for d in devs if fits(model, 0, n, d, params)]
    if not fitting:
        need = stage_memory_bytes(model, 0, n, params)
        raise PlanningError(f"monolithic: model {model.name!r} needs {need} bytes on one device")
    best = min(fitting, key=lambda d: pipeline_cost(model, [(0, n)], [d], params)[0])
    return _contiguous(model, [best], [n], params, "monolithic")


def even_split(
    model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
) -> Plan:
    """Equal numbers of segments per device in the given order (distributed-llama style)."""
    validated(model, devices, params)
    k = min(len(devices), len(model.segments))
    base, extra = divmod(len(model.segments), k)
    counts = [base + (idx < extra) for idx in range(k)]
    return _contiguous(model, devices[:k], counts, params, "even-split")


def memory_proportional(
    model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
) -> Plan:
    """Segments in proportion to memory, largest memory first (exo's ring placement)."""
    validated(model, devices, params)
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
    validated(model, devices, params)
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
