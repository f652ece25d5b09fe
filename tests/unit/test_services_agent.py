"""The agent service over the in-memory broker: announce, assignments, commands, robustness."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from memfleet import agent_config, build_mlp, eventually, key_file, running

from edgeslice.agent.dataplane import DataPlane
from edgeslice.agent.drain import traffic_moved
from edgeslice.agent.probe import claim_id
from edgeslice.agent.runtime import ArtifactCache, StageRuntime
from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import generate_key, load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, encode_transfer
from edgeslice.broker.protocol.errors import AgentDrainingError, ConfigError
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    Command,
    CommandResult,
    ErrorReply,
    Info,
    PlanMessage,
    PlannerStatus,
    PlanStage,
    RequestEnvelope,
    RouteHop,
    StageAssignment,
    Status,
    Telemetry,
)
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.planner.profile import profile_model
from edgeslice.planner.stages import build_stages

T = Topics("unit")


def _retained(broker: MemoryBroker, topic: str, cls: type) -> object | None:
    payload = broker.retained_payload(topic)
    return None if payload is None else codec.decode(payload, cls)


def _status(broker: MemoryBroker, agent_id: str) -> Status | None:
    return _retained(broker, T.status(agent_id), Status)  # type: ignore[return-value]


def _reported(broker: MemoryBroker, agent_id: str) -> AssignmentReported | None:
    return _retained(broker, T.assignment_reported(agent_id), AssignmentReported)  # type: ignore[return-value]


async def _command(broker: MemoryBroker, agent_id: str, name: str, **args: object) -> CommandResult:
    operator = broker.client(f"op-{name}")
    await operator.connect()
    await operator.subscribe(T.cmd_result(agent_id, name))
    cmd = Command(request_id=f"r-{name}", name=name, args=dict(args), sender="test")
    await operator.publish(T.cmd(agent_id, name), codec.encode(cmd), qos=1)
    msg = await operator.next_message(5.0)
    await operator.close()
    assert msg is not None, f"no answer to cmd/{name}"
    return codec.decode(msg.payload, CommandResult)


def test_announces_status_info_and_telemetry_then_goes_offline(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        watch = broker.client("watch")
        await watch.connect()
        await watch.subscribe(T.telemetry("a1"), qos=0)
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(service.run):
            status = await eventually(lambda: _status(broker, "a1"), what="status")
            assert isinstance(status, Status) and status.state == "online"
            info = await eventually(lambda: _retained(broker, T.info("a1"), Info), what="info")
            assert isinstance(info, Info) and info.gflops > 0 and info.session == status.session
            assert info.link_rtt_s > 0 and info.link_bandwidth_bps > 0
            msg = await watch.next_message(5.0)
            assert msg is not None and codec.decode(msg.payload, Telemetry).agent_id == "a1"
        status = _status(broker, "a1")
        assert status is not None and (status.state, status.reason) == ("offline", "shutdown")

    asyncio.run(scenario())


def test_crash_publishes_the_last_will(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(service.run):
            await eventually(lambda: _retained(broker, T.info("a1"), Info), what="info")
            service.client.crash()  # type: ignore[attr-defined]
            status = _status(broker, "a1")
            assert status is not None and (status.state, status.reason) == ("offline", "lost")

    asyncio.run(scenario())


def test_desired_assignments_are_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        model, inputs = build_mlp()
        profile = profile_model(model, inputs, max_segments=4)
        key = load_signing_key(key_file(tmp_path))
        (art,) = build_stages(model, inputs, profile, [0, len(profile.segments)], key)
        ArtifactCache(tmp_path / "a1" / "artifacts").put(art.sha256, art.data)  # as if fetched
        service = AgentService(
            agent_config("a1", tmp_path, memory_budget_mb=1), transport=broker.factory
        )
        planner = broker.client("planner")
        await planner.connect()

        async def desire(version: int, stages: list[StageAssignment]) -> AssignmentReported:
            desired = AssignmentDesired("a1", "p1", version, model="mlp", stages=stages)
            await planner.publish(
                T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True
            )

            def settled() -> AssignmentReported | None:
                rep = _reported(broker, "a1")
                done = rep is not None and rep.plan_version == version and rep.state != "loading"
                return rep if done else None

            return await eventually(settled, what=f"report of v{version}")  # type: ignore[return-value]

        async with running(service.run):
            await eventually(lambda: _status(broker, "a1"), what="status")
            assert (await desire(1, [])).state == "idle"
            stage = StageAssignment(stage=0, artifact=art.sha256, size=art.size)
            ready = await desire(2, [stage])
            assert (ready.state, ready.stages) == ("ready", [0])
            assert service.runtime.get(art.sha256) is not None
            huge = StageAssignment(stage=0, artifact=art.sha256, size=2 << 20)
            error = await desire(3, [huge])
            assert error.state == "error" and "memory budget is 1.0 MiB" in error.error

    asyncio.run(scenario())


def test_an_artifact_signed_by_another_key_is_refused_and_deleted(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        model, inputs = build_mlp()
        profile = profile_model(model, inputs, max_segments=4)
        (art,) = build_stages(model, inputs, profile, [0, len(profile.segments)], generate_key())
        cache = ArtifactCache(tmp_path / "a1" / "artifacts")
        cache.put(art.sha256, art.data)  # as if fetched from an impostor planner
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        planner = broker.client("planner")
        await planner.connect()
        stage = StageAssignment(stage=0, artifact=art.sha256, size=art.size)
        desired = AssignmentDesired("a1", "p1", 1, model="mlp", stages=[stage])
        async with running(service.run):
            await eventually(lambda: _status(broker, "a1"), what="status")
            await planner.publish(
                T.assignment_desired("a1"), codec.encode(desired), qos=1, retain=True
            )

            def failed() -> AssignmentReported | None:
                rep = _reported(broker, "a1")
                return rep if rep is not None and rep.state == "error" else None

            report = await eventually(failed, what="error report")
            assert "signature does not verify" in report.error  # type: ignore[attr-defined]
            assert service.runtime.loaded() == []
            assert not cache.has(art.sha256)  # a refused artifact does not stay on disk

    asyncio.run(scenario())


def test_ping_and_unknown_commands_are_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(service.run):
            await eventually(lambda: _status(broker, "a1"), what="status")
            pong = await _command(broker, "a1", "ping", hello=1)
            assert pong.ok and pong.result["pong"] and pong.result["echo"] == {"hello": 1}
            assert pong.result["session"] == service.session
            unknown = await _command(broker, "a1", "dance")
            assert not unknown.ok and "unknown command 'dance'" in unknown.error

    asyncio.run(scenario())


def test_malformed_messages_on_every_topic_are_counted_and_survived(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        service = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        vandal = broker.client("vandal")
        await vandal.connect()
        async with running(service.run):
            await eventually(lambda: _retained(broker, T.info("a1"), Info), what="info")
            for topic in (T.assignment_desired("a1"), T.cmd("a1", "ping"), T.probe("a1")):
                await vandal.publish(topic, b"\xc1 not msgpack", qos=1)
            wrong = AssignmentDesired("someone-else", "p", 1)
            await vandal.publish(T.assignment_desired("a1"), codec.encode(wrong), qos=1)
            await vandal.publish(T.inbox("a1", "vandal"), b"garbage chunk", qos=1)
            await eventually(lambda: service.malformed >= 4, what="malformed count")
            assert (await _command(broker, "a1", "ping")).ok
            assert not service.dataplane.queue_depth

    asyncio.run(scenario())


def test_a_second_agent_with_the_same_id_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        first = AgentService(agent_config("pi-1", tmp_path), transport=broker.factory)
        async with running(first.run):
            await eventually(lambda: _retained(broker, T.info("pi-1"), Info), what="info")
            second = AgentService(agent_config("pi-1", tmp_path / "b"), transport=broker.factory)
            with pytest.raises(ConfigError) as caught:
                await second.run(asyncio.Event())
            assert str(caught.value) == (
                f"agent id 'pi-1' is already online (session {first.session}, host "
                f"{first.hostname}): give this agent another --id"
            )
            assert first.client.connected  # never taken over
            status = _status(broker, "pi-1")
            assert status is not None and (status.state, status.session) == (
                "online",
                first.session,
            )
            assert (await _command(broker, "pi-1", "ping")).result["session"] == first.session

    asyncio.run(scenario())


def test_a_stale_online_status_does_not_block_the_id() -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        ghost = broker.client("ghost")  # a device that lost power: its will has not fired yet
        await ghost.connect()
        stale = Status(agent_id="pi-1", state="online", session=1)
        await ghost.publish(T.status("pi-1"), codec.encode(stale), qos=1, retain=True)
        await claim_id(broker.factory, T, "pi-1", 2, "host", live_window_s=0.2)

    asyncio.run(scenario())


def test_an_agent_restarted_after_shutdown_keeps_its_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        first = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        async with running(first.run):
            await eventually(lambda: _retained(broker, T.info("a1"), Info), what="info")
        again = AgentService(agent_config("a1", tmp_path), transport=broker.factory)
        again.session = first.session + 1
        async with running(again.run):

            def online_again() -> bool:
                status = _status(broker, "a1")
                return status is not None and status.session == again.session

            await eventually(online_again, what="the restarted agent online")

    asyncio.run(scenario())


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
