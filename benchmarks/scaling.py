"""Scaling: edgeslice's throughput as one fleet grows 1 -> 2 -> 3 -> 4 emulated devices.

One planner (objective throughput) and one client stay up; an emulated rpi4-4gb joins at
each step, the planner re-plans, and steady-state throughput at saturation (2 requests in
flight per device the plan uses, :mod:`fleetbench`) is measured on the new plan. The sweep
is repeated ``runs`` times (3 by default), each on a fresh testbed, so every device count
is measured once per run; speed-ups (n devices vs 1) and step ratios (n vs n-1) are
computed per run and reported as median and min-max.

The issue's targets: throughput never drops as a device joins (the medians are
monotonic) and the planner's predicted throughput is within 10 % of the measured median
at every size. This is the planner service's own path (``edgeslice planner`` as a
process): each re-plan starts from the plan being served (``plan_partition(baseline=...)``),
which keeps it unless a new plan beats it by more than the measured prediction error
(:mod:`planner.margin`), so the *predicted* throughput never drops as devices join;
``predicted_never_lower`` checks that.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from typing import Any

from edgeslice.benchmarks.common import load_average, results_dir, spread, write_result
from edgeslice.benchmarks.fleetbench import Load, measure_plan
from edgeslice.broker.protocol.errors import RequestTimeout
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.testbed import Testbed, TestbedAgent, parse_fleet

RUNS = 3
PREDICTION_TARGET_PCT = 10.0


def _load(quick: bool) -> Load:
    if quick:
        return Load(latency_requests=4, window_requests=6, window_s=2.0)
    return Load(latency_requests=6, window_requests=10, window_s=3.0)


def sweep(run: int, steps: int, model: str, quick: bool) -> list[dict[str, Any]]:
    """One run: a fresh one-device testbed, then a device joins per step; a row per size."""
    from edgeslice.planner.modelspec import load_model

    spec = parse_fleet(
        {"namespace": "bench-scaling", "agents": [{"profile": "rpi4-4gb", "count": 1}]}, "scaling"
    )
    bed = Testbed(spec, tempfile.mkdtemp(prefix="edgeslice-bench-scaling-")).up()
    template = spec.agents[0]
    inputs = load_model(model).example_inputs
    rows: list[dict[str, Any]] = []
    try:
        assert bed.fleet is not None
        bed.fleet.start_planner(
            model, ["--objective", "throughput", "--min-agents", "1", "--replan-delay", "1"]
        )
        settings = parse_broker_url(bed.broker_url, spec.namespace)

        async def go() -> None:
            async with InferenceClient(settings, model) as client:
                version = 0
                for n in range(1, steps + 1):
                    wait_s = 300.0 if n == 1 else 120.0
                    if n > 1:
                        bed.add_agent(
                            TestbedAgent(
                                f"rpi4-4gb-{n}", template.profile, template.link, template.emulate
                            )
                        )
                    while True:  # the plan that knows every device started so far
                        try:
                            plan = await client.wait_ready(wait_s, newer_than=version)
                        except RequestTimeout:
                            # no new plan: the planner kept the one it serves (margin)
                            plan = await client.wait_ready(60)
                            used = {a for s in plan.stages for a in s.agents}
                            break
                        version = plan.plan_version
                        used = {a for s in plan.stages for a in s.agents}
                        if len(used) >= n or n == 1:
                            break
                    load_1m = load_average()[0]
                    res = await measure_plan(client, plan, inputs, _load(quick))
                    rows.append(
                        {"run": run, "devices": n, "used": sorted(used), "load_1m": load_1m, **res}
                    )
                    print(
                        f"run {run + 1}, {n} device(s): "
                        f"{res['measured']['throughput_rps']:.2f} req/s (predicted "
                        f"{res['predicted_throughput_rps']:.2f}), plan {len(plan.stages)} "
                        f"stage(s) on {sorted(used)}, load {load_1m:.1f}",
                        flush=True,
                    )

        asyncio.run(go())
    finally:
        bed.down()
    return rows


def summarise(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Per size: throughput, predicted, error, speed-up vs 1 and step ratio; then the targets."""
    by_run = {
        run: {r["devices"]: r for r in rows if r["run"] == run} for run in {r["run"] for r in rows}
    }
    sizes: list[dict[str, Any]] = []
    for n in range(1, steps + 1):
        here = [r for r in rows if r["devices"] == n]
        speedups = [
            sweep_rows[n]["measured"]["throughput_rps"]
            / sweep_rows[1]["measured"]["throughput_rps"]
            for sweep_rows in by_run.values()
            if n in sweep_rows and 1 in sweep_rows
        ]
        steps_up = [
            sweep_rows[n]["measured"]["throughput_rps"]
            / sweep_rows[n - 1]["measured"]["throughput_rps"]
            for sweep_rows in by_run.values()
            if n > 1 and n in sweep_rows and n - 1 in sweep_rows
        ]
        sizes.append(
            {
                "devices": n,
                "stages": sorted({_layout(r["stages"]) for r in here}),
                "throughput_rps": spread([r["measured"]["throughput_rps"] for r in here]),
                "p50_s": spread([r["measured"]["p50_s"] for r in here]),
                "predicted_throughput_rps": spread([r["predicted_throughput_rps"] for r in here]),
                "prediction_error_pct": spread(
                    [
                        100.0
                        * (r["predicted_throughput_rps"] - r["measured"]["throughput_rps"])
                        / r["measured"]["throughput_rps"]
                        for r in here
                    ]
                ),
                "speedup_vs_one": spread(speedups),
                "vs_previous": spread(steps_up),
            }
        )
    medians = [s["throughput_rps"]["median"] for s in sizes]
    monotonic = all(
        a is not None and b is not None and b >= a for a, b in itertools.pairwise(medians)
    )
    worst_step = min((s["vs_previous"]["median"] for s in sizes[1:]), default=None)
    errors = [s["prediction_error_pct"]["median"] for s in sizes]
    worst_error = max((abs(e) for e in errors if e is not None), default=None)
    predicted = [s["predicted_throughput_rps"]["median"] for s in sizes]
    return {
        "sizes": sizes,
        "targets": [
            {
                "target": "throughput never drops as a device joins (medians monotonic)",
                "worst_step_ratio": worst_step,
                "met": monotonic,
                "runs_monotonic": sum(
                    all(
                        sweep_rows[n]["measured"]["throughput_rps"]
                        >= sweep_rows[n - 1]["measured"]["throughput_rps"]
                        for n in range(2, steps + 1)
                        if n in sweep_rows and n - 1 in sweep_rows
                    )
                    for sweep_rows in by_run.values()
                ),
                "runs": len(by_run),
            },
            {
                "target": f"predicted throughput within {PREDICTION_TARGET_PCT:.0f} % of measured "
                "(median) at every size",
                "worst_abs_error_pct": worst_error,
                "met": worst_error is not None and worst_error <= PREDICTION_TARGET_PCT,
            },
        ],
        "predicted_never_lower": all(
            a is not None and b is not None and b >= a * (1 - 1e-9)
            for a, b in itertools.pairwise(predicted)
        ),
    }


