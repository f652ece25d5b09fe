"""The agent service: birth/status/telemetry, assignments, commands, and the data plane's shell.

Lifecycle: connect with a retained last will (``status`` offline), publish ``status``
online, measure (calibration GFLOP/s, link round trip and throughput through the broker),
publish ``info`` (retained), then serve: telemetry every interval, desired assignments
answered on ``assignment/reported``, ``cmd/*`` answered on ``cmd-res/*``, inbox chunks to
the data plane. SIGTERM/SIGINT publish ``status`` offline and return. A malformed message
on any topic is logged with the agent and topic, counted in telemetry, and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import statistics
import struct
import time
from typing import Any

from edgeslice.agent.config import AgentConfig
from edgeslice.agent.dataplane import DataPlane
from edgeslice.agent.fetch import ArtifactFetcher
from edgeslice.agent.runtime import ArtifactCache, StageRuntime, measure_gflops, set_threads
from edgeslice.agent.telemetry import TelemetrySampler, total_memory_bytes
from edgeslice.broker.client import IncomingMessage, MqttClient, Will
from edgeslice.broker.fleetkey import load_key
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    ONLINE,
    AssignmentDesired,
    AssignmentReported,
    Command,
    CommandResult,
    Info,
    Status,
)
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.firmware_profiles import load_profile, profile_to_dict

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        own = version("edgeslice")
    except PackageNotFoundError:
        own = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "edgeslice": own}


class AgentService:
    """One agent process (see module docstring). ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, config: AgentConfig, limits: dict[str, Any] | None = None) -> None:
        self.config = config
        self.profile = load_profile(config.profile)
        self.topics = Topics(config.broker.namespace)
        self.session = int(time.time() * 1000)
        self.limits = limits or {}
        self.gflops = 0.0
        self.link_rtt_s = 0.0
        self.link_bandwidth_bps = 0.0
        self.malformed = 0
        self.started = time.time()
        self.assignment: AssignmentDesired | None = None
        self.reported: AssignmentReported | None = None
        self._assign_task: asyncio.Task[None] | None = None
        self._probe_waiters: dict[int, asyncio.Future[float]] = {}
        self._key: bytes | None = None
        self._previous_keep: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.runtime = StageRuntime()
        will = Will(self.topics.status(config.agent_id), self._status(OFFLINE, "lost"))
        self.client = MqttClient(
            config.broker,
            client_id=f"agent-{config.agent_id}",
            will=will,
            on_connect=self._on_connect,
        )
        self.dataplane = DataPlane(
            config.agent_id, self.client, self.topics, self.runtime, max_queue=config.max_queue
        )
        self.fetcher = ArtifactFetcher(
            config.agent_id, self.client, self.topics, ArtifactCache(config.artifact_dir)
        )

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    @property
    def memory_budget_bytes(self) -> int:
        if self.config.memory_budget_mb is not None:
            return self.config.memory_budget_mb * 1024 * 1024
        return min(self.profile.memory_budget_bytes, total_memory_bytes())

    # -- lifecycle ------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if self.config.threads:
            set_threads(self.config.threads)
        await self.client.connect()
        log.info(
            "agent=%s connected to %s (profile %s)",
            self.agent_id,
            self.config.broker.url,
            self.profile.name,
        )
        tasks = [
            asyncio.create_task(self._consume(), name="consume"),
            asyncio.create_task(self.dataplane.run(), name="dataplane"),
        ]
        try:
            await self._measure()
            await self._publish_info()
            tasks.append(asyncio.create_task(self._telemetry_loop(), name="telemetry"))
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            await self.client.publish(
                self.topics.status(self.agent_id),
                self._status(OFFLINE, "shutdown"),
                qos=1,
                retain=True,
                timeout=5.0,
            )
        except EdgesliceError as exc:
            log.warning("agent=%s could not publish offline status: %s", self.agent_id, exc)
        self.dataplane.close()
        await self.client.close()
        log.info("agent=%s stopped", self.agent_id)

    async def _on_connect(self) -> None:
        """(Re)announce and (re)subscribe: runs after every connect, incl. reconnects."""
        t = self.topics
        for topic_filter in (
            t.assignment_desired(self.agent_id),
            t.agent_commands(self.agent_id),
            t.inbox(self.agent_id),
            t.probe(self.agent_id),
        ):
            await self.client.subscribe(topic_filter, qos=1)
        await self.client.publish(t.status(self.agent_id), self._status(ONLINE), qos=1, retain=True)
        if self.gflops > 0:  # a reconnect: the broker may have lost retained state
            await self._publish_info()

    def _status(self, state: str, reason: str = "") -> bytes:
        msg = Status(
            agent_id=self.agent_id, state=state, session=self.session, ts=time.time(), reason=reason
        )
        return codec.encode(msg)

    # -- measurements ----------------------------------------------------------
    async def _measure(self, seconds: float | None = None) -> None:
        """Calibrate GFLOP/s (on the stage thread, between requests) and test the link."""
        loop = asyncio.get_running_loop()
        self.gflops = await loop.run_in_executor(
            self.dataplane.executor,
            measure_gflops,
            seconds if seconds is not None else self.config.calibrate_seconds,
            self.config.threads,
        )
        try:
            self.link_rtt_s, self.link_bandwidth_bps = await self._link_test()
        except (TimeoutError, EdgesliceError) as exc:
            log.warning("agent=%s link test failed: %s", self.agent_id, exc)
        log.info(
            "agent=%s gflops=%.2f rtt_ms=%.2f link_MBps=%.1f",
            self.agent_id,
            self.gflops,
            self.link_rtt_s * 1e3,
            self.link_bandwidth_bps / 1e6,
        )

    async def _link_test(self) -> tuple[float, float]:
        """Round trip and throughput agent -> broker -> agent, on the agent's own probe topic."""
        topic = self.topics.probe(self.agent_id)
        rtts = []
        for i in range(5):
            rtts.append(await self._probe_roundtrip(topic, i, 8))
        rtt = statistics.median(rtts)
        size = max(self.config.link_test_bytes, 16 * 1024)
        count = 4
        start = time.perf_counter()
        waits = [self._probe_roundtrip(topic, 100 + i, size // count) for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*waits), 30.0)
        elapsed = time.perf_counter() - start
        return rtt, size / max(elapsed - rtt, 1e-6)

    async def _probe_roundtrip(self, topic: str, seq: int, size: int) -> float:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._probe_waiters[seq] = fut
        start = time.perf_counter()
        payload = struct.pack("!Q", seq) + os.urandom(max(0, size - 8))
        await self.client.publish(topic, payload, qos=1)
        try:
            await asyncio.wait_for(fut, 10.0)
        finally:
            self._probe_waiters.pop(seq, None)
        return time.perf_counter() - start

    def _on_probe(self, payload: bytes) -> None:
        if len(payload) >= 8:
            fut = self._probe_waiters.get(struct.unpack("!Q", payload[:8])[0])
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

    async def _publish_info(self) -> None:
        import torch

        info = Info(
            agent_id=self.agent_id,
            profile=self.profile.name,
            profile_data=profile_to_dict(self.profile),
            gflops=self.gflops,
            cpu_count=os.cpu_count() or 1,
            ram_bytes=total_memory_bytes(),
            memory_budget_bytes=self.memory_budget_bytes,
            hostname=socket.gethostname(),
            versions=_versions(),
            emulated=self.config.emulate,
            limits=self.limits,
            link_rtt_s=self.link_rtt_s,
            link_bandwidth_bps=self.link_bandwidth_bps,
            threads=torch.get_num_threads(),
            session=self.session,
            ts=time.time(),
        )
        await self.client.publish(
            self.topics.info(self.agent_id), codec.encode(info), qos=1, retain=True
        )

    async def _telemetry_loop(self) -> None:
        sampler = TelemetrySampler(self.agent_id)
        topic = self.topics.telemetry(self.agent_id)
        while True:
            dp = self.dataplane
            msg = sampler.sample(
                queue_depth=dp.queue_depth,
                in_flight=dp.in_flight,
                malformed=self.malformed,
                busy=dp.busy_fraction(),
                stage_timings=dp.stage_timings(),
            )
            self.client.publish_nowait(topic, codec.encode(msg), qos=0)
            dp.expire()
            await asyncio.sleep(self.config.telemetry_interval)

    # -- messages --------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                await self._dispatch(msg)
            except Exception as exc:  # an agent never dies from a message
                self.malformed += 1
                log.warning(
                    "agent=%s topic=%s dropped message (%d bytes): %s",
                    self.agent_id,
                    msg.topic,
                    len(msg.payload),
                    exc,
                )

    async def _dispatch(self, msg: IncomingMessage) -> None:
        parsed = self.topics.parse(msg.topic)
        if parsed.kind is Kind.INBOX:
            self.dataplane.on_chunk(msg.payload)
        elif parsed.kind is Kind.ARTIFACT_DATA:
            self.fetcher.on_chunk(parsed.name, msg.payload)
        elif parsed.kind is Kind.PROBE:
            self._on_probe(msg.payload)
        elif parsed.kind is Kind.ASSIGNMENT_DESIRED:
            if not msg.payload:  # retained message cleared
                return
            desired = codec.decode(msg.payload, AssignmentDesired)
            if desired.agent_id != self.agent_id:
                raise EdgesliceError(f"assignment is addressed to {desired.agent_id!r}")
            self._start_assignment(desired)
        elif parsed.kind is Kind.CMD:
            # its own task: a command may wait for messages this loop must keep consuming
            task = asyncio.create_task(
                self._on_command(parsed.name, codec.decode(msg.payload, Command))
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- assignments ------------------------------------------------------------
    def _start_assignment(self, desired: AssignmentDesired) -> None:
        current = self.assignment
        if (
            current is not None
            and (current.plan_id, current.plan_version) == (desired.plan_id, desired.plan_version)
            and self.reported is not None
            and self.reported.state in ("ready", "idle")
        ):
            return  # a redelivery of what we already run
        self.assignment = desired
        previous = self._assign_task
        if previous is not None and not previous.done():
            previous.cancel()
        self._assign_task = asyncio.create_task(self._apply(desired))

    async def _apply(self, desired: AssignmentDesired) -> None:
        started = time.perf_counter()
        stages = [s.stage for s in desired.stages]
        try:
            if not desired.stages:
                await self._report(desired, "idle", [], "", 0.0)
                return
            total = sum(s.size for s in desired.stages)
            if total > self.memory_budget_bytes:
                raise EdgesliceError(
                    f"agent {self.agent_id}: stages {stages} need {total / 2**20:.1f} MiB, "
                    f"memory budget is {self.memory_budget_bytes / 2**20:.1f} MiB"
                )
            await self._report(desired, "loading", stages, "", 0.0)
            if self._key is None:
                self._key = load_key(self.config.fleet_key_file)
            keep = set()
            for stage in desired.stages:
                data = await self.fetcher.get(stage.artifact)
                loaded = await asyncio.to_thread(self.runtime.load, data, self._key)
                if loaded.info.index != stage.stage:
                    raise EdgesliceError(
                        f"artifact {stage.artifact[:12]} is stage {loaded.info.index}, "
                        f"assignment says stage {stage.stage}"
                    )
                keep.add(stage.artifact)
            self._unload_old(keep)
            self.dataplane.reassembler.set_min_plan_version(desired.plan_id, 0)
            await self._report(desired, "ready", stages, "", time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "agent=%s plan=%s v%d assignment failed: %s",
                self.agent_id,
                desired.plan_id,
                desired.plan_version,
                exc,
            )
            await self._report(desired, "error", stages, str(exc), time.perf_counter() - started)

    def _unload_old(self, keep: set[str]) -> None:
        """Keep this plan's stages and the previous plan's (in-flight requests finish)."""
        for sha in self.runtime.loaded():
            if sha not in keep and sha not in self._previous_keep:
                self.runtime.unload(sha)
        self._previous_keep = keep

    async def _report(
        self, desired: AssignmentDesired, state: str, stages: list[int], error: str, load_s: float
    ) -> None:
        report = AssignmentReported(
            agent_id=self.agent_id,
            plan_id=desired.plan_id,
            plan_version=desired.plan_version,
            state=state,
            stages=stages,
            error=error,
            load_s=load_s,
            ts=time.time(),
        )
        self.reported = report
        await self.client.publish(
            self.topics.assignment_reported(self.agent_id), codec.encode(report), qos=1, retain=True
        )

    # -- commands ----------------------------------------------------------------
    async def _on_command(self, name: str, cmd: Command) -> None:
        ok, result, error = True, {}, ""
        try:
            if name == "ping":
                result = {
                    "pong": True,
                    "session": self.session,
                    "uptime_s": time.time() - self.started,
                    "echo": cmd.args,
                }
            elif name == "calibrate":
                seconds = float(cmd.args.get("seconds", self.config.calibrate_seconds))
                if not 0.05 <= seconds <= 30:
                    raise EdgesliceError("calibrate: seconds must be between 0.05 and 30")
                await self._measure(seconds)
                await self._publish_info()
                result = {
                    "gflops": self.gflops,
                    "link_rtt_s": self.link_rtt_s,
                    "link_bandwidth_bps": self.link_bandwidth_bps,
                }
            else:
                raise EdgesliceError(f"unknown command {name!r}; known: ping, calibrate")
        except Exception as exc:
            ok, error = False, str(exc)
        reply = CommandResult(
            request_id=cmd.request_id,
            agent_id=self.agent_id,
            name=name,
            ok=ok,
            result=result,
            error=error,
            ts=time.time(),
        )
        await self.client.publish(
            self.topics.cmd_result(self.agent_id, name), codec.encode(reply), qos=1
        )
