"""Strategies side by side on the same emulated fleet, in the same run (issue 5, benchmark 1).

Fleets (paced emulated agents at their profiles' speed, behind their profiles' links):
4 x rpi4-4gb (homogeneous) and rpi3b + rpi4-4gb + rpi5-8gb + jetson-nano (heterogeneous).
For each model and strategy the planner restarts with ``--strategy`` on the same running
agents; the same client measures p50/p95 latency at one request in flight and steady-state
throughput at saturation (closed loop, :mod:`fleetbench`), with the per-stage breakdown
and predicted vs measured stage compute. Baselines are planned by the same cost model and
served by the same data plane, so only the placement differs.

Every figure is measured ``runs`` times (3 by default), interleaved: run r measures every
strategy once, in an order rotated by r, before run r+1 starts, so a drift in the
machine's speed hits all strategies alike. The JSON keeps every run (``rows``, each with
its ``run``); ``summary`` gives the median and min-max per figure; ratios (ours vs
monolithic, ours vs the best baseline of the same run) are computed per run and
summarised the same way, and the issue's targets are checked on those medians.
``quick`` runs one model on a two-device fleet once (CI; labelled ``runs: 1``).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

from edgeslice.benchmarks.common import chart, load_average, rotated, spread, write_result
from edgeslice.benchmarks.fleetbench import Load, run_strategy
from edgeslice.lab.testbed import Testbed, parse_fleet, wait_for_agents

FLEETS: dict[str, list[dict[str, Any]]] = {
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
RUNS = 3
# Per measurement: 6 sequential requests (p50; p95 is their slowest), then at least 10
# completions over at least 3 s at 2 requests in flight per device the plan uses.
# Re-planning (planner start, profiling, export, agents loading their stages) costs more.
LOAD = Load(latency_requests=6, window_requests=10, window_s=3.0)
QUICK_LOAD = Load(latency_requests=4, window_requests=6, window_s=2.0)

# The targets: (fleet, ratio key, threshold, higher is better, wording).
TARGETS = [
    ("homogeneous", "vs_monolithic_throughput", 3.6, True, "throughput >= 3.6x monolithic"),
    (
        "heterogeneous",
        "vs_best_baseline_throughput",
        1.3,
        True,
        "throughput >= 1.3x best baseline",
    ),
    (
        "heterogeneous",
        "vs_best_baseline_p50",
        1.0,
        False,
        "p50 no worse than that baseline's (ratio <= 1)",
    ),
]
PREDICTION_TARGET_PCT = 10.0  # the issue's: every stage of every row


def _label(strategy: str, objective: str) -> str:
    return f"edgeslice-{objective}" if strategy == "edgeslice" else strategy


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "measured" in r]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fleet, model, strategy): median and min-max of p50, p95 and throughput."""
    out = []
    keys = sorted({(r["fleet"], r["model"], r["strategy"]) for r in rows}, key=_order)
    for fleet, model, strategy in keys:
        runs = [
            r for r in rows if (r["fleet"], r["model"], r["strategy"]) == (fleet, model, strategy)
        ]
        ok = _ok(runs)
        layouts = sorted({_layout(r["stages"]) for r in ok})
        out.append(
            {
                "fleet": fleet,
                "model": model,
                "strategy": strategy,
                "runs": len(runs),
                "failed": [r["error"] for r in runs if "error" in r],
                "stages": layouts,
                "measured": {
                    metric: spread([r["measured"][metric] for r in ok])
                    for metric in ("p50_s", "p95_s", "throughput_rps")
                },
                "predicted_throughput_rps": spread([r["predicted_throughput_rps"] for r in ok]),
                "worst_prediction_error_pct": spread(
                    [
                        max(abs(b["prediction_error_pct"]) for b in errors)
                        for r in ok
                        if (errors := [b for b in r["breakdown"] if "prediction_error_pct" in b])
                    ]
                ),
            }
        )
    return out


def _order(key: tuple[str, str, str]) -> tuple[int, int, int]:
    fleet, model, strategy = key
    labels = [_label(s, o) for s, o in STRATEGIES]
    return (
        list(FLEETS).index(fleet) if fleet in FLEETS else len(FLEETS),
        MODELS.index(model) if model in MODELS else len(MODELS),
        labels.index(strategy) if strategy in labels else len(labels),
    )


