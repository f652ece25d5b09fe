"""Single-request latency of intra-layer strategies on emulated fleets, in the same run (issue 11).

Fleets as in :mod:`strategies` (paced emulated agents behind their profiles' links): 4 x
rpi4-4gb and rpi3b + rpi4-4gb + rpi5-8gb + jetson-nano. Per model (mobilenetv2, resnet18,
the VGG-style ``vgg``, transformer) the planner restarts on the same running agents with
each strategy; all are priced by the same cost model, and the tiled ones are plans of the
same DP (planner/intramodes.py) served by the same tiled data plane:

* ``monolithic``: the whole model on the fastest agent (``--strategy monolithic``);
* ``outc`` / ``inh`` / ``grid``: that split for every segment it can split, over all
  agents, an exchange after each; segments it cannot split run whole on one agent;
* ``fixed-fusion``: row (``inh``) splits over blocks of one fixed length (the best length
  by the cost model), FlexPie's fixed-fusion baseline;
* ``pipeline``: edgeslice's pipeline planner for latency (``--objective latency``);
* ``edgeslice-dp``: the combined DP (``--intra-layer dp``): per block whole on one agent
  or any split, fusing up to 8 segments.

Each strategy is planned once per (fleet, model) (strategies in an order rotated from
model to model), warmed up, then measured ``runs`` (3) rounds back to back, each round
``latency_requests`` sequential requests (one in flight): p50/p95, and from the stage
timings every tile reports, per block the predicted vs measured time (the critical tile's
transfer + gather + queue + compute), the bytes each agent sent per request
(``StageTiming.sent_bytes``, measured by the agents), where the time went (compute / queue
on the critical tiles; the rest of the latency is exchange: envelopes, broker rounds, the
client's scatter and gather), and the output's largest difference from the whole model
run here. Re-planning for every run would take too long (:data:`ROUNDS_NOTE`).
Summaries, ratios, targets and the chart: :mod:`intrasummary`.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from edgeslice.benchmarks.common import load_average, rotated, spread, write_result
from edgeslice.benchmarks.intrasummary import (
    MODELS,
    STRATEGIES,
    chart_time,
    compact,
    fmt,
    ratios,
    summarise,
    targets,
)
from edgeslice.benchmarks.strategies import FLEETS, _devices
from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient, InferenceResult
from edgeslice.lab.testbed import Testbed, parse_fleet, wait_for_agents

RUNS = 3
ROUNDS_NOTE = (
    "back-to-back rounds within one plan: each strategy is planned once per (fleet, "
    "model), warmed up, then measured `runs` rounds in a row; strategies follow each other "
    "in an order rotated from model to model. Re-planning every strategy for every run "
    "(168 planner starts, ~30 s each here) would take about 85 min, over the ~45 min the "
    "benchmark may take."
)


@dataclass(frozen=True)
class Load:
    warmup: int = 2  # sequential requests first: every tile's first run
    latency_requests: int = 8  # then these, one in flight


LOAD = Load()
QUICK_LOAD = Load(warmup=1, latency_requests=4)
QUICK_STRATEGIES = ["monolithic", "inh", "edgeslice-dp"]
QUICK_FLEET = {"homogeneous": [{"profile": "rpi4-4gb", "count": 2}]}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def plan_blocks(plan: PlanMessage) -> list[dict[str, Any]]:
    """The served plan's blocks: segments, strategy, tiles (agent + boxes), predictions."""
    out = []
    for s in plan.stages:
        tiled = bool(s.tiles) and any(t.out_box for t in s.tiles)
        tiles = (
            [{"agent": t.agent_id, "in_box": t.in_box, "out_box": t.out_box} for t in s.tiles]
            if s.tiles
            else [{"agent": s.agents[0], "in_box": [], "out_box": []}]
        )
        out.append(
            {
                "stage": s.stage,
                "segments": [s.start_segment, s.end_segment],
                "strategy": s.tiling if tiled else "whole",
                "tiles": tiles,
                "predicted_compute_s": s.predicted_compute_s,
                "predicted_transfer_s": s.predicted_transfer_s,
                "predicted_s": s.predicted_compute_s + s.predicted_transfer_s,
                "predicted_tile_compute_s": list(s.replica_period_s) if tiled else [],
            }
        )
    return out


def _tile_s(t: dict[str, Any]) -> float:
    return float(t["transfer_s"] + t["recv_s"] + t["queue_s"] + t["compute_s"])


