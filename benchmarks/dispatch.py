"""Dispatch benchmark: the client's own CPU per request, beside the transfer itself.

What :class:`~edgeslice.client.inference.InferenceClient` does for every request before the
first byte is on the wire, for a 1x3x224x224 float32 input (602 KB), with the real pieces:

* **route**: :meth:`Router.choose_route` (``client/scoring.pick_replica`` per stage) on a
  3-stage plan with 2 replicas per stage and telemetry/info known for every agent;
* **pack**: ``pack_tensors`` (the tensor's bytes as a payload, no copy when contiguous);
* **envelope**: a :class:`RequestEnvelope` for that route, as the header's wire map;
* **chunking**: ``stream_transfer`` at 256 KiB chunks, every chunk built (each one is handed
  to paho as it is cut in the client; building them is the client's work, sending them is
  the transfer's).

One run times ``iterations`` whole requests (and each part alone, the same count); the
benchmark reports the median per-request time over ``runs`` runs (>= 3) with min-max, against
a target of 0.5 ms, and the JSON keeps every run and the load average.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from edgeslice.benchmarks.common import load_average, median, write_result
from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import DEFAULT_CHUNK_SIZE, stream_transfer
from edgeslice.broker.protocol.messages import (
    Info,
    PlanMessage,
    PlanStage,
    RequestEnvelope,
    RouteHop,
    Telemetry,
)
from edgeslice.broker.protocol.tensors import pack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.client.routing import Router
from edgeslice.client.scoring import Weights

TARGET_MS = 0.5
RUNS = 5
SHAPE = (1, 3, 224, 224)


def _fleet_and_plan(strategy: str) -> tuple[Router, PlanMessage]:
    topics = Topics("bench")
    fleet = FleetState(topics)
    now = time.time()
    stages = []
    for index in range(3):
        agents = [f"pi-{index}-{replica}" for replica in range(2)]
        for agent in agents:
            info = Info(agent_id=agent, profile="rpi4-4gb", link_rtt_s=0.004, gflops=12.0)
            tel = Telemetry(agent_id=agent, ts=now, cpu_percent=40.0, mem_percent=35.0)
            fleet.apply(topics.info(agent), codec.encode(info), now)
            fleet.apply(topics.telemetry(agent), codec.encode(tel), now)
        stages.append(
            PlanStage(
                stage=index,
                start_segment=4 * index,
                end_segment=4 * index + 4,
                agents=agents,
                artifact=f"{index:064x}",
                replica_period_s=[0.05, 0.08],
            )
        )
    plan = PlanMessage(
        model="mobilenetv2",
        plan_id="p" * 16,
        plan_version=3,
        objective="throughput",
        strategy=strategy,
        stages=stages,
        ready=True,
    )
    return Router(fleet, Weights()), plan


def _parts(strategy: str) -> dict[str, Callable[[], object]]:
    """Each part of one request's dispatch as a no-argument call, and the whole of it."""
    import torch

    router, plan = _fleet_and_plan(strategy)
    tensor = torch.randn(*SHAPE)
    tensor_meta, payload = pack_tensors([tensor])
    route = router.choose_route(plan)

    def envelope(route: list[str], tensor_meta: list[dict[str, Any]]) -> dict[str, Any]:
        env = RequestEnvelope(
            route=[RouteHop(a, s.artifact) for a, s in zip(route, plan.stages, strict=True)],
            reply_to="bench-client",
            tensors=tensor_meta,
            model=plan.model,
            compression=plan.compression,
            sent_at=time.time(),
        )
        return codec.to_wire(env)

    def chunks(payload: Any, meta: dict[str, Any]) -> int:
        _header, stream = stream_transfer(
            payload,
            request_id=uuid.uuid4().hex,
            kind="request",
            plan_id=plan.plan_id,
            plan_version=plan.plan_version,
            deadline=time.time() + 60.0,
            meta=meta,
            chunk_size=DEFAULT_CHUNK_SIZE,
        )
        return sum(len(chunk) for chunk in stream)

    wire = envelope(route, tensor_meta)

    def whole() -> int:
        request_route = router.choose_route(plan)
        request_meta, request_payload = pack_tensors([tensor])
        return chunks(request_payload, envelope(request_route, request_meta))

    return {
        "route": lambda: router.choose_route(plan),
        "pack": lambda: pack_tensors([tensor]),
        "envelope": lambda: envelope(route, tensor_meta),
        "chunking": lambda: chunks(payload, wire),
        "total": whole,
    }


def _per_call_ms(call: Callable[[], object], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    return (time.perf_counter() - start) / iterations * 1e3


def main(quick: bool = False, runs: int | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table, write results/dispatch.json; returns the result."""
    import torch

    torch.manual_seed(0)
    runs = max(3, runs or (3 if quick else RUNS))
    iterations = 200 if quick else 2000
    parts = _parts("edgeslice")
    for call in parts.values():  # warm-up: lazy imports, allocator, caches
        _per_call_ms(call, 50)
    load_start = load_average()
    done: list[dict[str, Any]] = []
    for index in range(runs):
        run: dict[str, Any] = {"run": index + 1, "load_avg_1m": load_average()[0]}
        run.update({name: _per_call_ms(call, iterations) for name, call in parts.items()})
        done.append(run)
        print(
            f"run {index + 1}/{runs}: total {run['total']:.3f} ms per request ("
            + ", ".join(f"{name} {run[name]:.3f}" for name in parts if name != "total")
            + f"; load {run['load_avg_1m']:.2f})",
            flush=True,
        )
    summary = {
        name: {
            "median_ms": median([r[name] for r in done]),
            "min_ms": min(r[name] for r in done),
            "max_ms": max(r[name] for r in done),
        }
        for name in parts
    }
    total = summary["total"]
    chunk_count = -(-(4 * 3 * 224 * 224) // DEFAULT_CHUNK_SIZE)
    result = {
        "quick": quick,
        "input": {"shape": list(SHAPE), "dtype": "float32", "bytes": 4 * 3 * 224 * 224},
        "chunk_bytes": DEFAULT_CHUNK_SIZE,
        "chunks": chunk_count,
        "route": {"stages": 3, "replicas_per_stage": 2, "strategy": "edgeslice"},
        "iterations_per_run": iterations,
        "runs": runs,
        "target_ms": TARGET_MS,
        "load_avg_start": list(load_start),
        "load_avg_end": list(load_average()),
        "per_request_ms": summary,
        "target_met": total["median_ms"] < TARGET_MS,
        "run_results": done,
    }
    print(
        f"dispatch of a 602 KB input: {total['median_ms']:.3f} ms per request (median of {runs} "
        f"runs x {iterations}; min {total['min_ms']:.3f}, max {total['max_ms']:.3f}); target "
        f"< {TARGET_MS} ms {'met' if result['target_met'] else 'MISSED'}",
        flush=True,
    )
    path = write_result("dispatch-quick" if quick else "dispatch", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
