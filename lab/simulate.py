"""Owns the discrete-event simulation of a plan on a fleet, priced by the planner's cost model.

Why: this machine has two cores, so fleets of 8-64 devices can only be *simulated*. Every
task is priced by the functions the planner plans with (``compute_s``, ``hop_cpu_time_s``,
``link_occupancy_s``, the broker round and round-trip halves of ``transfer_s``), so
simulated and predicted figures are comparable, and comparing the simulator with measured
runs (``benchmarks/simulation.py``) tells how far the cost model's view is from reality.

Resources, each a FIFO serving one task at a time:

* per device: its CPU (one job at a time, like the agent's single stage thread: the
  receiving side of the hop in, the stage, the sending side of the hop out), its uplink
  and its downlink to the broker (each serialises bytes at ``bandwidth_bps``);
* the client's CPU (packs inputs, unpacks outputs), uplink and downlink
  (``CostParams.client_*``).

The broker is *not* a resource: it forwards after ``broker_round_s`` and never queues, so
a fleet whose broker saturates first would run slower than simulated. A hop is sender
CPU, sender uplink, the broker round and half of each side's round trip, receiver
downlink, receiver CPU -- with one request in flight exactly ``transfer_s``. Links and
CPU are separate resources because the agent overlaps them (chunks arrive and results
leave while the stage thread computes), which is what the planner's period assumes too
(``max(CPU, downlink, uplink)`` per device, and the client's own): a saturated pipeline
runs at ``plan.throughput_rps``.

Replica choice is the inference client's own policy, :func:`client.scoring.pick_replica`,
fed with simulated values: one client picks the whole route when it issues a request;
``in_flight`` counts requests routed to an agent and not yet answered; ``load`` is the
agent's CPU busy share over the last ``load_window_s`` (its telemetry interval);
``recent_task_s`` and the compute times are EWMAs (0.7/0.3) updated when a request's
timings come back; the predicted period is the cost model's ``stage_period_s``.
``"amp4ec"`` is the paper's weighted score, ``"edgeslice"`` the earliest expected finish,
``"round-robin"`` a baseline; ``"auto"`` picks as the client does (by the plan's strategy).
Closed loop: ``in_flight`` requests outstanding, a new one issued when one completes.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeslice.broker.protocol.errors import ConfigError, PlanningError
from edgeslice.client.scoring import Candidate, Weights, pick_replica
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    compute_s,
    hop_cpu_time_s,
    link_occupancy_s,
    stage_in_bytes,
    stage_out_bytes,
    stage_period_s,
)
from edgeslice.planner.partition import Plan

DISPATCH = ("auto", "edgeslice", "amp4ec", "round-robin")


@dataclass(frozen=True)
class Workload:
    """A closed-loop run: ``requests`` in total, ``in_flight`` outstanding at any time."""

    requests: int = 50
    in_flight: int = 1
    warmup: int = 5  # completions left out of the throughput (pipeline filling up)
    dispatch: str = "auto"
    jitter: float = 0.0  # each compute time is scaled by U(1 - jitter, 1 + jitter)
    seed: int = 0
    load_window_s: float = 2.0  # the busy share replicas are scored on (telemetry interval)


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


@dataclass
class _Resource:
    free_at: float = 0.0
    busy_s: float = 0.0
    intervals: deque[tuple[float, float]] = field(default_factory=deque)

    def serve(self, ready: float, duration: float) -> float:
        """FIFO: start when both the task and the resource are ready; returns the start."""
        start = max(ready, self.free_at)
        self.free_at = start + duration
        self.busy_s += duration
        self.intervals.append((start, self.free_at))
        return start

    def busy_share(self, now: float, window: float) -> float:
        """Share of ``[now - window, now]`` spent serving (the agent's telemetry ``busy``)."""
        lo = max(0.0, now - window)
        while self.intervals and self.intervals[0][1] <= lo:
            self.intervals.popleft()
        if now <= lo:
            return 0.0
        busy = sum(max(0.0, min(b, now) - max(a, lo)) for a, b in self.intervals)
        return min(1.0, busy / (now - lo))


@dataclass(frozen=True)
class _Task:
    delay_s: float  # wait before the task reaches its resource (round-trip halves)
    resource: tuple[str, str]  # (kind, agent); kind in cpu/up/down, agent "" = client
    duration_s: float
    stage: int
    compute_s: float = 0.0  # the stage's own share of a CPU task (without the hop sides)


@dataclass
class _Request:
    issued: float
    route: tuple[str, ...]
    tasks: list[_Task]
    step: int = 0
    queue_s: dict[int, float] = field(default_factory=dict)  # stage -> CPU wait
    compute: dict[int, float] = field(default_factory=dict)  # stage -> compute time


class _Run:
    """The mutable state of one simulation (kept out of the public API)."""

    def __init__(
        self,
        model: ModelCost,
        plan: Plan,
        devices: Sequence[Device],
        work: Workload,
        params: CostParams,
        weights: Weights,
    ) -> None:
        self.model, self.plan, self.work = model, plan, work
        self.params, self.weights = params, weights
        self.by_id = {d.agent_id: d for d in devices}
        for stage in plan.stages:
            missing = [a for a in stage.agents if a not in self.by_id]
            if missing:
                raise PlanningError(
                    f"cannot simulate plan {plan.strategy!r}: stage {stage.index} names "
                    f"agents {missing} that are not in the fleet given; pass their Devices"
                )
        self.res = {
            (kind, a): _Resource() for a in [*self.by_id, ""] for kind in ("cpu", "up", "down")
        }
        self.in_flight = dict.fromkeys(self.by_id, 0)
        self.recent: dict[tuple[str, int], float] = {}
        self.compute_ewma: dict[tuple[str, int], float] = {}
        self.rr = [0] * len(plan.stages)
        self.rng = random.Random(work.seed)
        self.predicted = {
            (a, s.index): stage_period_s(model, s.start, s.end, self.by_id[a], params)
            for s in plan.stages
            for a in s.agents
        }
        hosted: dict[str, int] = {}
        for s in plan.stages:
            for a in s.agents:
                hosted[a] = hosted.get(a, 0) + s.memory_bytes
        self.mem_free = {
            a: min(1.0, max(0.0, 1.0 - hosted.get(a, 0) / max(1, d.memory_bytes)))
            for a, d in self.by_id.items()
        }
        self.cpu_by_stage: dict[tuple[str, int], float] = {}
        self.tasks_by_stage: dict[tuple[str, int], int] = {}
        self.link_wait: dict[int, list[float]] = {s.index: [] for s in plan.stages}
        self.cpu_wait: dict[int, list[float]] = {s.index: [] for s in plan.stages}

    def dispatch(self) -> str:
        if self.work.dispatch != "auto":
            return self.work.dispatch
        return "amp4ec" if self.plan.strategy == "amp4ec" else "edgeslice"

    def choose_route(self, now: float) -> tuple[str, ...]:
        policy, route = self.dispatch(), []
        for k, stage in enumerate(self.plan.stages):
            if len(stage.agents) == 1:
                route.append(stage.agents[0])
                continue
            if policy == "round-robin":
                route.append(stage.agents[self.rr[k] % len(stage.agents)])
                self.rr[k] += 1
                continue
            cands = [
                Candidate(
                    agent_id=a,
                    resource_fit=self.mem_free[a],
                    load=self.res[("cpu", a)].busy_share(now, self.work.load_window_s),
                    recent_task_s=self.recent.get((a, k), 0.0),
                    in_flight=self.in_flight[a],
                    latency_s=self.by_id[a].rtt_s,
                    compute_s=self.compute_ewma.get((a, k), 0.0),
                    predicted_period_s=self.predicted[(a, k)],
                )
                for a in stage.agents
            ]
            route.append(pick_replica(cands, policy, self.weights))
        return tuple(route)

    def tasks_for(self, route: Sequence[str]) -> list[_Task]:
        """The chain of resource tasks of one request along ``route`` (see module doc)."""
        p, model = self.params, self.model
        first = model.input_bytes
        tasks = [
            _Task(0.0, ("cpu", ""), hop_cpu_time_s(first, None, p), -1),
            _Task(0.0, ("up", ""), link_occupancy_s(first, None, p), 0),
        ]
        prev_rtt, prev = p.client_rtt_s, ""
        for k, (stage, agent) in enumerate(zip(self.plan.stages, route, strict=True)):
            dev = self.by_id[agent]
            nxt = route[k + 1] if k + 1 < len(route) else ""
            cpu = 0.0
            if agent != prev:  # a hand-off inside one agent costs nothing (transfer_s)
                nbytes = stage_in_bytes(model, stage.start)
                if prev:
                    occupancy = link_occupancy_s(nbytes, self.by_id[prev], p)
                    tasks.append(_Task(0.0, ("up", prev), occupancy, stage.index - 1))
                delay = p.broker_round_s + 0.5 * (prev_rtt + dev.rtt_s)
                tasks.append(
                    _Task(delay, ("down", agent), link_occupancy_s(nbytes, dev, p), stage.index)
                )
                cpu += hop_cpu_time_s(nbytes, dev, p)
            if agent != nxt:
                cpu += hop_cpu_time_s(stage_out_bytes(model, stage.end), dev, p)
            duration = compute_s(model, stage.start, stage.end, dev, p)
            if self.work.jitter:
                duration *= 1.0 + self.rng.uniform(-self.work.jitter, self.work.jitter)
            tasks.append(_Task(0.0, ("cpu", agent), cpu + duration, stage.index, duration))
            prev, prev_rtt = agent, dev.rtt_s
        last, out = self.by_id[prev], model.output_bytes
        home = p.broker_round_s + 0.5 * (prev_rtt + p.client_rtt_s)
        tasks.append(_Task(0.0, ("up", prev), link_occupancy_s(out, last, p), len(route) - 1))
        tasks.append(_Task(home, ("down", ""), link_occupancy_s(out, None, p), -1))  # no stage
        tasks.append(_Task(0.0, ("cpu", ""), hop_cpu_time_s(out, None, p), -1))
        return tasks


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
    run = _Run(model, plan, devices, w, params, weights)
    events: list[tuple[float, int, _Request]] = []
    seq, issued = 0, 0
    latencies: list[float] = []
    done_at: list[float] = []

    def push(t: float, req: _Request) -> None:
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
        req = _Request(now, route, run.tasks_for(route))
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


def _result(run: _Run, latencies: list[float], done_at: list[float]) -> SimResult:
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