def _layout(stages: list[Any]) -> str:
    if len(stages) == 1:
        return f"1 stage x {len(stages[0][2])} agents"
    return f"{len(stages)} stages ({'+'.join(str(len(s[2])) for s in stages)} agents)"


def main(
    quick: bool = False, runs: int | None = None, model: str = "mobilenetv2"
) -> dict[str, Any]:
    runs = runs or (1 if quick else RUNS)
    steps = 2 if quick else 4
    started = time.perf_counter()
    load_before = list(load_average())
    rows: list[dict[str, Any]] = []
    for run in range(runs):
        rows += sweep(run, steps, model, quick)
    summary = summarise(rows, steps)
    name = "scaling-quick" if quick else "scaling"
    result: dict[str, Any] = {
        "quick": quick,
        "runs": runs,
        "model": model,
        "elapsed_s": time.perf_counter() - started,
        "load_avg_before_1_5_15": load_before,
        "load_1m_during": spread([r["load_1m"] for r in rows]),
        "rows": rows,
        **summary,
    }
    path = write_result(name, result)
    print(f"median (min-max) of {runs} run(s){' -- quick: one run' if runs == 1 else ''}:")
    for s in summary["sizes"]:
        t, x = s["throughput_rps"], s["speedup_vs_one"]
        print(
            f"{s['devices']} device(s): {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f}) req/s, "
            f"x{x['median']:.2f} vs one, predicted {s['predicted_throughput_rps']['median']:.2f}"
            f" ({s['prediction_error_pct']['median']:+.0f} %)"
        )
    for t in summary["targets"]:
        print(f"target: {t['target']}: {'MET' if t['met'] else 'MISSED'}")
    _chart(summary["sizes"], name)
    print(f"wrote {path} ({result['elapsed_s'] / 60:.1f} min)")
    return result


def _chart(sizes: list[dict[str, Any]], name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [s["devices"] for s in sizes]
    med = [s["throughput_rps"]["median"] for s in sizes]
    low = [m - s["throughput_rps"]["min"] for m, s in zip(med, sizes, strict=True)]
    high = [s["throughput_rps"]["max"] - m for m, s in zip(med, sizes, strict=True)]
    ax.errorbar(xs, med, yerr=[low, high], fmt="o-", capsize=3, label="measured (median, min-max)")
    ax.plot(xs, [s["predicted_throughput_rps"]["median"] for s in sizes], "s:", label="predicted")
    ax.plot(xs, [med[0] * x for x in xs], "--", label="linear")
    ax.set_xlabel("emulated rpi4-4gb devices")
    ax.set_ylabel("throughput (req/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(results_dir() / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
