"""Dynamic batching's gain per model: one agent, the whole model as one stage, 8 in flight.

For MobileNetV2, ResNet-18 and the transformer: one agent on this host (not emulated, a
fixed torch thread count) runs the whole model as a single stage (planner ``--strategy
monolithic``, so this *is* the monolithic baseline the strategies benchmark compares
against: it runs through the same agent data plane, and batches the same way). A closed
loop keeps ``in_flight`` requests outstanding; throughput is requests / wall time.

Batching ``off`` is the agent started with ``--max-batch 1``, ``on`` with ``--max-batch
8`` (``--max-batch-wait-ms`` at its default); everything else is the same: thread count,
warm-up (two rounds of ``in_flight`` requests), request count. Each run starts a fresh
broker + agent per setting and alternates off/on so that drift in the host's load hits
both; the JSON keeps every run's figures, the batch sizes the agent reported in the
requests' timings, and the load average before and after each run. Reported: median of
``runs`` with min-max, and the gain (median on / median off).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

from edgeslice.benchmarks.common import load_average, write_result
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.testbed import Testbed, parse_fleet, wait_for_agents

MODELS = ("mobilenetv2", "resnet18", "transformer")
SETTINGS = {"off": 1, "on": 8}  # --max-batch


async def _measure(bed: Testbed, model: str, requests: int, in_flight: int) -> dict[str, Any]:
    from edgeslice.planner.modelspec import load_model

    inputs = load_model(model).example_inputs
    settings = parse_broker_url(bed.broker_url, bed.spec.namespace)
    async with InferenceClient(settings, model) as client:
        plan = await client.wait_ready(300)
        while plan.model != model or plan.strategy != "monolithic":
            plan = await client.wait_ready(300, other_than=plan.plan_id)
        for _ in range(2):  # warm-up
            await asyncio.gather(*(client.infer(inputs, timeout=300) for _ in range(in_flight)))
        batches: list[int] = []
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                result = await client.infer(inputs, timeout=300)
                batches.extend(int(t.get("batch", 1)) for t in result.timings)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - start
    return {
        "throughput_rps": requests / elapsed,
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
        "max_batch_seen": max(batches, default=0),
        "stages": len(plan.stages),
    }


def one_setting(
    label: str, models: tuple[str, ...], requests: int, in_flight: int, threads: int
) -> dict[str, Any]:
    """Broker + one agent with ``--max-batch SETTINGS[label]``; each model measured in turn."""
    os.environ["EDGESLICE_MAX_BATCH"] = str(SETTINGS[label])  # the agent reads its env
    os.environ["EDGESLICE_THREADS"] = str(threads)
    spec = parse_fleet(
        {
            "namespace": f"bench-batch-{label}",
            "agents": [{"profile": "x86-laptop", "emulate": False}],
        },
        f"batching-{label}",
    )
    bed = Testbed(spec, tempfile.mkdtemp(prefix=f"edgeslice-bench-batch-{label}-")).up()
    out: dict[str, Any] = {"load_before": list(load_average())}
    try:
        infos = asyncio.run(wait_for_agents(bed.broker_url, spec.namespace, bed.agents, 180))
        info = next(iter(infos.values()))
        out["agent"] = {
            "gflops": info.gflops,
            "threads": info.threads,
            "max_batch": info.max_batch,
            "batch_speedup": [list(p) for p in info.batch_speedup],
        }
        assert bed.fleet is not None
        for model in models:
            bed.fleet.start_planner(
                model, ["--strategy", "monolithic", "--min-agents", "1", "--replan-delay", "1"]
            )
            try:
                out[model] = asyncio.run(_measure(bed, model, requests, in_flight))
            finally:
                bed.fleet.stop("planner")
            m = out[model]
            print(
                f"  batching {label:<3} {model:<12} {m['throughput_rps']:7.2f} req/s  "
                f"mean batch {m['mean_batch']:.2f}",
                flush=True,
            )
    finally:
        bed.down()
        os.environ.pop("EDGESLICE_MAX_BATCH", None)
        os.environ.pop("EDGESLICE_THREADS", None)
    out["load_after"] = list(load_average())
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], models: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per model: throughput off and on (median, min-max), mean batch, gain of the medians."""
    rows = []
    for model in models:
        row: dict[str, Any] = {"model": model}
        for label in SETTINGS:
            thr = [r[label][model]["throughput_rps"] for r in runs if model in r[label]]
            row[label] = {
                "throughput_rps": _spread(thr),
                "mean_batch": statistics.fmean(r[label][model]["mean_batch"] for r in runs),
            }
        off, on = row["off"]["throughput_rps"], row["on"]["throughput_rps"]
        row["gain"] = on["median"] / off["median"]
        row["gain_per_run"] = [
            r["on"][model]["throughput_rps"] / r["off"][model]["throughput_rps"] for r in runs
        ]
        rows.append(row)
    return rows


def main(quick: bool = False, runs: int = 3) -> dict[str, Any]:
    models = ("mobilenetv2",) if quick else MODELS
    runs = 1 if quick else runs
    requests, in_flight, threads = (16 if quick else 64), 8, 1
    print(
        f"batching: {runs} run(s), {requests} requests, {in_flight} in flight, torch "
        f"threads {threads}, load {load_average()}",
        flush=True,
    )
    results = []
    for i in range(runs):
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        results.append(
            {label: one_setting(label, models, requests, in_flight, threads) for label in order}
        )
    rows = summarise(results, models)
    for row in rows:
        off, on = row["off"]["throughput_rps"], row["on"]["throughput_rps"]
        print(
            f"{row['model']:<12} off {off['median']:6.2f} ({off['min']:.2f}-{off['max']:.2f})  "
            f"on {on['median']:6.2f} ({on['min']:.2f}-{on['max']:.2f}) req/s  "
            f"mean batch {row['on']['mean_batch']:.2f}  gain x{row['gain']:.2f} "
            f"(runs {min(row['gain_per_run']):.2f}-{max(row['gain_per_run']):.2f})"
        )
    name = "batching-quick" if quick else "batching"
    result = {
        "quick": quick,
        "settings": {
            "max_batch": SETTINGS,
            "max_batch_wait_ms": "agent default",
            "requests": requests,
            "in_flight": in_flight,
            "torch_threads": threads,
            "strategy": "monolithic (one stage, one agent)",
        },
        "rows": rows,
        "runs": results,
    }
    path = write_result(name, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
