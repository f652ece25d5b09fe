"""Owns the "simulation beyond this machine" benchmark: 8-64 device fleets, SIMULATED figures.

This machine has two cores, so fleets of 8-64 devices are run through
:mod:`planner.simulate`, which prices every task with the planner's own cost model and
adds queueing and replica dispatch (the planner's period already counts hop CPU, the
overlap of links and compute and the client's own link, so at saturation the two agree
but for dispatch and queueing effects).
Model costs are each model's profiled FLOPs (``profile_model(...).to_cost()``, the only
torch use here); devices come from the firmware profiles (rated GFLOP/s, memory budget,
typical link). Nothing here is measured on devices: the JSON says ``"simulated": true``
and the printout says SIMULATED. ``validation`` replays the measured rows of
``benchmarks/results/strategies.json`` (same devices as measured, same stages) through
the simulator and reports its error against the measurement -- the only measured numbers
in this file, and only when that file exists; every measured run is a row of its own.
The simulated figures are deterministic (fixed seeds), so they are computed once; the
figures that vary between runs are the measured ones, repeated in ``strategies``.
"""

from __future__ import annotations

import json
import random
from typing import Any

from edgeslice.benchmarks.common import results_dir, write_result
from edgeslice.client.scoring import Weights
from edgeslice.firmware_profiles import FirmwareProfile, list_profiles
from edgeslice.lab.simfleet import Workload
from edgeslice.lab.simulate import simulate
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    compute_s,
    fit_correction,
)
from edgeslice.planner.partition import STRATEGIES, Plan, build_plan, plan_partition

NOTE = (
    "SIMULATED with planner.simulate (the planner's cost model plus queueing, link/compute "
    "overlap, replica dispatch and the client's link), not measured on devices; the broker "
    "is assumed never to be a bottleneck"
)
MIX = ("rpi3b", "rpi4-4gb", "rpi5-8gb", "jetson-nano")
SIZES = (8, 16, 32, 64)
MODELS = ("mobilenetv2", "resnet18", "transformer")


def _device(agent_id: str, p: FirmwareProfile) -> Device:
    return Device(
        agent_id,
        gflops=p.gflops_fp32,
        memory_bytes=p.memory_budget_bytes,
        bandwidth_bps=p.link.bandwidth_mbit * 1e6 / 8,
        rtt_s=2 * p.link.latency_ms / 1e3,  # the profile gives the one-way delay
    )


def fleet(kind: str, n: int, seed: int = 7) -> list[Device]:
    """``n`` devices: all rpi4-4gb (homogeneous) or a fixed-seed mix of :data:`MIX`."""
    profiles = {p.name: p for p in list_profiles()}
    rng = random.Random(seed * 1000 + n)
    names = ["rpi4-4gb"] * n if kind == "homogeneous" else [rng.choice(MIX) for _ in range(n)]
    return [_device(f"{name}-{i + 1}", profiles[name]) for i, name in enumerate(names)]


def _costs(models: tuple[str, ...]) -> dict[str, ModelCost]:
    from edgeslice.planner.modelspec import load_model
    from edgeslice.planner.profile import profile_model

    out = {}
    for name in models:
        loaded = load_model(name)
        out[name] = profile_model(loaded.module, loaded.example_inputs, 48, name).to_cost()
    return out


def _plans(cost: ModelCost, devices: list[Device]) -> dict[str, Plan | str]:
    plans: dict[str, Plan | str] = {}
    for name, strategy in STRATEGIES.items():
        try:
            plans[name] = strategy(cost, devices, DEFAULT_PARAMS)
        except Exception as exc:  # a baseline that cannot place the model is a result too
            plans[name] = str(exc)
    for objective in ("latency", "throughput"):
        plans[f"edgeslice-{objective}"] = plan_partition(cost, devices, objective)
    return plans


def _row(cost: ModelCost, plan: Plan, devices: list[Device]) -> dict[str, Any]:
    used = len({a for s in plan.stages for a in s.agents})
    in_flight = max(4, 2 * used)
    work = Workload(requests=max(60, 6 * in_flight), in_flight=in_flight, warmup=in_flight)
    sat = simulate(cost, plan, devices, work)
    # planner.client drops replicas busier than max_load (0.8) before choosing: at
    # saturation that herds requests onto the few idle (often slow) replicas. Same run
    # without that filter, to show what it costs.
    unfiltered = simulate(cost, plan, devices, work, weights=Weights(max_load=1.0))
    one = simulate(cost, plan, devices, Workload(requests=3, warmup=0))
    where, share = sat.bottleneck()
    return {
        "stages": len(plan.stages),
        "devices_used": used,
        "predicted_latency_s": plan.latency_s,
        "predicted_throughput_rps": plan.throughput_rps,
        "p50_s": one.p50_s,
        "in_flight": in_flight,
        "throughput_rps": sat.throughput_rps,
        "throughput_rps_without_load_filter": unfiltered.throughput_rps,
        "saturated_p50_s": sat.p50_s,
        "saturated_p95_s": sat.p95_s,
        "bottleneck": where,
        "bottleneck_busy": share,
    }


