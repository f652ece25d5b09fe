"""Requests end to end in one process: InferenceClient -> agents' data planes -> results.

Written against public behaviour only (plans, assignments, ``infer``), so the request
envelope's wire format can change underneath.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from memfleet import MLP_SPEC, SETTINGS, agent_config, build_mlp, eventually, key_file, running

from edgeslice.agent.runtime import ArtifactCache
from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import InferenceError, NoPlanError
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    PlanMessage,
    PlanStage,
    StageAssignment,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.client.inference import InferenceClient
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.profile import profile_model
from edgeslice.planner.service import PlannerService
from edgeslice.planner.stages import build_stages

T = Topics("unit")


def test_one_stage_request_returns_the_result_and_a_stale_plan_an_error(tmp_path: Path) -> None:
    model, inputs = build_mlp()
    profile = profile_model(model, inputs, max_segments=4)
    bounds = [0, len(profile.segments)]
    (art,) = build_stages(model, inputs, profile, bounds, load_signing_key(key_file(tmp_path)))
    ArtifactCache(tmp_path / "a1" / "artifacts").put(art.sha256, art.data)

    async def scenario() -> None:
        broker = MemoryBroker()
        planner = broker.client("planner")
        await planner.connect()
        agent = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(agent.run):
            stage = StageAssignment(stage=0, artifact=art.sha256, size=art.size)
            desired = AssignmentDesired("a1", "p1", 1, model="mlp", stages=[stage])
            await planner.publish(
                T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True
            )

            def ready() -> bool:
                payload = broker.retained_payload(T.assignment_reported("a1"))
                return bool(payload) and codec.decode(payload, AssignmentReported).state == "ready"

            await eventually(ready, what="stage loaded")
            plan = PlanMessage(
                model="mlp",
                plan_id="p1",
                plan_version=1,
                objective="latency",
                strategy="edgeslice",
                stages=[PlanStage(0, 0, bounds[1], ["a1"], artifact=art.sha256)],
                input_specs=[s.to_wire() for s in art.input_specs],
                ready=True,
            )
            await planner.publish(T.plan("mlp"), codec.encode(plan), qos=1, retain=True)
            async with InferenceClient(SETTINGS, "mlp", transport=broker.factory) as client:
                result = await client.infer(inputs[0], timeout=10.0)
                with torch.no_grad():
                    assert torch.allclose(result.outputs[0], model(*inputs), atol=1e-6)
                assert result.route == ["a1"]
                stale_stage = dataclasses.replace(plan.stages[0], artifact="0" * 64)
                stale = dataclasses.replace(plan, plan_version=2, stages=[stale_stage])
                await planner.publish(T.plan("mlp"), codec.encode(stale), qos=1, retain=True)
                await eventually(lambda: client.plan and client.plan.plan_version == 2)
                with pytest.raises(InferenceError) as caught:
                    # a short deadline: the client waits for a newer plan until then
                    await client.infer(inputs[0], timeout=0.5, retries=0)
                assert caught.value.retryable and "a1" in str(caught.value), repr(caught.value)
                # the same stale plan, but a ready newer plan follows while the request waits:
                # "the plan changed" is not a retry used up; the request waits for the new
                # plan and completes there (a load-shift run lost 4 requests that way)
                pending = asyncio.ensure_future(client.infer(inputs[0], timeout=10.0, retries=0))
                await asyncio.sleep(0.3)
                assert not pending.done()
                fresh = dataclasses.replace(plan, plan_version=3)
                await planner.publish(T.plan("mlp"), codec.encode(fresh), qos=1, retain=True)
                late = await asyncio.wait_for(pending, 10.0)
                assert late.plan_version == 3 and late.attempts >= 2
                with torch.no_grad():
                    assert torch.allclose(late.outputs[0], model(*inputs), atol=1e-6)

    asyncio.run(scenario())


def test_two_agents_and_a_planner_serve_the_whole_model(tmp_path: Path) -> None:
    model, _ = build_mlp()

    async def scenario() -> None:
        broker = MemoryBroker()
        config = PlannerConfig(
            model_spec=MLP_SPEC,
            broker=SETTINGS,
            objective="throughput",
            min_agents=2,
            max_segments=4,
            replan_delay_s=0.05,
            fleet_key_file=key_file(tmp_path),
        )
        planner = PlannerService(config, transport=broker.factory)
        agents = [
            AgentService(agent_config(name, tmp_path), transport=broker.factory)
            for name in ("a1", "a2")
        ]
        async with running(planner.run), running(agents[0].run), running(agents[1].run):
            await eventually(lambda: planner.model_name, what="model loaded")
            async with InferenceClient(
                SETTINGS, planner.model_name, transport=broker.factory
            ) as client:
                await client.wait_ready(timeout=20.0)
                batch = [torch.randn(1, 16) for _ in range(4)]
                results = await asyncio.gather(*(client.infer(x, timeout=20.0) for x in batch))
        with torch.no_grad():
            for x, result in zip(batch, results, strict=True):
                assert torch.allclose(result.outputs[0], model(x), atol=1e-5)
                # every stage says what it sent on: the last one, the result's bytes
                assert all(t["sent_bytes"] > 0 for t in result.timings)
                assert result.timings[-1]["sent_bytes"] == 4 * result.outputs[0].numel()

    asyncio.run(scenario())


def test_in_flight_request_is_resent_on_a_plan_change_and_a_late_duplicate_dropped(
    tmp_path: Path,
) -> None:
    """A request stuck on agent x (it swallows requests) goes to a1 the moment the plan
    drops x, under the same request id; x's answer, arriving later, is a counted duplicate."""
    model, inputs = build_mlp()
    profile = profile_model(model, inputs, max_segments=4)
    bounds = [0, len(profile.segments)]
    (art,) = build_stages(model, inputs, profile, bounds, load_signing_key(key_file(tmp_path)))
    ArtifactCache(tmp_path / "a1" / "artifacts").put(art.sha256, art.data)

    def plan(version: int, agent: str) -> PlanMessage:
        stage = PlanStage(0, 0, bounds[1], [agent], artifact=art.sha256)
        specs = [s.to_wire() for s in art.input_specs]
        return PlanMessage("mlp", "p1", version, "latency", "edgeslice", [stage], specs, ready=True)

    async def scenario() -> None:
        broker = MemoryBroker()
        planner = broker.client("planner")
        await planner.connect()
        swallowed: list[tuple[str, bytes]] = []
        x = broker.client("agent-x")
        await x.connect()
        await x.subscribe(T.agent_inbox("x"), qos=1)
        agent = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(agent.run):
            stage = StageAssignment(stage=0, artifact=art.sha256, size=art.size)
            desired = AssignmentDesired("a1", "p1", 1, model="mlp", stages=[stage])
            await planner.publish(
                T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True
            )

            def ready() -> bool:
                payload = broker.retained_payload(T.assignment_reported("a1"))
                return bool(payload) and codec.decode(payload, AssignmentReported).state == "ready"

            await eventually(ready, what="stage loaded")
            await planner.publish(T.plan("mlp"), codec.encode(plan(1, "x")), qos=1, retain=True)
            async with InferenceClient(SETTINGS, "mlp", transport=broker.factory) as client:
                await client.wait_ready(5.0)
                task = asyncio.ensure_future(client.infer(inputs[0], timeout=30.0))
                while True:  # the request reaches x, which keeps it
                    msg = await x.next_message(5.0)
                    assert msg is not None, "the request never reached x"
                    swallowed.append((msg.topic, msg.payload))
                    if client.requests.open and not any(
                        r.future.done() for r in client.requests.open.values()
                    ):
                        break
                (req,) = client.requests.open.values()
                assert req.route == ["x"] and req.sends == 1
                await planner.publish(
                    T.plan("mlp"), codec.encode(plan(2, "a1")), qos=1, retain=True
                )
                result = await asyncio.wait_for(task, 10.0)  # re-sent at once, answered by a1
                assert result.request_id == req.request_id and result.attempts == 2
                assert result.route == ["a1"] and client.requests.resends == 1
                with torch.no_grad():
                    assert torch.allclose(result.outputs[0], model(*inputs), atol=1e-6)
                # x "answers" late: its copy of the request, run by a1, yields a second result
                for topic, payload in swallowed:
                    late = topic.replace("/agents/x/", "/agents/a1/")
                    await x.publish(late, payload, qos=1)
                await eventually(lambda: client.requests.duplicates >= 1, what="a duplicate")
                assert not client.requests.open  # nothing left waiting

    asyncio.run(scenario())


def test_a_withdrawn_plan_fails_requests_at_once_with_its_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        planner = broker.client("planner")
        await planner.connect()
        withdrawn = PlanMessage(
            "mlp", "p1", 4, "throughput", "edgeslice", [], reason="no usable agent"
        )
        await planner.publish(T.plan("mlp"), codec.encode(withdrawn), qos=1, retain=True)
        async with InferenceClient(SETTINGS, "mlp", transport=broker.factory) as client:
            await eventually(lambda: client.plan is not None, what="the plan")
            with pytest.raises(NoPlanError, match="no usable agent"):
                await client.infer(torch.randn(1, 16), timeout=30.0)  # at once, not in 30 s

    asyncio.run(scenario())
