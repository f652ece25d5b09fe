"""``edgeslice demo``: broker + planner + emulated agents + a partitioned model, on one machine.

Everything runs as real processes (the same CLI a user runs), the requests go through the
broker as chunked activations, every output is checked against the model run whole with
``torch.allclose``, and the figures printed (latency, throughput, per-stage times, bytes
between stages) are measured in this run next to the whole model run in this process with
the same torch thread count as each agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

import click

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.settings import BrokerSettings, parse_broker_url
from edgeslice.lab.fleet import AgentSpec, LocalFleet

DEMO_PROFILES = ("rpi5-8gb", "rpi4-4gb", "jetson-nano", "rpi4-8gb", "rpi5-4gb", "rpi3b")


@dataclass(frozen=True)
class DemoOptions:
    model: str = "mobilenetv2"
    agents: int = 3
    requests: int = 32
    concurrency: int = 4
    objective: str = "throughput"
    broker_url: str | None = None
    timeout_s: float = 240.0
    threads: int = 1


def _say(text: str) -> None:
    click.echo(text, err=False)


async def _run_requests(
    settings: BrokerSettings,
    model_name: str,
    inputs: tuple[Any, ...],
    expected: list[Any],
    opts: DemoOptions,
) -> dict[str, Any]:
    import torch

    from edgeslice.client.inference import InferenceClient

    async with InferenceClient(settings, model_name) as client:
        plan = await client.wait_ready(opts.timeout_s)
        _say(f"plan v{plan.plan_version} ready ({plan.objective}); warming up")
        await client.infer(inputs, timeout=60)  # warm-up: first run of each stage
        single = []
        for _ in range(min(8, opts.requests)):
            single.append((await client.infer(inputs, timeout=60)).latency_s)
        sem = asyncio.Semaphore(opts.concurrency)
        results = []
        mismatches = 0

        async def one() -> None:
            nonlocal mismatches
            async with sem:
                res = await client.infer(inputs, timeout=60)
            ok = all(
                torch.allclose(a, b, rtol=1e-4, atol=1e-4)
                for a, b in zip(res.outputs, expected, strict=True)
            )
            mismatches += 0 if ok else 1
            results.append(res)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(opts.requests)))
        elapsed = time.perf_counter() - start
        return {
            "plan": plan,
            "single": single,
            "results": results,
            "elapsed": elapsed,
            "mismatches": mismatches,
        }


def _whole_model(module: Any, inputs: tuple[Any, ...], threads: int, n: int) -> dict[str, float]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            module(*inputs)  # warm-up, like the fleet's
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                module(*inputs)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {"p50_s": statistics.median(times), "throughput_rps": n / sum(times)}


def _reference_outputs(opts: DemoOptions, loaded: Any) -> list[Any]:
    """The whole model's outputs on its example input: what every fleet output must equal."""
    import torch

    try:
        with torch.inference_mode():
            out = loaded.module(*loaded.example_inputs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"model {opts.model!r}: forward() on its example input raised "
            f"{type(exc).__name__}: {first}; fix the model or its example input "
            "(`edgeslice profile --model ...` checks it without a fleet)"
        ) from exc
    return list(torch.utils._pytree.tree_leaves(out))


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt()


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_demo(opts: DemoOptions) -> int:
    """Run the demo; 0 when every output matched the whole model, else 1.

    The model spec is loaded and checked before anything is started (a bad spec is a
    :class:`ConfigError`). Everything started lives in one temporary folder (logs, agent
    caches, the fleet key), removed when the demo ends, also on error, Ctrl-C or SIGTERM.
    """
    from edgeslice.planner.modelspec import load_model

    started = time.perf_counter()
    loaded = load_model(opts.model)
    expected = _reference_outputs(opts, loaded)
    in_main = threading.current_thread() is threading.main_thread()
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    workdir = tempfile.mkdtemp(prefix="edgeslice-demo-")
    try:
        out = _run_fleet(opts, loaded, expected, workdir)
    finally:
        with _uninterrupted():  # a second Ctrl-C must not leave the fleet key behind
            shutil.rmtree(workdir, ignore_errors=True)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    whole = _whole_model(loaded.module, loaded.example_inputs, opts.threads, 16)
    _report(out, whole, opts)
    _say(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0 if out["mismatches"] == 0 else 1


def _run_fleet(opts: DemoOptions, loaded: Any, expected: list[Any], workdir: str) -> dict[str, Any]:
    """Start broker (unless given), planner and agents in ``workdir``; run the requests."""
    from edgeslice.lab.server import LocalBroker

    broker = None
    fleet = None
    try:
        if opts.broker_url is None:
            broker = LocalBroker(port=0).start()
            url = broker.url
            _say(f"broker: {broker.kind} on {url}")
        else:
            url = opts.broker_url
        namespace = f"demo{int(time.time()) % 100000}"
        settings = parse_broker_url(url, namespace)
        fleet = LocalFleet(url, namespace, workdir=workdir, threads_per_agent=opts.threads)
        fleet.start_planner(
            opts.model, ["--objective", opts.objective, "--min-agents", str(opts.agents)]
        )
        for i in range(opts.agents):
            profile = DEMO_PROFILES[i % len(DEMO_PROFILES)]
            fleet.start_agent(
                AgentSpec(f"{profile}-{i + 1}", profile, ("--calibrate-seconds", "0.2"))
            )
        _say(
            f"started planner and {opts.agents} agents (logs in {workdir}, removed at the "
            "end); waiting for the plan..."
        )
        return asyncio.run(
            _run_requests(settings, loaded.name, loaded.example_inputs, expected, opts)
        )
    except Exception as exc:
        for name in fleet.procs if fleet is not None else ():
            tail = fleet.log_tail(name, 8) if fleet is not None else ""
            if tail:
                _say(f"--- {name} log tail ---\n{tail}")
        raise click.ClickException(f"demo failed: {exc}") from None
    finally:
        with _uninterrupted():  # a second Ctrl-C must not leave processes behind
            if fleet is not None:
                fleet.close()
            if broker is not None:
                broker.stop()


def _report(out: dict[str, Any], whole: dict[str, float], opts: DemoOptions) -> None:
    plan = out["plan"]
    results = out["results"]
    per_stage: dict[int, dict[str, list[float]]] = {}
    for res in results:
        for t in res.timings:
            d = per_stage.setdefault(int(t["stage"]), {"compute": [], "queue": [], "transfer": []})
            d["compute"].append(t["compute_s"])
            d["queue"].append(t["queue_s"])
            d["transfer"].append(t.get("transfer_s", 0.0) + t.get("recv_s", 0.0))
    _say(f"\nplan for {plan.model} (v{plan.plan_version}, objective {plan.objective}):")
    _say(
        f"{'stage':>5}  {'agents':<28} {'segments':>9} {'pred ms':>8} {'meas ms':>8} "
        f"{'queue ms':>8} {'in ms':>7} {'out bytes':>10}"
    )
    for s in plan.stages:
        d = per_stage.get(s.stage, {"compute": [0.0], "queue": [0.0], "transfer": [0.0]})
        _say(
            f"{s.stage:>5}  {','.join(s.agents)[:28]:<28} {s.start_segment:>4}-{s.end_segment:<4} "
            f"{s.predicted_compute_s * 1e3:8.1f} {statistics.median(d['compute']) * 1e3:8.1f} "
            f"{statistics.median(d['queue']) * 1e3:8.1f} "
            f"{statistics.median(d['transfer']) * 1e3:7.1f} {s.out_bytes:>10}"
        )
    p50 = statistics.median(out["single"])
    thr = len(results) / out["elapsed"]
    _say(
        f"\noutputs equal to the whole model (allclose): "
        f"{len(results) - out['mismatches']}/{len(results)}"
    )
    _say(
        f"latency, one request in flight: p50 {p50 * 1e3:.1f} ms "
        f"(whole model in one process, {opts.threads} thread(s): {whole['p50_s'] * 1e3:.1f} ms)"
    )
    ratio = thr / whole["throughput_rps"]
    _say(
        f"throughput, {opts.concurrency} in flight: {thr:.1f} req/s "
        f"(whole model: {whole['throughput_rps']:.1f} req/s; ratio {ratio:.2f})"
    )
