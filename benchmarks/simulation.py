"""Simulation beyond this machine: fleets of 8-64 devices, every strategy, SIMULATED figures.

This machine has two cores, so large fleets are run through :mod:`planner.simulate`,
which prices every task with the planner's own cost model. Model costs are this
machine's measured segment times (``planner.timing``); devices come from the firmware
profiles (rated GFLOP/s, memory budget, typical link). The results are simulated, and
the JSON and the printout say so. ``validation`` replays each measured run of
``benchmarks/results/strategies.json`` (same devices as measured, same plan) through the
simulator and reports the error against what was measured.
"""

from __future__ import annotations

import json
import random
from typing import Any

from benchmarks.common import RESULTS_DIR, write_result
from firmware_profiles import load_profile
from planner.costmodel import DEFAULT_PARAMS, Device, ModelCost
from planner.partition import STRATEGIES, build_plan, plan_partition
from planner.simulate import simulate

NOTE = (
    "SIMULATED with planner.simulate (the planner's cost model plus queueing), "
    "not measured on devices"
)
MIX = ("rpi3b", "rpi4-4gb", "rpi5-8gb", "jetson-nano")


def _device(agent_id: str, profile_name: str) -> Device:
    p = load_profile(profile_name)
    return Device(
        agent_id,
        gflops=p.gflops_fp32,
        memory_bytes=p.memory_budget_bytes,
        bandwidth_bps=p.link.bandwidth_mbit * 1e6 / 8,
        rtt_s=2 * p.link.latency_ms / 1e3,
    )


def fleet(kind: str, n: int, seed: int = 7) -> list[Device]:
    rng = random.Random(seed + n)
    names = ["rpi4-4gb"] * n if kind == "homogeneous" else [rng.choice(MIX) for _ in range(n)]
    return [_device(f"{name}-{i + 1}", name) for i, name in enumerate(names)]


def _costs(models: list[str]) -> dict[str, ModelCost]:
    from planner.modelspec import load_model
    from planner.profile import profile_model
    from planner.timing import timed_cost

    out = {}
    for name in models:
        loaded = load_model(name)
        profile = profile_model(loaded.module, loaded.example_inputs, 48, name)
        out[name] = timed_cost(profile, loaded.example_inputs)[0]
    return out


def _plans(cost: ModelCost, devices: list[Device]) -> dict[str, Any]:
    plans: dict[str, Any] = {}
    for name, strategy in STRATEGIES.items():
        try:
            plans[name] = strategy(cost, devices, DEFAULT_PARAMS)
        except Exception as exc:  # a baseline that cannot place the model is a result too
            plans[name] = str(exc)
    plans["edgeslice-latency"] = plan_partition(cost, devices, "latency")
    plans["edgeslice-throughput"] = plan_partition(cost, devices, "throughput")
    return plans