def _layout(stages: list[Any]) -> str:
    """A plan's shape, e.g. ``1 stage x 4 agents`` or ``4 stages (1+1+1+1 agents)``."""
    if len(stages) == 1:
        return f"1 stage x {len(stages[0][2])} agents"
    return f"{len(stages)} stages ({'+'.join(str(len(s[2])) for s in stages)} agents)"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fleet, model): ours vs monolithic and vs the best baseline, computed per run."""
    out = []
    ok = _ok(rows)
    for fleet, model in sorted(
        {(r["fleet"], r["model"]) for r in ok}, key=lambda k: _order((*k, ""))
    ):
        per_run: list[dict[str, Any]] = []
        for run in sorted({r["run"] for r in ok}):
            group = {
                r["strategy"]: r
                for r in ok
                if (r["fleet"], r["model"], r["run"]) == (fleet, model, run)
            }
            ours = group.get("edgeslice-throughput")
            if ours is None:
                continue
            thr = ours["measured"]["throughput_rps"]
            entry: dict[str, Any] = {"run": run}
            if "monolithic" in group:
                entry["vs_monolithic_throughput"] = (
                    thr / group["monolithic"]["measured"]["throughput_rps"]
                )
            baselines = [r for k, r in group.items() if not k.startswith("edgeslice")]
            if baselines:
                best = max(baselines, key=lambda r: r["measured"]["throughput_rps"])
                entry["best_baseline"] = best["strategy"]
                entry["vs_best_baseline_throughput"] = thr / best["measured"]["throughput_rps"]
                entry["vs_best_baseline_p50"] = (
                    ours["measured"]["p50_s"] / best["measured"]["p50_s"]
                )
                latency = group.get("edgeslice-latency")
                if latency is not None:
                    lowest = min(r["measured"]["p50_s"] for r in baselines)
                    entry["latency_plan_vs_lowest_baseline_p50"] = (
                        latency["measured"]["p50_s"] / lowest
                    )
            per_run.append(entry)
        keys = [k for k in per_run[0] if k.startswith(("vs_", "latency_plan"))] if per_run else []
        out.append(
            {
                "fleet": fleet,
                "model": model,
                "per_run": per_run,
                "best_baselines": sorted(
                    {e["best_baseline"] for e in per_run if "best_baseline" in e}
                ),
                **{k: spread([e[k] for e in per_run if k in e]) for k in keys},
            }
        )
    return out


def _target(
    fleet: str, model: str, wording: str, figure: dict[str, Any], threshold: float, higher: bool
) -> dict[str, Any]:
    value = figure["median"]
    met = value is not None and (value >= threshold if higher else value <= threshold)
    entry = {
        "fleet": fleet,
        "model": model,
        "target": wording,
        "threshold": threshold,
        "higher_is_better": higher,
        **{k: figure[k] for k in ("median", "min", "max", "n")},
        "met": met,
    }
    if value is not None and not met:
        entry["missed_by"] = abs(threshold - value)
        entry["missed_by_pct"] = 100.0 * abs(threshold - value) / threshold
    return entry


def targets(
    summary: list[dict[str, Any]], ratio_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The issue's targets, checked on the medians of the per-run ratios."""
    out = []
    for group in ratio_rows:
        for fleet, key, threshold, higher, wording in TARGETS:
            if group["fleet"] == fleet and key in group:
                out.append(_target(fleet, group["model"], wording, group[key], threshold, higher))
    for row in summary:
        if row["worst_prediction_error_pct"]["n"]:
            out.append(
                _target(
                    row["fleet"],
                    row["model"],
                    f"{row['strategy']}: predicted stage compute within "
                    f"{PREDICTION_TARGET_PCT:.0f} % of measured",
                    row["worst_prediction_error_pct"],
                    PREDICTION_TARGET_PCT,
                    False,
                )
            )
    return out


