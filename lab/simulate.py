"""Owns the discrete-event simulation of a plan on a fleet, priced by the planner's cost model.

Why: this machine has two cores, so fleets of 8-64 devices can only be *simulated*. Every
task is priced by the functions the planner plans with (``compute_s``, ``hop_cpu_time_s``,
``link_occupancy_s``, the broker round and round-trip halves of ``transfer_s``), so
simulated and predicted figures are comparable, and comparing the simulator with measured
runs (``benchmarks/simulation.py``) tells how far the cost model's view is from reality.

The event engine here runs requests through the simulated fleet of lab/simfleet.py
(resources, each request's chain of tasks, replica choice: described there): one heap
of (time, request) events, each request taking its next task when the previous ends, and
folds what happened into a :class:`SimResult`. Closed loop: ``in_flight`` requests
outstanding (:class:`~edgeslice.lab.simfleet.Workload`), a new one issued when one completes.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.client.scoring import Weights
from edgeslice.lab.simfleet import DISPATCH, SimRequest, SimRun, Workload
from edgeslice.planner.costmodel import DEFAULT_PARAMS, CostParams, Device, ModelCost
from edgeslice.planner.partition import Plan

DEFAULT_WORKLOAD = Workload()
DEFAULT_WEIGHTS = Weights()


@dataclass(frozen=True)
class StageStats:
    """One stage's share of a simulated run."""

    index: int
    tasks: dict[str, int]  # agent -> requests it served for this stage
    busy_fraction: float  # CPU time on this stage / (makespan x its agents)
    mean_queue_s: float  # mean wait for a CPU (what the agent reports as queue_s)
    mean_link_wait_s: float  # mean wait for this stage's downlink and uplink


@dataclass(frozen=True)
class DeviceStats:
    """Busy shares of one device's resources over the whole run (0..1)."""

    cpu: float
    uplink: float
    downlink: float
    tasks: int


@dataclass(frozen=True)
class SimResult:
    """What a simulated run observed; every figure is simulated, never measured."""

    latencies_s: tuple[float, ...]  # in completion order
    p50_s: float
    p95_s: float
    throughput_rps: float  # completions after the warm-up / the time they took
    makespan_s: float
    stages: tuple[StageStats, ...]
    devices: dict[str, DeviceStats] = field(default_factory=dict)
    client: DeviceStats = DeviceStats(0.0, 0.0, 0.0, 0)  # the client's CPU and link shares

    def bottleneck(self) -> tuple[str, float]:
        """The busiest resource, e.g. ``("cpu rpi4-4gb-3", 0.98)`` or ``("client uplink", ..)``."""
        shares = [(f"client {k}", getattr(self.client, k)) for k in ("cpu", "uplink", "downlink")]
        for agent, d in sorted(self.devices.items()):
            shares += [(f"{k} {agent}", getattr(d, k)) for k in ("cpu", "uplink", "downlink")]
        return max(shares, key=lambda x: x[1])


def simulate(
    model: ModelCost,
    plan: Plan,
    devices: Sequence[Device],
    workload: Workload = DEFAULT_WORKLOAD,
    params: CostParams = DEFAULT_PARAMS,
    weights: Weights = DEFAULT_WEIGHTS,
) -> SimResult:
    """Run ``workload`` through ``plan`` on ``devices``; deterministic for a given seed.

    Raises :class:`ConfigError` for an impossible workload and :class:`PlanningError`
    when the plan names agents missing from ``devices``.
    """
    w = workload
    if w.in_flight < 1 or w.requests < 1 or w.warmup < 0:
        raise ConfigError(
            f"simulation workload {w}: in_flight and requests must be >= 1, warmup >= 0"
        )
    if w.dispatch not in DISPATCH:
        raise ConfigError(f"simulation dispatch {w.dispatch!r} is not one of {DISPATCH}")
    if not 0.0 <= w.jitter < 1.0:
        raise ConfigError(f"simulation jitter {w.jitter} must be in [0, 1)")
    run = SimRun(model, plan, devices, w, params, weights)
    events: list[tuple[float, int, SimRequest]] = []
    seq, issued = 0, 0
    latencies: list[float] = []
    done_at: list[float] = []

    def push(t: float, req: SimRequest) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, req))

    def issue(now: float) -> None:
        nonlocal issued
        if issued >= w.requests:
            return
        issued += 1
        route = run.choose_route(now)
        for a in route:
            run.in_flight[a] += 1
        req = SimRequest(now, route, run.tasks_for(route))
        push(now + req.tasks[0].delay_s, req)

    for _ in range(w.in_flight):
        issue(0.0)
    while events:
        now, _, req = heapq.heappop(events)
        task = req.tasks[req.step]
        start = run.res[task.resource].serve(now, task.duration_s)
        kind, agent = task.resource
        if kind == "cpu" and agent:
            req.queue_s[task.stage] = start - now
            run.cpu_wait[task.stage].append(start - now)
            req.compute[task.stage] = task.compute_s
            key = (agent, task.stage)
            run.cpu_by_stage[key] = run.cpu_by_stage.get(key, 0.0) + task.duration_s
            run.tasks_by_stage[key] = run.tasks_by_stage.get(key, 0) + 1
        elif agent:
            run.link_wait[task.stage].append(start - now)
        end = start + task.duration_s
        req.step += 1
        if req.step < len(req.tasks):
            push(end + req.tasks[req.step].delay_s, req)
            continue
        latencies.append(end - req.issued)
        done_at.append(end)
        for k, a in enumerate(req.route):
            run.in_flight[a] -= 1
            for store, value in (
                (run.recent, req.compute[k] + req.queue_s[k]),
                (run.compute_ewma, req.compute[k]),
            ):
                prev = store.get((a, k))
                store[(a, k)] = value if prev is None else 0.7 * prev + 0.3 * value
        issue(end)
    return _result(run, latencies, done_at)


def _result(run: SimRun, latencies: list[float], done_at: list[float]) -> SimResult:
    skip = run.work.warmup if run.work.warmup < len(done_at) else 0
    origin = done_at[skip - 1] if skip else 0.0
    span = done_at[-1] - origin
    makespan = done_at[-1]
    ordered = sorted(latencies)
    stages = []
    for s in run.plan.stages:
        tasks = {a: run.tasks_by_stage.get((a, s.index), 0) for a in s.agents}
        cpu = sum(run.cpu_by_stage.get((a, s.index), 0.0) for a in s.agents)
        waits, queued = run.link_wait[s.index], run.cpu_wait[s.index]
        stages.append(
            StageStats(
                index=s.index,
                tasks=tasks,
                busy_fraction=cpu / (makespan * len(s.agents)) if makespan > 0 else 0.0,
                mean_queue_s=sum(queued) / len(queued) if queued else 0.0,
                mean_link_wait_s=sum(waits) / len(waits) if waits else 0.0,
            )
        )

    def share(kind: str, agent: str) -> float:
        return run.res[(kind, agent)].busy_s / makespan if makespan > 0 else 0.0

    devices = {
        a: DeviceStats(
            share("cpu", a),
            share("up", a),
            share("down", a),
            sum(n for (b, _), n in run.tasks_by_stage.items() if b == a),
        )
        for a in run.by_id
    }
    return SimResult(
        latencies_s=tuple(latencies),
        p50_s=statistics.median(ordered),
        p95_s=ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)],  # nearest rank
        throughput_rps=(len(done_at) - skip) / span if span > 0 else 0.0,
        makespan_s=makespan,
        stages=tuple(stages),
        devices=devices,
        client=DeviceStats(share("cpu", ""), share("up", ""), share("down", ""), len(done_at)),
    )
