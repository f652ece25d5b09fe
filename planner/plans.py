"""Owns what a plan is: stages with their agents and predictions, priced by the cost model.

:func:`build_plan` prices any ``(start, end, agents)`` stages with the reference
functions of :mod:`planner.costmodel`; the partitioner, the baselines and the
brute-force oracle all return its :class:`Plan`, so their predictions compare.

Two periods: ``period_s`` (and ``throughput_rps``) is the batch-1 prediction, what a
benchmark with a couple of requests in flight per device measures (batches there hold one
or two requests) and what the fitted correction is checked against, so it stays the
reported figure; ``saturated_period_s`` is the period once every agent's queue is full
and the stages that batch run full batches (:mod:`planner.batchcost`). Each stage also
carries the ``max_batch`` the plan tells its agents (1 where batching was measured to
hurt, None: their own setting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.batchcost import saturated_period_s, stage_max_batch
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    client_period_s,
    compute_s,
    stage_in_bytes,
    stage_memory_bytes,
    stage_period_s,
    transfer_s,
)


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
    saturated_period_s: float = 0.0  # the same with full queues (batched where it batches)
    max_batch: int | None = None  # told to its agents: 1 = do not batch, None = their own


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
    period_s: float  # max(slowest stage's effective period, the client's period)
    throughput_rps: float
    exact: bool = False
    client_period_s: float = 0.0  # the client's own time per request (link + pack/unpack)
    saturated_period_s: float = 0.0  # period with every queue full (module docstring)


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
        full = sum(1.0 / saturated_period_s(model, start, end, by_id[a], params) for a in agents)
        mem = stage_memory_bytes(model, start, end, params)
        limit = stage_max_batch(model, start, end)
        out.append(
            StagePlan(
                index, start, end, tuple(agents), comp, hop, mem, 1.0 / rate, 1.0 / full, limit
            )
        )
        latency += hop + comp
        prev = primary
    latency += transfer_s(model.output_bytes, prev, None, params)
    client = client_period_s(model, params)
    period = max(client, *(s.period_s for s in out))
    saturated = max(client, *(s.saturated_period_s for s in out))
    return Plan(
        model.name,
        objective,
        strategy,
        tuple(out),
        latency,
        period,
        1.0 / period,
        exact,
        client,
        saturated,
    )


def validated(
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


def pipeline_cost(
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
