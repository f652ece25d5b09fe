"""Stopping and reconnecting agents over the memory broker: the graceful drain (status
draining, serve until the plan moves on, refuse retryably, finish, offline), a second
signal, and the retained state re-published after a reconnect (agent/drain.py,
agent/service.py, broker/lifecycle.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import torch
from memfleet import agent_config, build_mlp, eventually, key_file, running

from edgeslice.agent.dataplane import DataPlane
from edgeslice.agent.drain import traffic_moved
from edgeslice.agent.runtime import ArtifactCache, StageRuntime
from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.lifecycle import run_until_signalled
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, encode_transfer
from edgeslice.broker.protocol.errors import AgentDrainingError
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    ErrorReply,
    Info,
    PlanMessage,
    PlannerStatus,
    PlanStage,
    RequestEnvelope,
    RouteHop,
    StageAssignment,
    Status,
)
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.planner.profile import profile_model
from edgeslice.planner.stages import build_stages

T = Topics("unit")


def _retained(broker: MemoryBroker, topic: str, cls: type) -> Any:
    payload = broker.retained_payload(topic)
    return None if payload is None else codec.decode(payload, cls)


def _status(broker: MemoryBroker, agent_id: str) -> Status | None:
    return _retained(broker, T.status(agent_id), Status)  # type: ignore[no-any-return]


def _reported(broker: MemoryBroker, agent_id: str) -> AssignmentReported | None:
    return _retained(broker, T.assignment_reported(agent_id), AssignmentReported)  # type: ignore[no-any-return]


def _one_stage(tmp_path: Path) -> tuple[Any, Any, Any]:
    """The whole MLP as one signed stage, already in a1's artifact cache."""
    model, inputs = build_mlp()
    profile = profile_model(model, inputs, max_segments=4)
    key = load_signing_key(key_file(tmp_path))
    (art,) = build_stages(model, inputs, profile, [0, len(profile.segments)], key)
    ArtifactCache(tmp_path / "a1" / "artifacts").put(art.sha256, art.data)
    return model, inputs, art


def _plan_of(art: Any, version: int, agents: list[str]) -> PlanMessage:
    return PlanMessage(
        model="mlp",
        plan_id="p1",
        plan_version=version,
        objective="latency",
        strategy="edgeslice",
        stages=[PlanStage(0, 0, 1, agents, artifact=art.sha256)],
        input_specs=[s.to_wire() for s in art.input_specs],
        ready=True,
    )


async def _serve_one_stage(broker: MemoryBroker, planner: Any, art: Any) -> None:
    """As a planner would: a1 runs the stage, plan v1 (ready) routes to it."""
    online = PlannerStatus(state="online", planner_id="planner", model="mlp")
    await planner.publish(T.planner_status(), codec.encode(online), qos=1, retain=True)
    stage = StageAssignment(stage=0, artifact=art.sha256, size=art.size)
    desired = AssignmentDesired("a1", "p1", 1, model="mlp", stages=[stage])
    await planner.publish(T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True)

    def ready() -> bool:
        rep = _reported(broker, "a1")
        return rep is not None and rep.state == "ready"

    await eventually(ready, what="stage loaded")
    await planner.publish(T.plan("mlp"), codec.encode(_plan_of(art, 1, ["a1"])), retain=True)


async def _request(client: Any, art: Any, inputs: Any, request_id: str) -> Completed:
    """One request straight to a1's inbox (as an upstream stage or a client would send it);
    the transfer that comes back on the client's results topic."""
    tensors, payload = pack_tensors(list(inputs))
    env = RequestEnvelope(route=[RouteHop("a1", art.sha256)], reply_to=client.client_id)
    env = dataclasses.replace(env, tensors=tensors)
    request = encode_transfer(
        payload,
        request_id=request_id,
        kind="request",
        plan_id="p1",
        plan_version=1,
        meta=codec.to_wire(env),
    )
    for chunk in request.chunks:
        await client.publish(T.inbox("a1", client.client_id), chunk, qos=1)
    reassembler = Reassembler()
    while True:
        msg = await client.next_message(10.0)
        assert msg is not None, f"no answer to {request_id}"
        done = reassembler.feed(msg.payload, 0.0)
        if isinstance(done, Completed) and done.header.request_id == request_id:
            return done


def test_sigterm_drains_serves_until_the_plan_moves_on_then_goes_offline(tmp_path: Path) -> None:
    """Stop: status draining; requests still served while the plan names the agent; once a
    ready plan without it is out, the agent finishes and says offline (shutdown)."""
    model, inputs, art = _one_stage(tmp_path)

    async def scenario() -> None:
        broker = MemoryBroker()
        planner = broker.client("planner")
        await planner.connect()
        sender = broker.client("c1")
        await sender.connect()
        await sender.subscribe(T.client_results("c1"))
        config = agent_config("a1", tmp_path, drain_timeout_s=60.0)
        service = AgentService(config, transport=broker.factory)
        stop = asyncio.Event()
        run = asyncio.ensure_future(service.run(stop))
        await _serve_one_stage(broker, planner, art)
        stop.set()  # SIGTERM
        draining = await eventually(
            lambda: (s := _status(broker, "a1")) and s.state == "draining" and s, what="drain"
        )
        assert isinstance(draining, Status) and draining.session == service.session
        served = await _request(sender, art, inputs, "during-drain")  # still served
        assert served.header.kind == "result" and not run.done()
        env = codec.from_wire(served.header.meta, RequestEnvelope)
        (out,) = unpack_tensors(env.tensors, served.payload)
        with torch.no_grad():
            assert torch.allclose(out, model(*inputs), atol=1e-6)
        moved = _plan_of(art, 2, ["a2"])  # the planner re-planned without a1
        await planner.publish(T.plan("mlp"), codec.encode(moved), qos=1, retain=True)
        await asyncio.wait_for(run, 10.0)
        status = _status(broker, "a1")
        assert status is not None and (status.state, status.reason) == ("offline", "shutdown")
        assert service.dataplane.refusing is not None and service.dataplane.in_flight == 0
        print(f"\ndrain: stop -> offline in {service.drain_s:.3f} s")

    asyncio.run(scenario())


