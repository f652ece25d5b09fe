"""Scaling: edgeslice's throughput as one fleet grows 1 -> 2 -> 3 -> 4 emulated devices.

One planner (objective throughput) and one client stay up; an emulated rpi4-4gb joins at
each step, the planner re-plans, and throughput at saturation is measured on the new plan.
The issue's target: adding a device never lowers throughput.

This is the planner service's own path (``edgeslice planner`` as a process): each re-plan
starts from the plan being served (``plan_partition(baseline=...)``), which keeps it
unless a new plan beats it by more than the measured prediction error
(:mod:`planner.margin`), so the *predicted* throughput never drops as devices join;
``predicted_never_lower`` checks that, ``met`` checks the measurement.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from typing import Any

from edgeslice.benchmarks.common import write_result
from edgeslice.benchmarks.fleetbench import measure_plan
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.testbed import Testbed, TestbedAgent, parse_fleet


def main(quick: bool = False, model: str = "mobilenetv2") -> dict[str, Any]:
    from edgeslice.planner.modelspec import load_model

    steps = 2 if quick else 4
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
                    if n > 1:
                        bed.add_agent(
                            TestbedAgent(
                                f"rpi4-4gb-{n}", template.profile, template.link, template.emulate
                            )
                        )
                    while True:  # the plan that knows every device started so far
                        plan = await client.wait_ready(300, newer_than=version)
                        version = plan.plan_version
                        used = {a for s in plan.stages for a in s.agents}
                        if len(used) >= n or n == 1:
                            break
                    res = await measure_plan(
                        client, plan, inputs, 4, 8 if quick else 24, in_flight=2 * n
                    )
                    rows.append({"devices": n, "used": sorted(used), **res})
                    print(
                        f"{n} device(s): {res['measured']['throughput_rps']:.2f} req/s, "
                        f"plan {len(plan.stages)} stage(s) on {sorted(used)}",
                        flush=True,
                    )

        asyncio.run(go())
    finally:
        bed.down()
    thr = [r["measured"]["throughput_rps"] for r in rows]
    never_lower = all(b >= a * 0.95 for a, b in itertools.pairwise(thr))
    predicted = [r["predicted_throughput_rps"] for r in rows]
    predicted_never_lower = all(b >= a * (1 - 1e-9) for a, b in itertools.pairwise(predicted))
    speedup = [t / thr[0] for t in thr]
    result: dict[str, Any] = {
        "quick": quick,
        "model": model,
        "rows": rows,
        "speedup_vs_one": speedup,
        "target": "adding a device never lowers throughput (5 % noise allowance)",
        "met": never_lower,
        "predicted_never_lower": predicted_never_lower,
    }
    path = write_result("scaling-quick" if quick else "scaling", result)
    print(
        f"speed-up vs one device: {[round(x, 2) for x in speedup]}; "
        f"never lower: {never_lower} (predicted: {predicted_never_lower}); wrote {path}"
    )
    _chart(rows, "scaling-quick" if quick else "scaling")
    return result


def _chart(rows: list[dict[str, Any]], name: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from edgeslice.benchmarks.common import results_dir

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["devices"] for r in rows]
    ax.plot(xs, [r["measured"]["throughput_rps"] for r in rows], "o-", label="measured")
    ax.plot(
        xs,
        [
            r["measured"]["throughput_rps"] and rows[0]["measured"]["throughput_rps"] * x
            for r, x in zip(rows, xs, strict=True)
        ],
        "--",
        label="linear",
    )
    ax.set_xlabel("emulated rpi4-4gb devices")
    ax.set_ylabel("throughput (req/s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(results_dir() / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