def _replica_compute(stage_row: dict[str, Any]) -> list[tuple[str, float]]:
    """(agent, measured compute s) per replica of a breakdown row; older results: one median."""
    if "replicas" in stage_row:
        return [
            (agent, r["measured_compute_s"])
            for agent, r in stage_row["replicas"].items()
            if r.get("measured_compute_s")
        ]
    measured = stage_row.get("measured_compute_s")
    return [(a, measured) for a in stage_row["agents"]] if measured else []


def _validate_file(name: str, costs: dict[str, ModelCost]) -> dict[str, Any]:
    """Simulated vs measured for every row of results/NAME.json (never invented)."""
    path = results_dir() / name
    if not path.exists():
        return {
            "available": False,
            "source": name,
            "reason": f"{path} not found (run `edgeslice bench strategies`); nothing compared",
        }
    rows, skipped = [], []
    for row in json.loads(path.read_text()).get("rows", []):
        if "measured" not in row or row["model"] not in costs:
            skipped.append(f"{row.get('model')}/{row.get('strategy')}")
            continue
        cost = costs[row["model"]]
        devices = [
            Device(d["agent_id"], d["gflops"], d["memory_bytes"], d["bandwidth_bps"], d["rtt_s"])
            for d in row["devices"]
        ]
        stages = [(a, b, list(agents)) for a, b, agents in row["stages"]]
        plan = build_plan(
            cost, devices, stages, objective=row["objective"], strategy=row["strategy"]
        )
        m = row["measured"]
        in_flight = int(m.get("in_flight", 2 * len(devices)))
        sat = simulate(cost, plan, devices, Workload(requests=100, in_flight=in_flight))
        one = simulate(cost, plan, devices, Workload(requests=3, warmup=0))
        # The planner's own remedy for compute mispricing (FlexPie-style correction), fitted
        # on this very run's stage timings: in-sample, so it isolates the queueing/link part.
        by_id = {d.agent_id: d for d in devices}
        samples = [
            (a, compute_s(cost, b["segments"][0], b["segments"][1], by_id[a]), measured)
            for b in row.get("breakdown", [])
            for a, measured in _replica_compute(b)
        ]
        params = CostParams(correction=fit_correction(samples, prior_samples=0.0))
        fitted = simulate(cost, plan, devices, Workload(requests=100, in_flight=in_flight), params)
        fitted_one = simulate(cost, plan, devices, Workload(requests=3, warmup=0), params)
        label = (
            row["strategy"] if row["strategy"] != "edgeslice" else f"edgeslice-{row['objective']}"
        )
        rows.append(
            {
                "fleet": row["fleet"],
                "model": row["model"],
                "strategy": label,
                "run": row.get("run", 0),
                "measured_throughput_rps": m["throughput_rps"],
                "simulated_throughput_rps": sat.throughput_rps,
                "throughput_error_pct": _err(sat.throughput_rps, m["throughput_rps"]),
                "measured_p50_s": m["p50_s"],
                "simulated_p50_s": one.p50_s,
                "p50_error_pct": _err(one.p50_s, m["p50_s"]),
                "corrected_simulated_throughput_rps": fitted.throughput_rps,
                "corrected_throughput_error_pct": _err(fitted.throughput_rps, m["throughput_rps"]),
                "corrected_simulated_p50_s": fitted_one.p50_s,
                "corrected_p50_error_pct": _err(fitted_one.p50_s, m["p50_s"]),
                "predicted_throughput_rps": plan.throughput_rps,
                "prediction_throughput_error_pct": _err(plan.throughput_rps, m["throughput_rps"]),
            }
        )
    return {
        "available": bool(rows),
        "source": name,
        "cost": "profiled FLOPs (to_cost) on the devices' measured GFLOP/s, links and RTTs",
        "rows": rows,
        "skipped": skipped,
        "median_abs_throughput_error_pct": _median_abs(r["throughput_error_pct"] for r in rows),
        "median_abs_p50_error_pct": _median_abs(r["p50_error_pct"] for r in rows),
        "median_abs_corrected_throughput_error_pct": _median_abs(
            r["corrected_throughput_error_pct"] for r in rows
        ),
        "median_abs_corrected_p50_error_pct": _median_abs(
            r["corrected_p50_error_pct"] for r in rows
        ),
        "corrected_note": "corrected_*: compute rescaled per agent by fit_correction on the "
        "same run's measured stage compute times (in-sample; isolates queueing and links)",
        "median_abs_prediction_error_pct": _median_abs(
            r["prediction_throughput_error_pct"] for r in rows
        ),
    }


def _err(simulated: float, measured: float) -> float:
    return 100.0 * (simulated - measured) / measured


