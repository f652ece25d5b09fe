"""Emulation fidelity: do emulated agents run at their profiles' rates, alone and under load?

For each ``--emulate-mode`` (paced, quota) and each run (median of ``runs``, min-max):
one shared broker and, per profile (rpi5-8gb 25, rpi4-4gb 10, rpi3b 3, jetson-nano 8
GFLOP/s), one testbed namespace holding one emulated agent (no link shaping) and its own
planner serving MobileNetV2 as a single stage (``--max-stages 1``), so every request runs
the whole model on that agent. Agents start one after the other and announce their
calibration rate; then, per profile:

* ``rate``: announced ``info.gflops`` / the profile's GFLOP/s;
* ``stage_1``: the stage's compute time at one request in flight, as the device reports it
  in the request's timings, compared with the time the profile's board would need:
  ``expected = host single-thread CPU time of the model x host core GFLOP/s / profile
  GFLOP/s`` (the host time is measured in this process, on a worker thread, before any
  agent starts; eager MobileNetV2, where the agents run its torch.export program: the two
  take the same time here). ``stage_ratio = expected /
  measured`` (1.0 = the board's speed; > 1 = faster than the board: flattering);
* ``stage_load``: the same with ``in_flight`` requests queued on this agent while another
  profile's agent is loaded at the same time (two agents sharing this host's cores).

Figures on a small shared host are noisy: the load average before and after each run is
in the JSON, next to the machine description.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgeslice.benchmarks.common import write_result
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.firmware_profiles import load_profile
from edgeslice.lab.testbed import Testbed, parse_fleet, wait_for_agents

MODEL = "mobilenetv2"
PROFILES = ("rpi5-8gb", "rpi4-4gb", "rpi3b", "jetson-nano")
MODES = ("paced", "quota")


def host_stage_cpu_s(model: str = MODEL, repeats: int = 15) -> float:
    """Median thread CPU seconds of one forward pass on one host thread.

    Measured on a worker thread, as agents run stages (on this host MobileNetV2 costs ~20 ms
    of CPU on a process's main thread but ~15 ms on another thread; the calibration kernel
    runs at the same rate on both).
    """
    import torch

    from edgeslice.planner.modelspec import load_model

    loaded = load_model(model)

    def measure() -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for _ in range(3):
                    loaded.module(*loaded.example_inputs)
                times = []
                for _ in range(repeats):
                    start = time.thread_time()
                    loaded.module(*loaded.example_inputs)
                    times.append(time.thread_time() - start)
        finally:
            torch.set_num_threads(previous)
        return statistics.median(times)

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(measure).result()


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


async def _stage_times(bed: Testbed, requests: int, in_flight: int) -> list[float]:
    """The agent's reported compute seconds for ``requests`` requests, ``in_flight`` at once."""
    from edgeslice.planner.modelspec import load_model

    inputs = load_model(MODEL).example_inputs
    settings = parse_broker_url(bed.broker_url, bed.spec.namespace)
    async with InferenceClient(settings, MODEL) as client:
        await client.wait_ready(300)
        await client.infer(inputs, timeout=300)  # warm-up: the first run of the stage
        times: list[float] = []
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                issued += 1
                result = await client.infer(inputs, timeout=300)
                times.extend(float(t["compute_s"]) for t in result.timings)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return times


def one_run(
    mode: str, profiles: tuple[str, ...], requests: int, in_flight: int, host_cpu_s: float
) -> dict[str, Any]:
    """Start one agent per profile in ``mode``, measure rates and stage times, stop all."""
    beds: dict[str, Testbed] = {}
    load_before = os.getloadavg()
    rows: dict[str, Any] = {}
    try:
        for profile in profiles:  # one after the other: each calibrates without the others
            first = next(iter(beds.values()), None)
            fleet: dict[str, Any] = {
                "namespace": f"emu-{mode}-{profile}",
                "emulate_mode": mode,
                "agents": [{"profile": profile, "link": "none"}],
            }
            if first is not None:  # one broker for all: the first testbed's
                fleet["broker"] = first.broker_url
            spec = parse_fleet(fleet, f"emulation-{profile}")
            bed = Testbed(spec, tempfile.mkdtemp(prefix=f"edgeslice-bench-emu-{profile}-")).up()
            beds[profile] = bed
            (info,) = asyncio.run(
                wait_for_agents(bed.broker_url, spec.namespace, bed.agents, 180)
            ).values()
            gflops = load_profile(profile).gflops_fp32
            host_core = float(info.limits.get("host_core_gflops", 0.0) or 0.0)
            rows[profile] = {
                "profile_gflops": gflops,
                "announced_gflops": round(info.gflops, 3),
                "rate": info.gflops / gflops,
                "emulated": info.emulated,
                "limits_mode": info.limits.get("mode"),
                "host_core_gflops": host_core,
                "expected_stage_s": host_cpu_s * host_core / gflops,
            }
        for bed in beds.values():
            assert bed.fleet is not None
            bed.fleet.start_planner(MODEL, ["--max-stages", "1", "--min-agents", "1"])
        for profile, bed in beds.items():  # one request in flight, one agent busy at a time
            times = asyncio.run(_stage_times(bed, requests, 1))
            rows[profile]["stage_1_s"] = statistics.median(times)
        pairs = [profiles[i : i + 2] for i in range(0, len(profiles), 2)]
        for pair in pairs:  # two agents loaded at once, ``in_flight`` queued on each

            async def loaded(pair: tuple[str, ...] = pair) -> list[list[float]]:
                return list(
                    await asyncio.gather(
                        *(_stage_times(beds[p], requests + in_flight, in_flight) for p in pair)
                    )
                )

            for profile, times in zip(pair, asyncio.run(loaded()), strict=True):
                rows[profile]["stage_load_s"] = statistics.median(times)
        for row in rows.values():
            for key in ("stage_1", "stage_load"):
                row[f"{key}_ratio"] = row["expected_stage_s"] / row[f"{key}_s"]
    finally:
        for bed in reversed(list(beds.values())):  # the broker's testbed last
            bed.down()
    return {"mode": mode, "load_before": load_before, "load_after": os.getloadavg(), **rows}


