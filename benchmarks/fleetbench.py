"""Measuring a running emulated fleet: one strategy at a time, same fleet, same client code.

Shared by ``strategies`` and ``scaling``: start a planner with a strategy, wait for its
ready plan, measure latency at one request in flight and throughput at saturation
(closed loop), and collect the per-stage breakdown and predicted-vs-measured stage times.

Throughput is the steady-state completion rate at 2 requests in flight per device the plan
uses (the same offer for every plan: a one-device plan is not flooded with the requests
meant for four devices, a four-stage pipeline still has two per stage). The workers keep
the fleet saturated; the first ``in_flight`` completions (filling the pipeline) are not
counted; then completions are counted for at least ``window_s`` seconds and
``window_requests`` completions, and the rate is completions / time between the first and
last counted completion. Fill and drain therefore cost a pipelined plan nothing, as they
cost a replicated plan nothing: every strategy is measured in its steady state.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient, InferenceResult
from edgeslice.lab.testbed import Testbed


@dataclass(frozen=True)
class Load:
    """How much one measurement sends: sequential requests for latency, then a closed loop."""

    latency_requests: int = 8
    in_flight_per_device: int = 2  # per device the plan uses
    window_requests: int = 12  # at least this many counted completions ...
    window_s: float = 4.0  # ... over at least this long


def plan_devices(plan: PlanMessage) -> int:
    """How many distinct agents ``plan`` uses."""
    return len({a for s in plan.stages for a in s.agents})


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stage_timings(results: list[InferenceResult], stage: int) -> list[dict[str, Any]]:
    return [t for r in results for t in r.timings if int(t["stage"]) == stage]


def breakdown(
    plan: PlanMessage, single: list[InferenceResult], saturated: list[InferenceResult]
) -> list[dict[str, Any]]:
    """Per stage and replica: predicted vs measured compute, queue and transfer.

    The planner predicts a stage's compute per device (``PlanStage.predicted_compute_s`` is
    the primary's, ``agents[0]``); a stage replicated on unlike devices has one prediction
    per replica, so measured times are compared replica by replica, never as one median
    over mixed devices. The prediction is checked on the requests sent one at a time
    (``single``: batch 1, no other request competing for the host's cores, as on separate
    boards); the saturated figures (``saturated``: possibly batched, sharing this host's
    cores with every other emulated device) are reported beside it.
    """
    rows = []
    for stage in plan.stages:
        alone = _stage_timings(single, stage.stage)
        busy = _stage_timings(saturated, stage.stage)
        if not alone and not busy:
            continue
        primary = stage.agents[0] if stage.agents else ""
        own = [t for t in alone if t.get("agent") == primary and int(t.get("batch", 1)) == 1]
        compute = statistics.median(t["compute_s"] for t in own) if own else 0.0
        replicas = {}
        for agent in stage.agents:
            mine = [t["compute_s"] for t in alone if t.get("agent") == agent]
            loaded = [t["compute_s"] for t in busy if t.get("agent") == agent]
            replicas[agent] = {
                "measured_compute_s": statistics.median(mine) if mine else None,
                "saturated_compute_s": statistics.median(loaded) if loaded else None,
            }
        row: dict[str, Any] = {
            "stage": stage.stage,
            "segments": [stage.start_segment, stage.end_segment],
            "agents": list(stage.agents),
            "predicted_compute_s": stage.predicted_compute_s,
            "measured_compute_s": compute,
            "replicas": replicas,
            "queue_s": statistics.median(t["queue_s"] for t in busy or alone),
            "transfer_s": statistics.median(
                t.get("transfer_s", 0.0) + t.get("recv_s", 0.0) for t in alone or busy
            ),
        }
        if compute:
            row["prediction_error_pct"] = 100.0 * (stage.predicted_compute_s - compute) / compute
        rows.append(row)
    return rows


async def saturate(
    client: InferenceClient, inputs: Any, load: Load, in_flight: int
) -> tuple[float, list[InferenceResult], float]:
    """Steady-state throughput (see the module docstring): (req/s, counted results, window s)."""
    fill = in_flight
    finished: list[tuple[float, InferenceResult]] = []
    stop = False
    window_start = 0.0

    async def worker() -> None:
        nonlocal stop, window_start
        while not stop:
            result = await client.infer(inputs, timeout=300)
            now = time.perf_counter()
            finished.append((now, result))
            if len(finished) == fill:
                window_start = now
            counted = len(finished) - fill
            if counted >= load.window_requests and now - window_start >= load.window_s:
                stop = True  # the others finish what they have in flight, uncounted

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    window = finished[fill:]
    # counted: completions after the fill up to the one that closed the window
    closing = next(
        i
        for i, (t, _) in enumerate(window)
        if i + 1 >= load.window_requests and t - window_start >= load.window_s
    )
    counted = window[: closing + 1]
    elapsed = counted[-1][0] - window_start
    return len(counted) / elapsed, [r for _, r in counted], elapsed


async def measure_plan(
    client: InferenceClient, plan: PlanMessage, inputs: Any, load: Load
) -> dict[str, Any]:
    """Warm-up, latency at 1 in flight, then steady-state throughput at saturation."""
    started = time.perf_counter()
    in_flight = load.in_flight_per_device * plan_devices(plan)
    # warm-up: one round with every replica busy (first run of every stage and replica)
    await asyncio.gather(*(client.infer(inputs, timeout=180) for _ in range(in_flight)))
    single = [await client.infer(inputs, timeout=180) for _ in range(load.latency_requests)]
    throughput, counted, window = await saturate(client, inputs, load, in_flight)
    lat = [r.latency_s for r in single]
    return {
        "plan_version": plan.plan_version,
        "stages": [[s.start_segment, s.end_segment, list(s.agents)] for s in plan.stages],
        "predicted_latency_s": plan.predicted_latency_s,
        "predicted_throughput_rps": 1.0 / plan.predicted_period_s if plan.predicted_period_s else 0,
        # with every queue full and stages batching where they gain (planner/batchcost.py);
        # the figure above (batch 1) is the one a couple of requests per device measure
        "predicted_saturated_rps": (
            1.0 / plan.predicted_saturated_period_s if plan.predicted_saturated_period_s else 0
        ),
        "measured": {
            "p50_s": statistics.median(lat),
            "p95_s": _pct(lat, 0.95),
            "latency_requests": len(lat),
            "throughput_rps": throughput,
            "in_flight": in_flight,
            "requests": len(counted),
            "window_s": window,
        },
        "breakdown": breakdown(plan, single, counted),
        "all_outputs_finite": all(
            bool(o.isfinite().all())
            for r in [*single, *counted]
            for o in r.outputs
            if o.is_floating_point()
        ),
        "measure_s": time.perf_counter() - started,
    }


def run_strategy(
    bed: Testbed,
    model: str,
    strategy: str,
    objective: str,
    inputs: Any,
    min_agents: int,
    load: Load,
) -> dict[str, Any]:
    """Start a planner with ``strategy`` on the running testbed, measure, stop it."""
    assert bed.fleet is not None
    started = time.perf_counter()
    bed.fleet.start_planner(
        model,
        [
            "--strategy",
            strategy,
            "--objective",
            objective,
            "--min-agents",
            str(min_agents),
            "--replan-delay",
            "1",
            # every strategy plans from scratch: no planner adopts the plan its predecessor
            # left retained (and a plan made for another objective is never measured)
            "--clear-plan-on-exit",
        ],
    )
    settings = parse_broker_url(bed.broker_url, bed.spec.namespace)

    async def go() -> dict[str, Any]:
        async with InferenceClient(settings, model) as client:
            plan = await client.wait_ready(300)
            while plan.strategy != strategy or plan.objective not in (objective, "none"):
                # a plan retained by the previous planner: wait for this planner's own
                plan = await client.wait_ready(300, other_than=plan.plan_id)
            ready_s = time.perf_counter() - started
            return {"plan_ready_s": ready_s, **await measure_plan(client, plan, inputs, load)}

    try:
        return asyncio.run(go())
    finally:
        bed.fleet.stop("planner")
