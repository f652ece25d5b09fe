"""Strategies side by side on the same emulated fleet, in the same run (issue 5, benchmark 1).

Fleets (cgroup-limited agents at their profiles' speed, behind their profiles' links):
4 x rpi4-4gb (homogeneous) and rpi3b + rpi4-4gb + rpi5-8gb + jetson-nano (heterogeneous).
For each model and strategy the planner restarts with ``--strategy`` on the same running
agents; the same client measures p50/p95 latency at one request in flight and throughput
at saturation (closed loop), with the per-stage breakdown and predicted vs measured stage
compute. Baselines are planned by the same cost model and served by the same data plane,
so only the placement differs. ``quick`` runs one model on a two-device fleet (CI).
"""

from __future__ import annotations

import tempfile
from typing import Any

from edgeslice.benchmarks.common import chart, write_result
from edgeslice.benchmarks.fleetbench import run_strategy
from edgeslice.lab.testbed import Testbed, parse_fleet, wait_for_agents

FLEETS = {
    "homogeneous": [{"profile": "rpi4-4gb", "count": 4}],
    "heterogeneous": [{"profile": p} for p in ("rpi3b", "rpi4-4gb", "rpi5-8gb", "jetson-nano")],
}
STRATEGIES = [
    ("monolithic", "throughput"),
    ("even-split", "throughput"),
    ("memory-proportional", "throughput"),
    ("amp4ec", "throughput"),
    ("edgeslice", "latency"),
    ("edgeslice", "throughput"),
]
MODELS = ["mobilenetv2", "resnet18", "transformer"]


def _label(strategy: str, objective: str) -> str:
    return f"edgeslice-{objective}" if strategy == "edgeslice" else strategy


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, checked on what was measured; misses say by how much."""
    out = []
    for fleet, model in sorted({(r["fleet"], r["model"]) for r in rows}):
        group = {r["strategy"]: r for r in rows if (r["fleet"], r["model"]) == (fleet, model)}
        ours = group.get("edgeslice-throughput")
        if ours is None:
            continue
        thr = ours["measured"]["throughput_rps"]
        if fleet == "homogeneous" and "monolithic" in group:
            ratio = thr / group["monolithic"]["measured"]["throughput_rps"]
            out.append(
                {
                    "fleet": fleet,
                    "model": model,
                    "target": "throughput >= 3.2x monolithic",
                    "value": round(ratio, 2),
                    "met": ratio >= 3.2,
                }
            )
        baselines = [r for k, r in group.items() if not k.startswith("edgeslice")]
        if fleet == "heterogeneous" and baselines:
            best = max(baselines, key=lambda r: r["measured"]["throughput_rps"])
            ratio = thr / best["measured"]["throughput_rps"]
            out.append(
                {
                    "fleet": fleet,
                    "model": model,
                    "target": f"throughput >= 1.2x best baseline ({best['strategy']})",
                    "value": round(ratio, 2),
                    "met": ratio >= 1.2,
                }
            )
            lat = group.get("edgeslice-latency", ours)["measured"]["p50_s"]
            best_lat = min(r["measured"]["p50_s"] for r in baselines)
            out.append(
                {
                    "fleet": fleet,
                    "model": model,
                    "target": "p50 latency <= best baseline's",
                    "value": round(lat / best_lat, 2),
                    "met": lat <= best_lat * 1.0,
                }
            )
        errors = [abs(b["prediction_error_pct"]) for b in ours["breakdown"]]
        if errors:
            out.append(
                {
                    "fleet": fleet,
                    "model": model,
                    "target": "predicted stage compute within 20 % of measured",
                    "value": round(max(errors), 1),
                    "met": max(errors) <= 20.0,
                }
            )
    return out


def main(quick: bool = False) -> dict[str, Any]:
    from edgeslice.planner.modelspec import load_model

    fleets = {"homogeneous": [{"profile": "rpi4-4gb", "count": 2}]} if quick else FLEETS
    models = ["mobilenetv2"] if quick else MODELS
    strategies = (
        [("monolithic", "throughput"), ("edgeslice", "throughput")] if quick else STRATEGIES
    )
    rows: list[dict[str, Any]] = []
    for fleet_name, entries in fleets.items():
        spec = parse_fleet({"namespace": f"bench-{fleet_name}", "agents": entries}, fleet_name)
        bed = Testbed(spec, tempfile.mkdtemp(prefix=f"edgeslice-bench-{fleet_name}-")).up()
        try:
            import asyncio

            infos = asyncio.run(wait_for_agents(bed.broker_url, spec.namespace, bed.agents))
            devices = [
                {
                    "agent_id": a,
                    "profile": i.profile,
                    "gflops": i.gflops,
                    "memory_bytes": i.memory_budget_bytes,
                    "bandwidth_bps": i.link_bandwidth_bps,
                    "rtt_s": i.link_rtt_s,
                    "limits": i.limits,
                    "emulated": i.emulated,
                }
                for a, i in infos.items()
            ]
            print(
                f"fleet {fleet_name}: "
                + ", ".join(
                    f"{d['agent_id']} {d['gflops']:.1f} GFLOP/s "
                    f"({'emulated' if d['emulated'] else 'UNLIMITED'})"
                    for d in devices
                ),
                flush=True,
            )
            for model in models:
                inputs = load_model(model).example_inputs
                for strategy, objective in strategies:
                    label = _label(strategy, objective)
                    try:
                        res = run_strategy(
                            bed,
                            model,
                            strategy,
                            objective,
                            inputs,
                            min_agents=len(bed.agents),
                            latency_requests=4 if quick else 8,
                            throughput_requests=8 if quick else 24,
                            in_flight=2 * len(bed.agents),
                        )
                    except Exception as exc:  # a baseline that cannot fit is a result too
                        print(f"  {model:<12} {label:<22} FAILED: {exc}", flush=True)
                        rows.append(
                            {
                                "fleet": fleet_name,
                                "model": model,
                                "strategy": label,
                                "objective": objective,
                                "error": str(exc),
                            }
                        )
                        continue
                    m = res["measured"]
                    print(
                        f"  {model:<12} {label:<22} p50 {m['p50_s'] * 1e3:8.1f} ms  p95 "
                        f"{m['p95_s'] * 1e3:8.1f} ms  {m['throughput_rps']:6.2f} req/s  "
                        f"stages {len(res['stages'])}",
                        flush=True,
                    )
                    rows.append(
                        {
                            "fleet": fleet_name,
                            "model": model,
                            "strategy": label,
                            "objective": objective,
                            "devices": devices,
                            **res,
                        }
                    )
        finally:
            bed.down()
    ok_rows = [r for r in rows if "measured" in r]
    targets = _targets(ok_rows)
    for t in targets:
        print(
            f"target {t['fleet']}/{t['model']}: {t['target']}: {t['value']} "
            f"{'MET' if t['met'] else 'MISSED'}"
        )
    name = "strategies-quick" if quick else "strategies"
    result = {"quick": quick, "rows": rows, "targets": targets}
    path = write_result(name, result)
    chart(name, ok_rows, "strategy", "throughput_rps", "throughput (req/s)")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
