"""A discrete-event simulator of a plan on a fleet, priced by the planner's own cost model.

Why: this machine has two cores, so fleets of 8-64 devices can only be *simulated*. The
simulator uses exactly the cost functions the planner plans with (``compute_s``,
``link_occupancy_s``, round trips and per-chunk overheads of ``transfer_s``), so its
figures are the cost model's view of a running fleet, with queueing and contention the
closed-form predictions leave out; checking it against measured 4-device runs tells how
far that view is from reality (``benchmarks/simulation.py`` reports the error).

Model: every device has three FIFO resources (CPU, uplink, downlink), the client one
uplink and one downlink; the broker is not a bottleneck. A request is a chain of tasks:
client uplink -> [stage k: device downlink -> CPU -> device uplink] -> client downlink,
plus half of each side's round trip per hop. The replica for stage k is chosen when the
request reaches it, by the same policies as :mod:`planner.client`: ``"edgeslice"``
(earliest expected finish among replicas) or ``"amp4ec"`` (the paper's weighted score).
Closed loop: ``in_flight`` requests outstanding, a new one issued as one completes.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    compute_s,
    link_occupancy_s,
    stage_in_bytes,
    stage_period_s,
)
from planner.partition import Plan
from planner.scoring import Candidate, Weights, choose


@dataclass
class _Resource:
    free_at: float = 0.0
    busy_s: float = 0.0

    def serve(self, ready: float, duration: float) -> float:
        start = max(ready, self.free_at)
        self.free_at = start + duration
        self.busy_s += duration
        return self.free_at


@dataclass(frozen=True)
class SimResult:
    """What a simulated run measured (all figures simulated, never measured)."""

    latencies_s: tuple[float, ...]
    throughput_rps: float
    p50_s: float
    p95_s: float
    utilisation: dict[str, float] = field(default_factory=dict)  # device -> CPU busy share


@dataclass
class _Request:
    index: int
    issued: float
    stage: int = 0
    agent: str = ""


def simulate(
    model: ModelCost,
    plan: Plan,
    devices: Sequence[Device],
    in_flight: int = 1,
    requests: int = 50,
    warmup: int = 5,
    dispatch: str = "edgeslice",
    params: CostParams = DEFAULT_PARAMS,
    weights: Weights | None = None,
) -> SimResult:
    """Run ``requests`` requests through ``plan`` in a closed loop of ``in_flight``."""
    if in_flight < 1 or requests < 1:
        raise ValueError("in_flight and requests must be >= 1")
    by_id = {d.agent_id: d for d in devices}
    cpu = {a: _Resource() for a in by_id}
    up = {a: _Resource() for a in by_id}
    down = {a: _Resource() for a in by_id}
    client_up, client_down = _Resource(), _Resource()
    outstanding = {a: 0 for a in by_id}
    recent: dict[tuple[str, int], float] = {}
    predicted = {
        (a, s.index): stage_period_s(model, s.start, s.end, by_id[a], params)
        for s in plan.stages
        for a in s.agents
    }
    events: list[tuple[float, int, int, _Request]] = []  # (time, seq, step, request)
    seq = 0
    latencies: list[float] = []
    done_at: list[float] = []
    issued = 0

    def push(t: float, step: int, req: _Request) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, step, req))

    def issue(t: float) -> None:
        nonlocal issued
        if issued < requests:
            req = _Request(issued, t)
            issued += 1
            end = client_up.serve(t, link_occupancy_s(model.input_bytes, None, params))
            push(end + params.client_rtt_s / 2, 0, req)

    def pick(stage_index: int) -> str:
        agents = plan.stages[stage_index].agents
        if len(agents) == 1:
            return agents[0]
        if dispatch == "amp4ec":
            cands = [
                Candidate(
                    a, 1.0, 0.0, recent.get((a, stage_index), 0.0), outstanding[a], by_id[a].rtt_s
                )
                for a in agents
            ]
            return choose(cands, weights or Weights()).agent_id
        return min(agents, key=lambda a: ((outstanding[a] + 1) * predicted[(a, stage_index)], a))

    for _ in range(in_flight):
        issue(0.0)
    while events:
        t, _, step, req = heapq.heappop(events)
        stage = plan.stages[req.stage]
        if step == 0:  # arrives at the broker for stage req.stage: pick, then download
            req.agent = pick(req.stage)
            outstanding[req.agent] += 1
            dev = by_id[req.agent]
            nbytes = stage_in_bytes(model, stage.start)
            end = down[req.agent].serve(t + dev.rtt_s / 2, link_occupancy_s(nbytes, dev, params))
            push(end, 1, req)
        elif step == 1:  # compute
            dev = by_id[req.agent]
            duration = compute_s(model, stage.start, stage.end, dev, params)
            end = cpu[req.agent].serve(t, duration)
            key = (req.agent, req.stage)
            recent[key] = duration if key not in recent else 0.7 * recent[key] + 0.3 * duration
            push(end, 2, req)
        else:  # upload the output, then the next stage or the client
            dev = by_id[req.agent]
            nbytes = model.segments[stage.end - 1].out_bytes
            end = up[req.agent].serve(t, link_occupancy_s(nbytes, dev, params))
            outstanding[req.agent] -= 1
            end += dev.rtt_s / 2
            if req.stage + 1 < len(plan.stages):
                req.stage += 1
                push(end, 0, req)
            else:
                finish = client_down.serve(
                    end + params.client_rtt_s / 2, link_occupancy_s(nbytes, None, params)
                )
                latencies.append(finish - req.issued)
                done_at.append(finish)
                issue(finish)
    skip = warmup if 0 < warmup < len(done_at) else 0  # steady state: after the warm-up
    start = done_at[skip - 1] if skip else 0.0
    span = done_at[-1] - start
    counted = len(done_at) - skip
    ordered = sorted(latencies)
    total = done_at[-1] if done_at else 1.0
    return SimResult(
        latencies_s=tuple(latencies),
        throughput_rps=counted / span if span > 0 else 0.0,
        p50_s=statistics.median(ordered),
        p95_s=ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        utilisation={a: r.busy_s / total for a, r in cpu.items()},
    )