def _validation(costs: dict[str, ModelCost]) -> dict[str, Any]:
    path = RESULTS_DIR / "strategies.json"
    if not path.exists():
        return {
            "available": False,
            "reason": f"{path.name} not found: run `edgeslice bench "
            "strategies` first; nothing is compared",
        }
    measured = json.loads(path.read_text())
    rows = []
    for row in measured.get("rows", []):
        if "measured" not in row or row["model"] not in costs:
            continue
        devices = [
            Device(
                d["agent_id"],
                d["gflops"],
                d["memory_bytes"],
                max(d["bandwidth_bps"], 1.0),
                d["rtt_s"],
            )
            for d in row["devices"]
        ]
        cost = costs[row["model"]]
        plan = build_plan(
            cost,
            devices,
            [(a, b, agents) for a, b, agents in row["stages"]],
            objective=row["objective"],
            strategy=row["strategy"],
        )
        dispatch = "amp4ec" if row["strategy"] == "amp4ec" else "edgeslice"
        m = row["measured"]
        thr = simulate(
            cost, plan, devices, in_flight=m["in_flight"], requests=60, dispatch=dispatch
        )
        lat = simulate(cost, plan, devices, in_flight=1, requests=10, warmup=2, dispatch=dispatch)
        rows.append(
            {
                "fleet": row["fleet"],
                "model": row["model"],
                "strategy": row["strategy"],
                "measured_throughput_rps": m["throughput_rps"],
                "simulated_throughput_rps": thr.throughput_rps,
                "throughput_error_pct": 100
                * (thr.throughput_rps - m["throughput_rps"])
                / m["throughput_rps"],
                "measured_p50_s": m["p50_s"],
                "simulated_p50_s": lat.p50_s,
                "p50_error_pct": 100 * (lat.p50_s - m["p50_s"]) / m["p50_s"],
            }
        )
    errors = [abs(r["throughput_error_pct"]) for r in rows]
    return {
        "available": bool(rows),
        "rows": rows,
        "median_abs_throughput_error_pct": sorted(errors)[len(errors) // 2] if errors else None,
        "median_abs_p50_error_pct": sorted(abs(r["p50_error_pct"]) for r in rows)[len(rows) // 2]
        if rows
        else None,
    }


def main(quick: bool = False) -> dict[str, Any]:
    models = ["mobilenetv2"] if quick else ["mobilenetv2", "resnet18", "transformer"]
    sizes = [8, 16] if quick else [8, 16, 32, 64]
    costs = _costs(models)
    print(f"# {NOTE}")
    rows: list[dict[str, Any]] = []
    for model, cost in costs.items():
        for kind in ("homogeneous", "heterogeneous"):
            for n in sizes:
                devices = fleet(kind, n)
                for label, plan in _plans(cost, devices).items():
                    if isinstance(plan, str):
                        rows.append(
                            {
                                "model": model,
                                "fleet": kind,
                                "devices": n,
                                "strategy": label,
                                "error": plan,
                            }
                        )
                        continue
                    used = len({a for s in plan.stages for a in s.agents})
                    dispatch = "amp4ec" if label == "amp4ec" else "edgeslice"
                    sat = simulate(
                        cost,
                        plan,
                        devices,
                        in_flight=max(2, 2 * used),
                        requests=40 if quick else 120,
                        dispatch=dispatch,
                    )
                    one = simulate(
                        cost, plan, devices, in_flight=1, requests=6, warmup=1, dispatch=dispatch
                    )
                    rows.append(
                        {
                            "model": model,
                            "fleet": kind,
                            "devices": n,
                            "strategy": label,
                            "stages": len(plan.stages),
                            "devices_used": used,
                            "p50_s": one.p50_s,
                            "throughput_rps": sat.throughput_rps,
                        }
                    )
                group = [
                    r
                    for r in rows
                    if (r["model"], r["fleet"], r["devices"]) == (model, kind, n)
                    and "throughput_rps" in r
                ]
                best = max(
                    (r for r in group if not r["strategy"].startswith("edgeslice")),
                    key=lambda r: r["throughput_rps"],
                    default=None,
                )
                ours = next(r for r in group if r["strategy"] == "edgeslice-throughput")
                ratio = ours["throughput_rps"] / best["throughput_rps"] if best else float("nan")
                print(
                    f"{model:<12} {kind:<13} {n:>3} devices: edgeslice "
                    f"{ours['throughput_rps']:8.2f} req/s on {ours['devices_used']:>2} devices; "
                    "best baseline "
                    f"{best['strategy'] if best else '-'} x{ratio:.2f}",
                    flush=True,
                )
    validation = _validation(costs)
    if validation["available"]:
        print(
            f"validation against measured 4-device runs: median |error| throughput "
            f"{validation['median_abs_throughput_error_pct']:.0f} %, p50 "
            f"{validation['median_abs_p50_error_pct']:.0f} %"
        )
    else:
        print(f"validation: {validation['reason']}")
    result = {
        "simulated": True,
        "note": NOTE,
        "quick": quick,
        "rows": rows,
        "validation": validation,
    }
    path = write_result("simulation-quick" if quick else "simulation", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