def measured_blocks(
    blocks: list[dict[str, Any]], results: list[InferenceResult]
) -> list[dict[str, Any]]:
    """Per block: every tile's median compute, and the block's time (its slowest tile's
    transfer + gather + queue + compute), median over requests, beside the prediction."""
    out = []
    for b in blocks:
        per_request = [[t for t in r.timings if int(t["stage"]) == b["stage"]] for r in results]
        agents = [t["agent"] for t in b["tiles"]]
        seen = [{t["agent"] for t in ts} for ts in per_request]
        block_s = [max(_tile_s(t) for t in ts) for ts in per_request if ts]
        compute = {
            a: statistics.median(
                [t["compute_s"] for ts in per_request for t in ts if t["agent"] == a] or [0.0]
            )
            for a in agents
        }
        whole = b["strategy"] == "whole"  # one tile, on any replica of the stage
        row = {
            "stage": b["stage"],
            "all_tiles_timed": all(bool(got) if whole else set(agents) <= got for got in seen),
            "measured_s": statistics.median(block_s) if block_s else None,
            "measured_tile_compute_s": [compute[a] for a in agents],
            "predicted_s": b["predicted_s"],
        }
        if row["measured_s"]:
            row["error_pct"] = 100.0 * (b["predicted_s"] - row["measured_s"]) / row["measured_s"]
        out.append(row)
    return out


def where_time_goes(results: list[InferenceResult]) -> dict[str, float]:
    """Median per request: compute and queue of each block's slowest tile, summed; the rest
    of the latency is exchange (envelopes, broker rounds, scatter and gather)."""
    comp, queue, exchange = [], [], []
    for r in results:
        stages: dict[int, list[dict[str, Any]]] = {}
        for t in r.timings:
            stages.setdefault(int(t["stage"]), []).append(t)
        critical = [max(ts, key=_tile_s) for ts in stages.values()]
        c = sum(t["compute_s"] for t in critical)
        q = sum(t["queue_s"] for t in critical)
        comp.append(c)
        queue.append(q)
        exchange.append(max(0.0, r.latency_s - c - q))
    return {
        "compute_s": statistics.median(comp),
        "queue_s": statistics.median(queue),
        "exchange_s": statistics.median(exchange),
    }


def sent_bytes(results: list[InferenceResult]) -> dict[str, float]:
    """Per agent: payload bytes it sent per request (median over requests)."""
    per: dict[str, list[int]] = {}
    for r in results:
        mine: dict[str, int] = {}
        for t in r.timings:
            mine[t["agent"]] = mine.get(t["agent"], 0) + int(t.get("sent_bytes", 0))
        for agent, n in mine.items():
            per.setdefault(agent, []).append(n)
    return {a: statistics.median(v) for a, v in sorted(per.items())}


async def measure(
    client: InferenceClient, plan: PlanMessage, inputs: Any, expected: Any, load: Load
) -> dict[str, Any]:
    """One round: ``latency_requests`` sequential requests on the served plan."""
    started = time.perf_counter()
    results = [await client.infer(inputs, timeout=180) for _ in range(load.latency_requests)]
    lat = [r.latency_s for r in results]
    blocks = plan_blocks(plan)
    error = max(float((r.outputs[0] - expected).abs().max()) for r in results)
    return {
        "plan_version": plan.plan_version,
        "blocks": blocks,
        "whole_blocks": [b["segments"] for b in blocks if b["strategy"] == "whole"],
        "predicted_latency_s": plan.predicted_latency_s,
        "measured": {
            "p50_s": statistics.median(lat),
            "p95_s": _pct(lat, 0.95),
            "latencies_s": lat,
            "requests": len(lat),
        },
        "measured_blocks": measured_blocks(blocks, results),
        "time": where_time_goes(results),
        "sent_bytes_per_request": sent_bytes(results),
        "max_abs_error_vs_whole_model": error,
        "measure_s": time.perf_counter() - started,
    }


def run_rounds(
    bed: Testbed,
    model: str,
    args: list[str],
    inputs: Any,
    expected: Any,
    load: Load,
    rounds: int,
    last: str,
) -> list[dict[str, Any]]:
    """Start a planner with ``args`` on the running testbed, warm its plan up, measure
    ``rounds`` rounds back to back, stop it."""
    assert bed.fleet is not None
    started = time.perf_counter()
    # no load shift: a strategy is measured on the plan it made, not a derated re-plan
    common = ["--min-agents", str(len(bed.agents)), "--replan-delay", "1", "--busy-high", "1"]
    bed.fleet.start_planner(model, [*args, *common, "--clear-plan-on-exit"])
    settings = parse_broker_url(bed.broker_url, bed.spec.namespace)

    async def go() -> list[dict[str, Any]]:
        async with InferenceClient(settings, model) as client:
            plan = await client.wait_ready(600, other_than=last)
            ready = time.perf_counter() - started
            for _ in range(load.warmup):
                await client.infer(inputs, timeout=180)
            out = []
            for _ in range(rounds):
                loadavg = load_average()[0]
                one = await measure(client, plan, inputs, expected, load)
                now = client.plan
                replanned = now is None or now.plan_version != plan.plan_version
                out.append(
                    {
                        "plan_id": plan.plan_id,
                        "plan_ready_s": ready,
                        "load_1m": loadavg,
                        "replanned_during_round": replanned,
                        **one,
                    }
                )
            return out

    try:
        return asyncio.run(go())
    except Exception:
        print(bed.fleet.log_tail("planner", 20), flush=True)
        raise
    finally:
        bed.fleet.stop("planner")


