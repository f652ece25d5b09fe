"""Measuring a running emulated fleet: one strategy at a time, same fleet, same client code.

Shared by ``strategies`` and ``scaling``: start a planner with a strategy, wait for its
ready plan, measure latency at one request in flight and throughput at saturation
(closed loop), and collect the per-stage breakdown and predicted-vs-measured stage times.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient, InferenceResult
from edgeslice.lab.testbed import Testbed


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def breakdown(plan: PlanMessage, results: list[InferenceResult]) -> list[dict[str, Any]]:
    """Per stage: agents, predicted vs measured compute (median), queue and transfer."""
    rows = []
    for stage in plan.stages:
        timings = [t for r in results for t in r.timings if int(t["stage"]) == stage.stage]
        if not timings:
            continue
        compute = statistics.median(t["compute_s"] for t in timings)
        rows.append(
            {
                "stage": stage.stage,
                "segments": [stage.start_segment, stage.end_segment],
                "agents": list(stage.agents),
                "predicted_compute_s": stage.predicted_compute_s,
                "measured_compute_s": compute,
                "prediction_error_pct": 100.0 * (stage.predicted_compute_s - compute) / compute,
                "queue_s": statistics.median(t["queue_s"] for t in timings),
                "transfer_s": statistics.median(
                    t.get("transfer_s", 0.0) + t.get("recv_s", 0.0) for t in timings
                ),
            }
        )
    return rows


async def measure_plan(
    client: InferenceClient,
    plan: PlanMessage,
    inputs: Any,
    latency_requests: int,
    throughput_requests: int,
    in_flight: int,
) -> dict[str, Any]:
    """Latency at 1 in flight, then throughput with ``in_flight`` outstanding (closed loop)."""
    for _ in range(2):  # warm-up: first run of every stage and replica
        await asyncio.gather(*(client.infer(inputs, timeout=180) for _ in range(in_flight)))
    single = [await client.infer(inputs, timeout=180) for _ in range(latency_requests)]
    done: list[InferenceResult] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < throughput_requests:
            issued += 1
            done.append(await client.infer(inputs, timeout=300))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    lat = [r.latency_s for r in single]
    return {
        "plan_version": plan.plan_version,
        "stages": [[s.start_segment, s.end_segment, list(s.agents)] for s in plan.stages],
        "predicted_latency_s": plan.predicted_latency_s,
        "predicted_throughput_rps": 1.0 / plan.predicted_period_s if plan.predicted_period_s else 0,
        "measured": {
            "p50_s": statistics.median(lat),
            "p95_s": _pct(lat, 0.95),
            "throughput_rps": len(done) / elapsed,
            "in_flight": in_flight,
            "requests": len(done),
        },
        "breakdown": breakdown(plan, done),
        "all_outputs_finite": all(
            bool(o.isfinite().all()) for r in done for o in r.outputs if o.is_floating_point()
        ),
    }


def run_strategy(
    bed: Testbed,
    model: str,
    strategy: str,
    objective: str,
    inputs: Any,
    min_agents: int,
    latency_requests: int,
    throughput_requests: int,
    in_flight: int,
) -> dict[str, Any]:
    """Start a planner with ``strategy`` on the running testbed, measure, stop it."""
    assert bed.fleet is not None
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
        ],
    )
    settings = parse_broker_url(bed.broker_url, bed.spec.namespace)

    async def go() -> dict[str, Any]:
        async with InferenceClient(settings, model) as client:
            plan = await client.wait_ready(300)
            while plan.strategy != strategy or plan.objective not in (objective, "none"):
                # a plan retained by the previous planner: wait for this planner's own
                plan = await client.wait_ready(300, other_than=plan.plan_id)
            return await measure_plan(
                client, plan, inputs, latency_requests, throughput_requests, in_flight
            )

    try:
        return asyncio.run(go())
    finally:
        bed.fleet.stop("planner")