def _devices(infos: dict[str, Any]) -> list[dict[str, Any]]:
    return [
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


def measure_fleet(
    fleet_name: str,
    entries: list[dict[str, Any]],
    models: list[str],
    strategies: list[tuple[str, str]],
    runs: int,
    load: Load,
) -> list[dict[str, Any]]:
    """Every strategy ``runs`` times per model on one running fleet, interleaved (one row each)."""
    from edgeslice.planner.modelspec import load_model

    spec = parse_fleet({"namespace": f"bench-{fleet_name}", "agents": entries}, fleet_name)
    bed = Testbed(spec, tempfile.mkdtemp(prefix=f"edgeslice-bench-{fleet_name}-")).up()
    rows: list[dict[str, Any]] = []
    try:
        devices = _devices(asyncio.run(wait_for_agents(bed.broker_url, spec.namespace, bed.agents)))
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
            for run in range(runs):
                for position, (strategy, objective) in enumerate(rotated(strategies, run)):
                    label = _label(strategy, objective)
                    base = {
                        "fleet": fleet_name,
                        "model": model,
                        "strategy": label,
                        "objective": objective,
                        "run": run,
                        "position": position,
                        "load_1m": load_average()[0],
                    }
                    try:
                        res = run_strategy(
                            bed, model, strategy, objective, inputs, len(bed.agents), load
                        )
                    except Exception as exc:  # a baseline that cannot fit is a result too
                        print(f"  {model:<12} run {run + 1} {label:<22} FAILED: {exc}", flush=True)
                        rows.append({**base, "error": str(exc)})
                        continue
                    m = res["measured"]
                    print(
                        f"  {model:<12} run {run + 1} {label:<22} p50 {m['p50_s'] * 1e3:7.1f} ms"
                        f"  p95 {m['p95_s'] * 1e3:7.1f} ms  {m['throughput_rps']:6.2f} req/s"
                        f"  {_layout(res['stages'])}  (plan {res['plan_ready_s']:.0f} s,"
                        f" measure {res['measure_s']:.0f} s, load {base['load_1m']:.1f})",
                        flush=True,
                    )
                    rows.append({**base, "devices": devices, **res})
    finally:
        bed.down()
    return rows


def _fmt(figure: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not figure["n"]:
        return "-"
    med, lo, hi = (figure[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main(
    quick: bool = False, runs: int | None = None, models: list[str] | None = None
) -> dict[str, Any]:
    """Run the benchmark, one model at a time (both fleets), writing the JSON after each
    model: a run stopped part-way leaves complete figures for the models it finished, and
    the JSON says which models those are (``models``, ``all_models``)."""
    runs = runs or (1 if quick else RUNS)
    fleets: dict[str, list[dict[str, Any]]] = (
        {"homogeneous": [{"profile": "rpi4-4gb", "count": 2}]} if quick else FLEETS
    )
    models = models or (["mobilenetv2"] if quick else MODELS)
    strategies = (
        [("monolithic", "throughput"), ("edgeslice", "throughput")] if quick else STRATEGIES
    )
    load = QUICK_LOAD if quick else LOAD
    started = time.perf_counter()
    load_before = list(load_average())
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for done, model in enumerate(models, start=1):
        for fleet_name, entries in fleets.items():
            rows += measure_fleet(fleet_name, entries, [model], strategies, runs, load)
        result = _write(quick, runs, models[:done], load, started, load_before, rows)
    return result


def _write(
    quick: bool,
    runs: int,
    models: list[str],
    load: Load,
    started: float,
    load_before: list[float],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    summary = summarise(rows)
    ratio_rows = ratios(rows)
    checked = targets(summary, ratio_rows)
    print(f"\nmedian (min-max) of {runs} run(s){' -- quick: one run' if runs == 1 else ''}:")
    for s in summary:
        m = s["measured"]
        print(
            f"{s['fleet']:<13} {s['model']:<12} {s['strategy']:<22} "
            f"p50 {_fmt(m['p50_s'], 1e3, 0)} ms  req/s {_fmt(m['throughput_rps'])}"
        )
    for t in checked:
        verdict = "MET" if t["met"] else f"MISSED by {t['missed_by']:.2f}"
        print(
            f"target {t['fleet']}/{t['model']}: {t['target']}: "
            f"{_fmt({k: t[k] for k in ('median', 'min', 'max', 'n')})} {verdict}"
        )
    name = "strategies-quick" if quick else "strategies"
    result: dict[str, Any] = {
        "quick": quick,
        "runs": runs,
        "models": models,
        "all_models": quick or sorted(models) == sorted(MODELS),
        "load": {
            "latency_requests": load.latency_requests,
            "in_flight_per_device": load.in_flight_per_device,
            "window_requests": load.window_requests,
            "window_s": load.window_s,
        },
        "elapsed_s": time.perf_counter() - started,
        "load_avg_before_1_5_15": load_before,
        "load_1m_during": spread([r["load_1m"] for r in rows]),
        "rows": rows,
        "summary": summary,
        "ratios": ratio_rows,
        "targets": checked,
    }
    path = write_result(name, result)
    chart(
        name,
        [s for s in summary if s["measured"]["throughput_rps"]["n"]],
        "strategy",
        "throughput_rps",
        "throughput (req/s), median and min-max",
    )
    print(f"wrote {path} ({result['elapsed_s'] / 60:.1f} min)", flush=True)
    return result


if __name__ == "__main__":
    main()