def measure_fleet(
    fleet: str,
    entries: list[dict[str, Any]],
    model: str,
    strategies: list[str],
    runs: int,
    load: Load,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Every strategy planned once on one running fleet (in an order rotated by
    ``offset``), then measured ``runs`` rounds back to back (one row per round)."""
    import torch

    from edgeslice.planner.modelspec import load_model

    spec = parse_fleet({"namespace": f"intra-{fleet}", "agents": entries}, fleet)
    bed = Testbed(spec, tempfile.mkdtemp(prefix=f"edgeslice-intra-{fleet}-")).up()
    loaded = load_model(model)
    inputs = loaded.example_inputs
    with torch.inference_mode():
        expected = loaded.module(*inputs)
    rows: list[dict[str, Any]] = []
    last = ""
    try:
        devices = _devices(asyncio.run(wait_for_agents(bed.broker_url, spec.namespace, bed.agents)))
        for position, strategy in enumerate(rotated(strategies, offset)):
            base = {"fleet": fleet, "model": model, "strategy": strategy, "position": position}
            args = STRATEGIES[strategy]
            try:
                done = run_rounds(bed, model, args, inputs, expected, load, runs, last)
            except Exception as exc:  # a strategy that cannot plan or serve is a result
                print(f"  {fleet:<13} {model:<12} {strategy:<13} FAILED: {exc}", flush=True)
                rows.append(
                    {
                        **base,
                        "run": 0,
                        "load_1m": load_average()[0],
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                continue
            last = done[0]["plan_id"]
            for run, res in enumerate(done):
                m, t = res["measured"], res["time"]
                print(
                    f"  {fleet:<13} {model:<12} round {run + 1} {strategy:<13} "
                    f"p50 {m['p50_s'] * 1e3:7.1f} ms "
                    f"(predicted {res['predicted_latency_s'] * 1e3:6.1f})"
                    f"  compute {t['compute_s'] * 1e3:6.1f} exchange {t['exchange_s'] * 1e3:6.1f}"
                    f"  {len(res['blocks'])} blocks  (plan {res['plan_ready_s']:.0f} s, "
                    f"load {res['load_1m']:.1f})",
                    flush=True,
                )
                rows.append({**base, "run": run, "devices": devices, **res})
    finally:
        bed.down()
    return rows


def main(
    quick: bool = False, runs: int | None = None, models: list[str] | None = None
) -> dict[str, Any]:
    """Run the benchmark one model at a time (both fleets), writing the JSON after each."""
    runs = runs or (1 if quick else RUNS)
    fleets = QUICK_FLEET if quick else FLEETS
    models = models or (["vgg"] if quick else MODELS)
    strategies = QUICK_STRATEGIES if quick else list(STRATEGIES)
    load = QUICK_LOAD if quick else LOAD
    started = time.perf_counter()
    load_before = list(load_average())
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for done, model in enumerate(models, start=1):
        for fleet, entries in fleets.items():
            rows += measure_fleet(fleet, entries, model, strategies, runs, load, done - 1)
        result = _write(quick, runs, models, done, strategies, load, started, load_before, rows)
    return result


def _write(
    quick: bool,
    runs: int,
    models: list[str],
    done: int,
    strategies: list[str],
    load: Load,
    started: float,
    load_before: list[float],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    summary = summarise(rows)
    ratio_rows = ratios(rows)
    compacted, plans, devices = compact(rows)
    checked = targets(ratio_rows, quick)
    print(f"\nmedian (min-max) of {runs} run(s):")
    for s in summary:
        print(
            f"{s['fleet']:<13} {s['model']:<12} {s['strategy']:<13} "
            f"p50 {fmt(s['p50_s'], 1e3, 1)} ms  predicted {fmt(s['predicted_latency_s'], 1e3, 1)}"
        )
    for t in checked:
        verdict = "MET" if t["met"] else "MISSED"
        print(f"target {t['fleet']}/{t['model']}: {t['target']}: {fmt(t, 1, 2)} {verdict}")
    name = "intralayer-quick" if quick else "intralayer"
    result: dict[str, Any] = {
        "quick": quick,
        "runs": runs,
        "models": models[:done],
        "all_models": done == len(models),
        "strategies": strategies,
        "strategy_args": {s: STRATEGIES[s] for s in strategies},
        "load": {"warmup": load.warmup, "latency_requests": load.latency_requests},
        "runs_are": ROUNDS_NOTE,
        "elapsed_s": time.perf_counter() - started,
        "load_avg_before_1_5_15": load_before,
        "load_1m_during": spread([r["load_1m"] for r in rows]),
        "rows": compacted,
        "plans": plans,
        "devices": devices,
        "summary": summary,
        "ratios": ratio_rows,
        "targets": checked,
    }
    path = write_result(name, result, indent=None)
    chart_time(name, summary)
    print(f"wrote {path} ({result['elapsed_s'] / 60:.1f} min)", flush=True)
    return result


if __name__ == "__main__":
    main()
