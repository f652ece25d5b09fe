"""The agent service over the in-memory broker: announce, assignments, commands, robustness."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from memfleet import agent_config, build_mlp, eventually, key_file, running

from edgeslice.agent.probe import claim_id
from edgeslice.agent.runtime import ArtifactCache
from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import generate_key, load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.protocol.messages import (
    AssignmentDesired,
    AssignmentReported,
    Command,
    CommandResult,
    Info,
    StageAssignment,
    Status,
    Telemetry,
)
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