def _median_abs(values: Any) -> float | None:
    ordered = sorted(abs(v) for v in values)
    if not ordered:
        return None
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, fleet, size): edgeslice vs the best baseline; per strategy: 8 -> 64 scaling."""
    out = []
    for key in sorted({(r["model"], r["fleet"], r["devices"]) for r in rows}):
        group = [
            r
            for r in rows
            if (r["model"], r["fleet"], r["devices"]) == key and "throughput_rps" in r
        ]
        base = [r for r in group if not r["strategy"].startswith("edgeslice")]
        best = max(base, key=lambda r: r["throughput_rps"], default=None)
        ours = next(r for r in group if r["strategy"] == "edgeslice-throughput")
        out.append(
            {
                "model": key[0],
                "fleet": key[1],
                "devices": key[2],
                "edgeslice_throughput_rps": ours["throughput_rps"],
                "best_baseline": best["strategy"] if best else None,
                "best_baseline_throughput_rps": best["throughput_rps"] if best else None,
                "vs_best_baseline": ours["throughput_rps"] / best["throughput_rps"]
                if best
                else None,
            }
        )
    return out


def _scaling(rows: list[dict[str, Any]], sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    out = []
    for model, kind, strategy in sorted({(r["model"], r["fleet"], r["strategy"]) for r in rows}):
        by_n = {
            r["devices"]: r.get("throughput_rps")
            for r in rows
            if (r["model"], r["fleet"], r["strategy"]) == (model, kind, strategy)
        }
        lo, hi = by_n.get(sizes[0]), by_n.get(sizes[-1])
        out.append(
            {
                "model": model,
                "fleet": kind,
                "strategy": strategy,
                "throughput_rps": {str(n): by_n.get(n) for n in sizes},
                f"scaling_{sizes[0]}_to_{sizes[-1]}": hi / lo if lo and hi else None,
            }
        )
    return out


def main(quick: bool = False) -> dict[str, Any]:
    models = MODELS[:1] if quick else MODELS
    sizes = (8, 16) if quick else SIZES
    print(f"# {NOTE}")
    print("# no-filt: same run with planner.client's load filter (max_load 0.8) switched off")
    costs = _costs(models)
    rows: list[dict[str, Any]] = []
    print(
        f"{'model':<12} {'fleet':<13} {'n':>3} {'strategy':<21} {'stages':>6} {'used':>4} "
        f"{'p50 ms':>8} {'thr req/s':>10} {'no-filt':>8} {'pred req/s':>10}  bottleneck (SIMULATED)"
    )
    for model, cost in costs.items():
        for kind in ("homogeneous", "heterogeneous"):
            for n in sizes:
                devices = fleet(kind, n)
                for label, plan in _plans(cost, devices).items():
                    head = {"model": model, "fleet": kind, "devices": n, "strategy": label}
                    if isinstance(plan, str):
                        rows.append({**head, "error": plan})
                        print(f"{model:<12} {kind:<13} {n:>3} {label:<21} cannot plan: {plan[:60]}")
                        continue
                    row = {**head, **_row(cost, plan, devices)}
                    rows.append(row)
                    print(
                        f"{model:<12} {kind:<13} {n:>3} {label:<21} {row['stages']:>6} "
                        f"{row['devices_used']:>4} {1e3 * row['p50_s']:>8.1f} "
                        f"{row['throughput_rps']:>10.2f} "
                        f"{row['throughput_rps_without_load_filter']:>8.2f} "
                        f"{row['predicted_throughput_rps']:>10.2f}"
                        f"  {row['bottleneck']} {100 * row['bottleneck_busy']:.0f}%",
                        flush=True,
                    )
    summary = _summaries(rows)
    scaling = _scaling(rows, sizes)
    print("\n# edgeslice-throughput vs the best baseline (SIMULATED throughput)")
    for s in summary:
        print(
            f"{s['model']:<12} {s['fleet']:<13} {s['devices']:>3}: "
            f"{s['edgeslice_throughput_rps']:8.2f} req/s, "
            f"best baseline {s['best_baseline']} x{s['vs_best_baseline']:.2f}"
        )
    print(f"\n# scaling {sizes[0]} -> {sizes[-1]} devices (SIMULATED throughput ratio)")
    for s in scaling:
        ratio = s[f"scaling_{sizes[0]}_to_{sizes[-1]}"]
        print(
            f"{s['model']:<12} {s['fleet']:<13} {s['strategy']:<21} x{ratio:.2f}" if ratio else ""
        )
    validation = _validate_file("strategies.json", costs)
    quick_validation = _validate_file("strategies-quick.json", costs)
    for v in (validation, quick_validation):
        if v["available"]:
            print(
                f"validation vs measured ({v['source']}, {len(v['rows'])} rows): median |error| "
                f"simulated throughput {v['median_abs_throughput_error_pct']:.0f} %, p50 "
                f"{v['median_abs_p50_error_pct']:.0f} %; with fitted compute correction "
                f"{v['median_abs_corrected_throughput_error_pct']:.0f} % / "
                f"{v['median_abs_corrected_p50_error_pct']:.0f} %; closed-form prediction "
                f"{v['median_abs_prediction_error_pct']:.0f} %"
            )
        else:
            print(f"validation ({v['source']}): {v.get('reason', 'no comparable rows')}")
    result = {
        "simulated": True,
        "note": NOTE,
        "quick": quick,
        "rows": rows,
        "summary": summary,
        "scaling": scaling,
        "validation": validation,
        "validation_quick_run": quick_validation,
    }
    path = write_result("simulation-quick" if quick else "simulation", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv[1:])