PAIRS = (("rpi5-8gb", "rpi4-4gb"), ("rpi4-4gb", "rpi3b"), ("rpi5-8gb", "jetson-nano"))


def summarise(runs: list[dict[str, Any]], profiles: tuple[str, ...]) -> dict[str, Any]:
    """Per mode and profile: median and min-max of each ratio over the runs; per pair of
    profiles, their measured stage-time ratio next to their profiles' rate ratio (this one
    needs no yardstick: the host time of the model cancels out)."""
    table: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        rows: dict[str, Any] = {
            p: {
                key: _spread([r[p][key] for r in mine])
                for key in ("rate", "stage_1_ratio", "stage_load_ratio", "stage_1_s")
            }
            for p in profiles
        }
        for fast, slow in PAIRS:
            if fast in profiles and slow in profiles:
                rows[f"{slow}/{fast}"] = {
                    "profiles": round(
                        load_profile(fast).gflops_fp32 / load_profile(slow).gflops_fp32, 3
                    ),
                    **{
                        key: _spread([r[slow][f"{key}_s"] / r[fast][f"{key}_s"] for r in mine])
                        for key in ("stage_1", "stage_load")
                    },
                }
        table[mode] = rows
    return table


def main(quick: bool = False, runs: int = 3) -> dict[str, Any]:
    profiles = PROFILES[:2] if quick else PROFILES
    runs = 1 if quick else runs
    requests, in_flight = (4, 2) if quick else (8, 4)
    host_cpu_s = host_stage_cpu_s()
    print(f"{MODEL}: {host_cpu_s * 1e3:.1f} ms of one host core per request", flush=True)
    all_runs: list[dict[str, Any]] = []
    for n in range(runs):
        for mode in MODES:
            run = one_run(mode, profiles, requests, in_flight, host_cpu_s)
            all_runs.append(run)
            for p in profiles:
                r = run[p]
                print(
                    f"run {n + 1} {mode:<6} {p:<12} rate x{r['rate']:.2f}  stage "
                    f"{r['stage_1_s'] * 1e3:.0f} ms (x{r['stage_1_ratio']:.2f} of the board's "
                    f"speed), loaded x{r['stage_load_ratio']:.2f}  "
                    f"[load {run['load_before'][0]:.2f}]",
                    flush=True,
                )
    summary = summarise(all_runs, profiles)
    for mode, rows in summary.items():
        for p, s in rows.items():
            if "/" in p:
                print(
                    f"{mode:<6} stage time {p:<22} profiles {s['profiles']:.2f}  measured "
                    f"{s['stage_1']['median']:.2f} ({s['stage_1']['min']:.2f}-"
                    f"{s['stage_1']['max']:.2f}), loaded {s['stage_load']['median']:.2f}"
                )
                continue
            print(
                f"{mode:<6} {p:<12} rate {s['rate']['median']:.2f} "
                f"({s['rate']['min']:.2f}-{s['rate']['max']:.2f})  stage@1 "
                f"{s['stage_1_ratio']['median']:.2f} ({s['stage_1_ratio']['min']:.2f}-"
                f"{s['stage_1_ratio']['max']:.2f})  stage@load "
                f"{s['stage_load_ratio']['median']:.2f} ({s['stage_load_ratio']['min']:.2f}-"
                f"{s['stage_load_ratio']['max']:.2f})"
            )
    result: dict[str, Any] = {
        "quick": quick,
        "model": MODEL,
        "host_stage_cpu_s": host_cpu_s,
        "requests": requests,
        "in_flight": in_flight,
        "ratios": "measured / profile: rate = announced GFLOP/s / profile GFLOP/s; "
        "stage ratio = the board's expected stage time / measured (1 = faithful, > 1 = faster "
        "than the board)",
        "summary": summary,
        "runs": all_runs,
        "load_average_end": os.getloadavg(),
    }
    path = write_result("emulation-quick" if quick else "emulation", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
