"""Benchmarks the pure planner: planning time, optimality gap, and edgeslice against baselines.

Instances are synthetic but shaped like the real thing: a CNN (activations
shrink and weights grow with depth, ResNet-like totals) and a transformer
encoder (uniform blocks, 2.4 GB of weights: no single board holds it), planned
on fleets drawn from the firmware profiles' numbers (calibrated GFLOP/s, memory
left for stages, link) with per-device jitter from a fixed seed, so no two
devices are identical -- the hard case for the exact DP.

``run()`` returns a JSON-serialisable dict (the CLI calls it); ``main()`` prints
a table and writes ``benchmarks/results/planner.json``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.costmodel import DEFAULT_PARAMS, Device, ModelCost, Segment
from edgeslice.planner.partition import (
    STRATEGIES,
    Objective,
    Plan,
    brute_force_partition,
    plan_partition,
)

MB = 1_000_000
# (profile, GFLOP/s, MB of memory left for stages, link MB/s, RTT s) -- firmware_profiles/*.toml
# (stage memory = half of RAM minus the reserved part; link rate = nominal Mbit/s / 8 * 0.9).
PROFILES = (
    ("rpi3b", 3.0, 312, 2.8, 0.006),
    ("rpi4-2gb", 10.0, 768, 105.0, 0.0004),
    ("rpi4-4gb", 10.0, 1792, 105.0, 0.0004),
    ("rpi5-4gb", 25.0, 1792, 105.0, 0.0004),
    ("jetson-nano", 8.0, 1280, 105.0, 0.0004),
    ("jetson-orin-nano", 27.0, 3072, 105.0, 0.0004),
    ("x86-laptop", 80.0, 2560, 22.5, 0.003),
)
CUTS = (10, 25, 50, 100)
OBJECTIVE_KEYS: tuple[tuple[Objective, str], ...] = (
    ("latency", "latency_s"),
    ("throughput", "period_s"),
)
FLEETS = (2, 4, 8, 16)


def make_fleet(size: int, seed: int) -> list[Device]:
    """``size`` devices cycling through PROFILES, each jittered: speed, link, RTT and load."""
    rng = random.Random(seed)
    devices = []
    for k in range(size):
        name, gflops, mem_mb, link_mbs, rtt = PROFILES[(k + seed) % len(PROFILES)]
        devices.append(
            Device(
                agent_id=f"{name}-{k:02d}",
                gflops=gflops * rng.uniform(0.85, 1.15),
                memory_bytes=mem_mb * MB,
                bandwidth_bps=link_mbs * MB * rng.uniform(0.6, 1.0),
                rtt_s=rtt * rng.uniform(1.0, 1.5),
                load=rng.choice((0.0, 0.0, 0.2, 0.5)),
            )
        )
    return devices


def make_model(kind: str, cuts: int, seed: int) -> ModelCost:
    """A ``kind`` ("cnn" or "transformer") model with ``cuts`` segments of jittered size."""
    rng = random.Random(seed)
    segments = []
    for k in range(cuts):
        depth = k / max(1, cuts - 1)
        if kind == "cnn":  # ~3.6 GFLOP, ~45 MB of weights, 3.2 MB -> 0.1 MB activations
            flops = 3.6e9 / cuts * rng.uniform(0.5, 1.5)
            params = int(45 * MB * (0.2 + 1.6 * depth) / cuts * rng.uniform(0.5, 1.5))
            out = int(3.2 * MB * (1 / 32) ** depth * rng.uniform(0.7, 1.3))
        else:  # ~120 GFLOP, ~2.4 GB of weights (no one device holds it), 0.8 MB activations
            flops = 120e9 / cuts * rng.uniform(0.8, 1.2)
            params = int(2400 * MB / cuts * rng.uniform(0.8, 1.2))
            out = int(0.8 * MB)
        segments.append(Segment(flops, params, out, act_bytes=2 * out))
    return ModelCost(f"{kind}-{cuts}", 602_112, tuple(segments))


def _times_s(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU seconds of ``fn``, once per repeat (CPU time is immune to other
    load)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def _plan_or_none(fn: Callable[[], Plan]) -> Plan | None:
    try:
        return fn()
    except PlanningError:
        return None


def bench_timing(repeats: int) -> list[dict[str, Any]]:
    """Planning time per (model, cuts, fleet size, objective): median and min-max of
    ``repeats`` runs."""
    rows = []
    for kind in ("cnn", "transformer"):
        for cuts in CUTS:
            model = make_model(kind, cuts, seed=cuts)
            for size in FLEETS:
                fleet = make_fleet(size, seed=size)
                for objective in ("latency", "throughput"):
                    plan = _plan_or_none(partial(plan_partition, model, fleet, objective))
                    wall, cpu = _times_s(
                        partial(_plan_or_none, partial(plan_partition, model, fleet, objective)),
                        repeats,
                    )
                    rows.append(
                        {
                            "model": kind,
                            "cuts": cuts,
                            "devices": size,
                            "objective": objective,
                            "repeats": repeats,
                            "median_ms": round(1e3 * statistics.median(wall), 3),
                            "min_ms": round(1e3 * min(wall), 3),
                            "max_ms": round(1e3 * max(wall), 3),
                            "median_cpu_ms": round(1e3 * statistics.median(cpu), 3),
                            "feasible": plan is not None,
                            "exact": plan.exact if plan else None,
                            "stages": len(plan.stages) if plan else None,
                            "devices_used": sum(len(s.agents) for s in plan.stages)
                            if plan
                            else None,
                        }
                    )
    return rows


def _gap_pct(value: float, best: float) -> float:
    return 100.0 * (value / best - 1.0)


def _gap_summary(gaps: Sequence[float]) -> dict[str, Any]:
    if not gaps:
        return {"instances": 0, "max_gap_pct": None, "mean_gap_pct": None, "optimal_share": None}
    return {
        "instances": len(gaps),
        "max_gap_pct": round(max(gaps), 4),
        "mean_gap_pct": round(statistics.mean(gaps), 4),
        "optimal_share": round(sum(g <= 1e-7 for g in gaps) / len(gaps), 4),
    }


def bench_optimality(instances: int) -> dict[str, Any]:
    """Gap to brute force on instances small enough for it (4-8 cuts, 2-4 devices)."""
    auto: list[float] = []
    heuristic: list[float] = []
    infeasible = 0
    rng = random.Random(2024)
    for k in range(instances):
        model = make_model(rng.choice(("cnn", "transformer")), rng.randint(4, 8), seed=k)
        fleet = make_fleet(rng.randint(2, 4), seed=1000 + k)
        for objective, key in OBJECTIVE_KEYS:
            oracle = _plan_or_none(partial(brute_force_partition, model, fleet, objective))
            if oracle is None:
                infeasible += 1
                continue
            best = getattr(oracle, key)
            plan = plan_partition(model, fleet, objective, replicas=False)
            auto.append(_gap_pct(getattr(plan, key), best))
            forced = _plan_or_none(
                partial(plan_partition, model, fleet, objective, replicas=False, exact=False)
            )
            heuristic.append(_gap_pct(getattr(forced, key), best) if forced else math.inf)
    return {
        "auto": _gap_summary(auto),
        "heuristics_forced": _gap_summary(heuristic),
        "infeasible_cases": infeasible,
    }


def bench_heuristic_vs_dp(instances: int) -> dict[str, Any]:
    """Throughput heuristics against the forced exact DP (25-50 cuts, 6-8 devices)."""
    gaps, heuristic_ms, exact_ms = [], [], []
    for k in range(instances):
        model = make_model(("cnn", "transformer")[k % 2], (25, 50)[k // 2 % 2], seed=k)
        fleet = make_fleet((6, 8)[k // 4 % 2], seed=500 + k)
        start = time.perf_counter()
        exact = _plan_or_none(
            partial(plan_partition, model, fleet, "throughput", replicas=False, exact=True)
        )
        exact_ms.append(1e3 * (time.perf_counter() - start))
        start = time.perf_counter()
        fast = _plan_or_none(
            partial(plan_partition, model, fleet, "throughput", replicas=False, exact=False)
        )
        heuristic_ms.append(1e3 * (time.perf_counter() - start))
        if exact and fast:
            gaps.append(_gap_pct(fast.period_s, exact.period_s))
    summary = _gap_summary(gaps)
    summary["median_heuristic_ms"] = round(statistics.median(heuristic_ms), 3)
    summary["median_exact_dp_ms"] = round(statistics.median(exact_ms), 3)
    return summary


def bench_baselines() -> list[dict[str, Any]]:
    """Each strategy's predicted period and latency relative to edgeslice's, same cost model."""
    rows = []
    cases = [
        ("cnn", 50, 4, 11),
        ("cnn", 50, 8, 12),
        ("transformer", 50, 8, 13),
        ("transformer", 100, 16, 14),
    ]
    for kind, cuts, size, seed in cases:
        model, fleet = make_model(kind, cuts, seed), make_fleet(size, seed)
        ours = {
            "edgeslice-throughput": _plan_or_none(
                partial(plan_partition, model, fleet, "throughput")
            ),
            "edgeslice-throughput-no-replicas": _plan_or_none(
                partial(plan_partition, model, fleet, "throughput", replicas=False)
            ),
            "edgeslice-latency": _plan_or_none(partial(plan_partition, model, fleet, "latency")),
        }
        ref_period = ours["edgeslice-throughput"]
        ref_latency = ours["edgeslice-latency"]
        plans: dict[str, Plan | None] = dict(ours)
        for name, strategy in STRATEGIES.items():
            plans[name] = _plan_or_none(partial(strategy, model, fleet, DEFAULT_PARAMS))
        for name, plan in plans.items():
            row: dict[str, Any] = {
                "model": kind,
                "cuts": cuts,
                "devices": size,
                "strategy": name,
                "feasible": plan is not None,
            }
            if plan is not None:
                row["period_s"] = round(plan.period_s, 6)
                row["latency_s"] = round(plan.latency_s, 6)
                row["stages"] = len(plan.stages)
                if ref_period is not None:
                    row["period_vs_edgeslice"] = round(plan.period_s / ref_period.period_s, 3)
                if ref_latency is not None:
                    row["latency_vs_edgeslice"] = round(plan.latency_s / ref_latency.latency_s, 3)
            rows.append(row)
    return rows


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def run(quick: bool = False) -> dict[str, Any]:
    """All planner benchmarks; ``quick`` trims repeats and instance counts (for CI)."""
    repeats = 1 if quick else 5
    timing = bench_timing(repeats=repeats)
    worst = {
        objective: max(r["median_ms"] for r in timing if r["objective"] == objective)
        for objective in ("latency", "throughput")
    }
    largest = [r for r in timing if r["cuts"] == 100 and r["devices"] == 16]
    return {
        "benchmark": "planner",
        "quick": quick,
        "runs": repeats,
        "machine": machine(),
        "timing": timing,
        "timing_worst_ms": worst,
        "timing_100_cuts_16_devices_worst_ms": max(r["median_ms"] for r in largest),
        "timing_100_cuts_16_devices_worst_row": max(largest, key=lambda r: r["median_ms"]),
        "timing_100_cuts_16_devices_worst_cpu_ms": max(r["median_cpu_ms"] for r in largest),
        "optimality_vs_brute_force": bench_optimality(12 if quick else 80),
        "heuristic_vs_exact_dp": bench_heuristic_vs_dp(4 if quick else 16),
        "baselines": bench_baselines(),
    }


def _print(result: dict[str, Any]) -> None:
    print(f"planner benchmark on {result['machine']['platform']}, {result['machine']['python']}")
    print("\nplanning time (median ms; * = proven optimal, - = no plan fits)")
    print(f"{'model':12} {'cuts':>4} {'dev':>3}   {'latency':>10} {'throughput':>11}")
    cells: dict[tuple[str, int, int], dict[str, str]] = {}
    for r in result["timing"]:
        mark = "-" if not r["feasible"] else ("*" if r["exact"] else " ")
        key = (r["model"], r["cuts"], r["devices"])
        cells.setdefault(key, {})[r["objective"]] = f"{r['median_ms']:.1f}{mark}"
    for (kind, cuts, size), c in cells.items():
        print(f"{kind:12} {cuts:>4} {size:>3}   {c['latency']:>10} {c['throughput']:>11}")
    print(
        f"worst 100 cuts x 16 devices: {result['timing_100_cuts_16_devices_worst_ms']:.1f} ms "
        f"(min-max {result['timing_100_cuts_16_devices_worst_row']['min_ms']:.1f}-"
        f"{result['timing_100_cuts_16_devices_worst_row']['max_ms']:.1f} of "
        f"{result['timing_100_cuts_16_devices_worst_row']['repeats']} runs) "
        f"wall, {result['timing_100_cuts_16_devices_worst_cpu_ms']:.1f} ms CPU"
    )
    opt = result["optimality_vs_brute_force"]
    print("\ngap to brute force (%):", json.dumps(opt))
    print("throughput heuristics vs exact DP:", json.dumps(result["heuristic_vs_exact_dp"]))
    print("\nbaselines (ratio to edgeslice: period / latency; >1 is worse)")
    for r in result["baselines"]:
        where = f"{r['model']}-{r['cuts']} on {r['devices']}"
        if not r["feasible"]:
            print(f"{where:22} {r['strategy']:34} does not fit")
            continue
        print(
            f"{where:22} {r['strategy']:34} period {r['period_s']:.4f}s "
            f"x{r.get('period_vs_edgeslice', math.nan):<6} latency {r['latency_s']:.4f}s "
            f"x{r.get('latency_vs_edgeslice', math.nan)}"
        )


def main(quick: bool = False) -> dict[str, Any]:
    """Run everything, print a table, write benchmarks/results/planner.json."""
    from edgeslice.benchmarks.common import write_result

    result = run(quick=quick)
    _print(result)
    path = write_result("planner-quick" if quick else "planner", result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
