"""A tiled (intra-layer) plan on a real broker: 3 agent processes and a planner process
serving VGG with ``--intra-layer auto``; outputs equal the whole model's, latency printed
next to the pipeline plan's on the same fleet."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.broker.protocol.pieces import wire_box
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.planner.modelspec import load_model

pytestmark = pytest.mark.integration

SPEC = f"{Path(__file__).resolve()}:build_small_vgg"
FAST = ("--calibrate-seconds", "0.1")
PLANNER = ("--min-agents", "3", "--replan-delay", "1", "--max-segments", "8")
REQUESTS = 6


def build_small_vgg():  # type: ignore[no-untyped-def]
    """The built-in VGG at 96x96: its planes split by rows, its late layers by channels."""
    from edgeslice.planner.models.vgg import build_vgg

    return build_vgg(image_size=96)


@pytest.fixture(scope="module")
def vgg_fleet(broker, tmp_path_factory) -> Iterator[LocalFleet]:  # type: ignore[no-untyped-def]
    namespace = "tile" + os.urandom(4).hex()
    with LocalFleet(broker.url, namespace, str(tmp_path_factory.mktemp("fleet"))) as fleet:
        for agent_id in ("t1", "t2", "t3"):
            fleet.start_agent(AgentSpec(agent_id, "x86-laptop", FAST))
        yield fleet


async def _serve(
    fleet: LocalFleet, model: str, inputs: list[torch.Tensor], other_than: str = ""
) -> tuple[PlanMessage, list]:  # type: ignore[type-arg]
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)
    async with InferenceClient(settings, model) as client:
        plan = await client.wait_ready(120, other_than=other_than)
        await client.infer(inputs[0], timeout=60)  # warm-up: first runs allocate
        results = [await client.infer(x, timeout=60) for x in inputs]  # one at a time
        return plan, results


def _report(label: str, results: list) -> float:  # type: ignore[type-arg]
    """Print p50/max latency and how much of it the slowest tile of each block computed."""
    latencies = sorted(r.latency_s * 1e3 for r in results)
    p50 = statistics.median(latencies)
    computing = []
    for r in results:
        slowest: dict[int, float] = {}
        for t in r.timings:
            slowest[t["stage"]] = max(slowest.get(t["stage"], 0.0), t["compute_s"])
        computing.append(sum(slowest.values()) * 1e3)
    print(
        f"{label}: {len(latencies)} requests, p50 {p50:.1f} ms, max {latencies[-1]:.1f} ms; "
        f"compute on the critical path p50 {statistics.median(computing):.1f} ms"
    )
    return p50


def test_tiled_plan_serves_the_whole_models_outputs(vgg_fleet: LocalFleet) -> None:
    started = time.monotonic()
    loaded = load_model(SPEC)
    torch.manual_seed(1)
    inputs = [torch.randn(loaded.example_inputs[0].shape) for _ in range(REQUESTS)]
    with torch.inference_mode():
        expected = [loaded.module(x) for x in inputs]
    fleet = vgg_fleet
    fleet.start_planner(SPEC, [*PLANNER, "--intra-layer", "auto", "--clear-plan-on-exit"])
    try:
        plan, results = asyncio.run(_serve(fleet, loaded.name, inputs))
    except Exception:
        print(fleet.log_tail("planner", 60))
        raise
    finally:
        fleet.stop("planner")
    splits = {s.tiling for s in plan.stages}
    assert {"inh", "outc"} <= splits, splits
    halo = [
        t
        for s in plan.stages
        if s.tiling == "inh"
        for t in s.tiles
        if wire_box(t.in_box)[1] != wire_box(t.out_box)[1]
    ]
    assert halo, "an inh block whose tiles read no halo rows"
    for got, want in zip(results, expected, strict=True):
        assert torch.allclose(got.outputs[0], want, rtol=1e-4, atol=1e-4)
        assert {t["agent"] for t in got.timings} == {"t1", "t2", "t3"}
    tiled_p50 = _report(f"tiled plan ({len(plan.stages)} blocks: {sorted(splits)})", results)

    # the same fleet and requests on the pipeline planner, for comparison (printed only)
    fleet.start_planner(SPEC, [*PLANNER, "--objective", "latency", "--clear-plan-on-exit"])
    try:
        pipe, piped = asyncio.run(_serve(fleet, loaded.name, inputs, other_than=plan.plan_id))
    finally:
        fleet.stop("planner")
    for got, want in zip(piped, expected, strict=True):
        assert torch.allclose(got.outputs[0], want, rtol=1e-4, atol=1e-4)
    pipe_p50 = _report(f"pipeline plan ({len(pipe.stages)} stages)", piped)
    print(
        f"tiled / pipeline p50: {tiled_p50 / pipe_p50:.2f}; test took "
        f"{time.monotonic() - started:.1f} s"
    )


async def _through_a_kill(
    fleet: LocalFleet, model: str, inputs: list[torch.Tensor], victim: str
) -> tuple[PlanMessage, list, PlanMessage]:  # type: ignore[type-arg]
    """Requests one after another while ``victim`` is killed -9 after the first answer."""
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)
    async with InferenceClient(settings, model) as client:
        plan = await client.wait_ready(120)
        results = [await client.infer(inputs[0], timeout=60)]
        fleet.signal(victim, signal.SIGKILL)
        results += [await client.infer(x, timeout=60) for x in inputs[1:]]
        after = client.plan
        assert after is not None
        return plan, results, after


def test_a_killed_tile_agent_costs_no_request(vgg_fleet: LocalFleet) -> None:
    """kill -9 of a tile's agent: the planner re-plans on the other two at once, requests
    routed through the dead one are re-sent on the new plan; none is lost or wrong."""
    loaded = load_model(SPEC)
    torch.manual_seed(2)
    inputs = [torch.randn(loaded.example_inputs[0].shape) for _ in range(4)]
    with torch.inference_mode():
        expected = [loaded.module(x) for x in inputs]
    fleet = vgg_fleet
    started = time.monotonic()
    fleet.start_planner(SPEC, [*PLANNER, "--intra-layer", "auto", "--clear-plan-on-exit"])
    try:
        before, results, after = asyncio.run(_through_a_kill(fleet, loaded.name, inputs, "t3"))
    except Exception:
        print(fleet.log_tail("planner", 60))
        raise
    finally:
        fleet.stop("planner")
    assert "t3" in {a for s in before.stages for a in s.agents}
    assert after.plan_version > before.plan_version
    assert "t3" not in {a for s in after.stages for a in s.agents}
    for got, want in zip(results, expected, strict=True):
        assert torch.allclose(got.outputs[0], want, rtol=1e-4, atol=1e-4)
    assert {t["agent"] for t in results[-1].timings} == {"t1", "t2"}
    print(
        f"kill -9 of t3: {len(results)} of {len(inputs)} answered, the one after the kill in "
        f"{results[1].latency_s:.1f} s ({results[1].attempts} send(s)); "
        f"test took {time.monotonic() - started:.1f} s"
    )
