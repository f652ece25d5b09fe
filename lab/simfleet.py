"""Owns the simulated fleet: FIFO resources, one request's task chain, and replica choice.

The model the simulator's event engine (lab/simulate.py) runs; see there for why it
exists. Every task is priced by the planner's cost model functions.

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
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.client.scoring import Candidate, Weights, pick_replica
from edgeslice.planner.costmodel import (
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


@dataclass
class Resource:
    """One FIFO resource (a CPU or a link direction) serving one task at a time."""

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
class Task:
    """One step of a request: wait ``delay_s``, then hold ``resource`` for ``duration_s``."""

    delay_s: float  # wait before the task reaches its resource (round-trip halves)
    resource: tuple[str, str]  # (kind, agent); kind in cpu/up/down, agent "" = client
    duration_s: float
    stage: int
    compute_s: float = 0.0  # the stage's own share of a CPU task (without the hop sides)


@dataclass
class SimRequest:
    """One request in flight: its route, its task chain and how far along it is."""

    issued: float
    route: tuple[str, ...]
    tasks: list[Task]
    step: int = 0
    queue_s: dict[int, float] = field(default_factory=dict)  # stage -> CPU wait
    compute: dict[int, float] = field(default_factory=dict)  # stage -> compute time


class SimRun:
    """The mutable state of one simulation: resources, replica choice, measured EWMAs."""

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
            (kind, a): Resource() for a in [*self.by_id, ""] for kind in ("cpu", "up", "down")
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
        """The replica policy in force (``auto``: the one the client uses for the plan)."""
        if self.work.dispatch != "auto":
            return self.work.dispatch
        return "amp4ec" if self.plan.strategy == "amp4ec" else "edgeslice"

    def choose_route(self, now: float) -> tuple[str, ...]:
        """One agent per stage, as the inference client would pick at ``now``."""
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

    def tasks_for(self, route: Sequence[str]) -> list[Task]:
        """The chain of resource tasks of one request along ``route`` (see module doc)."""
        p, model = self.params, self.model
        first = model.input_bytes
        tasks = [
            Task(0.0, ("cpu", ""), hop_cpu_time_s(first, None, p), -1),
            Task(0.0, ("up", ""), link_occupancy_s(first, None, p), 0),
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
                    tasks.append(Task(0.0, ("up", prev), occupancy, stage.index - 1))
                delay = p.broker_round_s + 0.5 * (prev_rtt + dev.rtt_s)
                tasks.append(
                    Task(delay, ("down", agent), link_occupancy_s(nbytes, dev, p), stage.index)
                )
                cpu += hop_cpu_time_s(nbytes, dev, p)
            if agent != nxt:
                cpu += hop_cpu_time_s(stage_out_bytes(model, stage.end), dev, p)
            duration = compute_s(model, stage.start, stage.end, dev, p)
            if self.work.jitter:
                duration *= 1.0 + self.rng.uniform(-self.work.jitter, self.work.jitter)
            tasks.append(Task(0.0, ("cpu", agent), cpu + duration, stage.index, duration))
            prev, prev_rtt = agent, dev.rtt_s
        last, out = self.by_id[prev], model.output_bytes
        home = p.broker_round_s + 0.5 * (prev_rtt + p.client_rtt_s)
        tasks.append(Task(0.0, ("up", prev), link_occupancy_s(out, last, p), len(route) - 1))
        tasks.append(Task(home, ("down", ""), link_occupancy_s(out, None, p), -1))  # no stage
        tasks.append(Task(0.0, ("cpu", ""), hop_cpu_time_s(out, None, p), -1))
        return tasks