def test_a_draining_agent_needs_no_wait_without_a_planner_or_stages(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        config = agent_config("a1", tmp_path, drain_timeout_s=60.0)
        service = AgentService(config, transport=broker.factory)
        stop = asyncio.Event()
        run = asyncio.ensure_future(service.run(stop))
        await eventually(lambda: service.serving.is_set(), what="serving")
        stop.set()  # holds no stage: nothing to move
        await asyncio.wait_for(run, 10.0)
        assert service.drain_s < 60.0

    asyncio.run(scenario())
    assert traffic_moved("a1", None, True, True) == "no plan is published for its model"
    plan = PlanMessage("m", "p", 3, "latency", "edgeslice", [PlanStage(0, 0, 1, ["a1"])])
    assert traffic_moved("a1", plan, True, False) == "no planner is online to re-plan"
    assert traffic_moved("a1", plan, True, True) is None
    ready_elsewhere = dataclasses.replace(plan, ready=True, stages=[PlanStage(0, 0, 1, ["b"])])
    assert (
        traffic_moved("a1", dataclasses.replace(ready_elsewhere, ready=False), True, True) is None
    )
    assert traffic_moved("a1", ready_elsewhere, True, True) == "plan p v3 is ready without it"


def test_a_draining_data_plane_refuses_new_requests_retryably(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        agent = broker.client("a1")
        await agent.connect()
        client = broker.client("c1")
        await client.connect()
        await client.subscribe(T.client_results("c1"))
        plane = DataPlane("a1", agent, T, StageRuntime())
        plane.refusing = AgentDrainingError("agent a1 is shutting down")
        env = RequestEnvelope(route=[RouteHop("a1", "a" * 64)], reply_to="c1")
        request = encode_transfer(
            b"x" * 16, request_id="r1", kind="request", meta=codec.to_wire(env)
        )
        for chunk in request.chunks:
            plane.on_chunk(chunk, "c1")
        msg = await client.next_message(5.0)
        assert msg is not None
        done = Reassembler().feed(msg.payload, 0.0)
        assert isinstance(done, Completed) and done.header.kind == "error"
        reply = codec.from_wire(done.header.meta, ErrorReply)
        assert (reply.code, reply.retryable, reply.agent) == ("draining", True, "a1")
        assert plane.queue_depth == 0

    asyncio.run(scenario())


def test_a_reconnect_republishes_status_info_and_reported(tmp_path: Path) -> None:
    """A broker restarted without persistence: its retained store is empty when the agent
    reconnects; the agent's status (same session), info and last report are back."""

    async def scenario() -> None:
        broker = MemoryBroker()
        planner = broker.client("planner")
        await planner.connect()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(service.run):
            await eventually(lambda: _retained(broker, T.info("a1"), Info), what="info")
            desired = AssignmentDesired("a1", "p1", 4, model="mlp", stages=[])
            await planner.publish(T.assignment_desired("a1"), codec.encode(desired), qos=1)
            await eventually(lambda: _reported(broker, "a1"), what="reported")
            broker.retained.clear()  # the broker restarted and forgot everything
            service.client.drop_connection()  # type: ignore[attr-defined]
            status = await eventually(
                lambda: (s := _status(broker, "a1")) and s.state == "online" and s, what="status"
            )
            assert isinstance(status, Status) and status.session == service.session
            info = await eventually(lambda: _retained(broker, T.info("a1"), Info), what="info")
            assert isinstance(info, Info) and info.session == service.session
            reported = await eventually(lambda: _reported(broker, "a1"), what="reported")
            assert isinstance(reported, AssignmentReported)
            assert (reported.plan_version, reported.state) == (4, "idle")
            assert service.client.connect_count == 2  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_a_second_signal_stops_a_draining_service_at_once() -> None:
    """broker/lifecycle.py: the first SIGTERM sets stop (the service drains), a second one
    cancels it; the service's own clean-up still runs and run_until_signalled returns."""
    seen: list[str] = []

    async def service(stop: asyncio.Event) -> None:
        await stop.wait()
        seen.append("draining")
        try:
            await asyncio.sleep(60)  # a drain that would take long
        finally:
            seen.append("offline published")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        loop.call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(run_until_signalled(service), 10.0)

    asyncio.run(scenario())
    assert seen == ["draining", "offline published"]
