"""Planner + agents + client on a real broker: partitioned outputs equal the whole model's."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.planner.modelspec import load_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BRANCHY = f"{ROOT / 'examples' / 'branchy_model.py'}:build"
FAST = ("--calibrate-seconds", "0.1")
AGENTS = (("pi5", "rpi5-8gb"), ("pi4", "rpi4-4gb"), ("nano", "jetson-nano"))


def _expected(spec: str) -> tuple[str, tuple[torch.Tensor, ...], list[torch.Tensor]]:
    loaded = load_model(spec)
    with torch.inference_mode():
        out = loaded.module(*loaded.example_inputs)
    return loaded.name, loaded.example_inputs, list(torch.utils._pytree.tree_leaves(out))


async def _infer_all(
    url: str,
    namespace: str,
    model: str,
    inputs: tuple[torch.Tensor, ...],
    count: int,
    newer_than: int = 0,
) -> list:  # type: ignore[type-arg]
    settings = parse_broker_url(url, namespace)
    async with InferenceClient(settings, model) as client:
        await client.wait_ready(180, newer_than=newer_than)
        return list(
            await asyncio.gather(*(client.infer(inputs, timeout=120) for _ in range(count)))
        )


@pytest.fixture(scope="module")
def shared_fleet(broker, tmp_path_factory) -> Iterator[LocalFleet]:  # type: ignore[no-untyped-def]
    namespace = "inf" + os.urandom(4).hex()
    with LocalFleet(broker.url, namespace, str(tmp_path_factory.mktemp("fleet"))) as fleet:
        for agent_id, profile in AGENTS:
            fleet.start_agent(AgentSpec(agent_id, profile, FAST))
        yield fleet


@pytest.mark.parametrize("spec", ["mobilenetv2", "resnet18", "transformer", BRANCHY])
def test_partitioned_outputs_equal_the_whole_model(shared_fleet: LocalFleet, spec: str) -> None:
    name, inputs, expected = _expected(spec)
    fleet = shared_fleet
    fleet.start_planner(
        spec,
        [
            "--min-agents",
            "3",
            "--replan-delay",
            "1",
            "--max-stages",
            "3",
            "--objective",
            "latency" if spec == "resnet18" else "throughput",
        ],
    )
    try:
        results = asyncio.run(_infer_all(fleet.broker_url, fleet.namespace, name, inputs, 3))
    except Exception:
        print(fleet.log_tail("planner"))
        raise
    finally:
        assert fleet.stop("planner") == 0
    for res in results:
        assert len(res.outputs) == len(expected)
        for got, want in zip(res.outputs, expected, strict=True):
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
        # every stage reported where its time went
        assert [t["stage"] for t in res.timings] == list(range(len(res.route)))
        assert all(t["compute_s"] > 0 for t in res.timings)


def test_sixteen_concurrent_requests_complete(shared_fleet: LocalFleet) -> None:
    name, inputs, expected = _expected("mobilenetv2")
    fleet = shared_fleet
    fleet.start_planner(
        "mobilenetv2", ["--min-agents", "3", "--replan-delay", "1", "--objective", "throughput"]
    )
    try:
        results = asyncio.run(_infer_all(fleet.broker_url, fleet.namespace, name, inputs, 16))
    finally:
        fleet.stop("planner")
    assert len(results) == 16
    assert len({r.request_id for r in results}) == 16
    assert all(torch.allclose(r.outputs[0], expected[0], rtol=1e-4, atol=1e-4) for r in results)
    used = {agent for r in results for agent in r.route}
    assert len(used) >= 2  # replicas or stages spread the work


def test_memory_limits_and_a_joining_agent_gets_a_new_plan(fleet: LocalFleet) -> None:
    name, inputs, expected = _expected("mobilenetv2")
    budget_mib = 2
    fleet.start_agent(AgentSpec("big", "rpi5-8gb", FAST))
    fleet.start_agent(AgentSpec("tiny", "rpi3b", (*FAST, "--memory-mb", str(budget_mib))))
    fleet.start_planner(
        "mobilenetv2", ["--min-agents", "2", "--replan-delay", "1", "--objective", "throughput"]
    )
    settings = parse_broker_url(fleet.broker_url, fleet.namespace)

    async def scenario() -> tuple:  # type: ignore[type-arg]
        async with InferenceClient(settings, name) as client:
            first = await client.wait_ready(180)
            before = await client.infer(inputs, timeout=120)
            fleet.start_agent(AgentSpec("joiner", "rpi4-8gb", FAST))
            deadline = time.monotonic() + 180
            while True:
                second = await client.wait_ready(180, newer_than=first.plan_version)
                if any("joiner" in s.agents for s in second.stages):
                    break
                assert time.monotonic() < deadline, "joiner never used"
                first = second
            after = await client.infer(inputs, timeout=120)
            return first, before, second, after

    first, before, second, after = asyncio.run(scenario())
    for plan in (first, second):
        for stage in plan.stages:
            if "tiny" in stage.agents:  # only what fits 2 MiB may go to the tiny agent
                assert stage.param_bytes <= budget_mib * 2**20
    assert sum(s.param_bytes for s in second.stages) > budget_mib * 2**20  # the limit bites
    assert second.plan_version > first.plan_version or "joiner" in str(first.stages)
    for res in (before, after):
        assert torch.allclose(res.outputs[0], expected[0], rtol=1e-4, atol=1e-4)
