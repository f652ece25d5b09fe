"""The agent service: birth/status/telemetry, commands, and the shell around the data plane.

Lifecycle: make sure no other live agent runs under this id (agent/probe.py), connect
with a retained last will (``status`` offline), publish ``status`` online, measure
(calibration GFLOP/s, link round trip and throughput through the broker), publish
``info`` (retained), then serve: telemetry every interval, desired assignments to
agent/assignments.py (answered on ``assignment/reported``), ``cmd/*`` answered on
``cmd-res/*``, inbox chunks to the data plane. A malformed message on any topic is counted
in telemetry and ignored; logged (agent, topic) are the first 20, then every 1000th.

After every (re)connect the agent subscribes again and re-publishes its retained state
(status, info once measured, the last ``assignment/reported``), so a broker restarted
without persistence gets it back.

Stopping (``stop`` set: SIGTERM/SIGINT) drains gracefully (agent/drain.py): ``status``
``draining``; keep serving until the planner has a ready plan without this agent (no
planner online: no wait; at most ``drain_timeout_s``); then refuse new requests
(retryable, code ``draining``), finish the queued and computing ones and their sends (at
most :data:`FINISH_TIMEOUT_S`); then ``status`` offline (reason ``shutdown``) and return.
Cancelling ``run`` (a second signal) skips the drain and still publishes offline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from edgeslice.agent.announce import Measured, build_info, measure, retest_link
from edgeslice.agent.assignments import Assignments
from edgeslice.agent.batching import BatchPolicy
from edgeslice.agent.config import AgentConfig
from edgeslice.agent.dataplane import DataPlane
from edgeslice.agent.drain import PlanWatch, wait_idle
from edgeslice.agent.fetch import ArtifactFetcher
from edgeslice.agent.linkwatch import LinkWatch, LinkWatchConfig
from edgeslice.agent.memtrim import IdleTrim
from edgeslice.agent.probe import LinkTest, claim_id, decode_presence, here, is_link_probe
from edgeslice.agent.runtime import ArtifactCache, StageRuntime, set_threads
from edgeslice.agent.sweep import sweep_command
from edgeslice.agent.telemetry import TelemetrySampler, total_memory_bytes
from edgeslice.broker.client import IncomingMessage, Will
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import AgentDrainingError, EdgesliceError
from edgeslice.broker.protocol.messages import (
    DRAINING,
    OFFLINE,
    ONLINE,
    Command,
    CommandResult,
    Status,
)
from edgeslice.broker.protocol.topics import Kind, Topics
from edgeslice.broker.transport import TransportFactory, mqtt_transport
from edgeslice.firmware_profiles import load_profile

log = logging.getLogger(__name__)

FINISH_TIMEOUT_S = 60.0  # draining: the longest wait for held requests (= a send's timeout)
LINK_TEST_MAX_BUSY = 0.8  # no link test while the stage worker was busier than this


class AgentService:
    """One agent process (see module docstring). ``await run(stop)`` until ``stop`` is set.

    ``transport`` opens its broker connections (default: MqttClient to ``config.broker``;
    unit tests pass an in-memory broker's factory).
    """

    def __init__(
        self,
        config: AgentConfig,
        limits: dict[str, Any] | None = None,
        transport: TransportFactory | None = None,
    ) -> None:
        self.config = config
        self.connect = transport or mqtt_transport(config.broker)
        self.hostname = socket.gethostname()
        self.profile = load_profile(config.profile)
        self.topics = Topics(config.broker.namespace)
        self.session = int(time.time() * 1000)
        self.limits = limits or {}
        self.measured = Measured()  # calibration and link figures (agent/announce.py)
        self.malformed = 0
        self.started = time.time()
        self.state = ONLINE  # what ``status`` says while connected: ONLINE, then DRAINING
        self.serving = asyncio.Event()  # set once start-up is over and requests are served
        self.drain_s = 0.0  # how long the last drain took (stop signal -> offline)
        self._background: set[asyncio.Task[None]] = set()
        self.runtime = StageRuntime()
        will = Will(self.topics.status(config.agent_id), self._status(OFFLINE, "lost"))
        self.client = self.connect(
            f"agent-{config.agent_id}", will=will, on_connect=self._on_connect
        )
        self.link = LinkTest(self.client, self.topics.probe(config.agent_id))
        self.plans = PlanWatch(self.client, self.topics)
        self.dataplane = DataPlane(
            config.agent_id,
            self.client,
            self.topics,
            self.runtime,
            max_queue=config.max_queue,
            batching=BatchPolicy(config.max_batch, config.max_batch_wait_ms / 1e3),
        )
        self.memtrim = IdleTrim()  # gives malloc's kept memory back once requests stop
        self._measuring = asyncio.Lock()  # one calibration or link test at a time
        self.linkwatch: LinkWatch | None = None  # notices a link that slowed down
        if config.link_watch_s > 0:
            watch_config = LinkWatchConfig.scaled(config.link_watch_s)
            self.linkwatch = LinkWatch(watch_config, self.dataplane.clock())
            self.dataplane.on_received = self.linkwatch.observe
        self.fetcher = ArtifactFetcher(
            config.agent_id, self.client, self.topics, ArtifactCache(config.artifact_dir)
        )
        self.assignments = Assignments(
            config.agent_id,
            self.client,
            self.topics,
            self.runtime,
            self.fetcher,
            self.dataplane,
            lambda: self.memory_budget_bytes,
            config.fleet_key_file,
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
        await claim_id(self.connect, self.topics, self.agent_id, self.session, self.hostname)
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
            self.serving.set()
            await stop.wait()
            await self._drain()
        finally:
            self.assignments.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._shutdown()

    async def _drain(self) -> None:
        """Finish what this agent holds before it leaves (module docstring, agent/drain.py)."""
        started = time.monotonic()
        self.state = DRAINING
        self.assignments.drain()
        try:
            await self._publish_status()
        except EdgesliceError as exc:
            log.warning("agent=%s could not publish draining status: %s", self.agent_id, exc)
        log.info("agent=%s draining: serving until the planner moves requests away", self.agent_id)
        why = await self.plans.wait_moved(
            self.agent_id, lambda: bool(self.runtime.loaded()), self.config.drain_timeout_s
        )
        dp = self.dataplane
        dp.refusing = AgentDrainingError(
            f"agent {self.agent_id} is shutting down and takes no new requests; retry on the "
            "current plan"
        )
        held = dp.in_flight
        log.info(
            "agent=%s draining: refusing new requests (%s); finishing %d held",
            self.agent_id,
            why,
            held,
        )
        left = await wait_idle(lambda: dp.in_flight, FINISH_TIMEOUT_S)
        self.drain_s = time.monotonic() - started
        (log.warning if left else log.info)(
            "agent=%s drained in %.2f s (%d request(s) unfinished)",
            self.agent_id,
            self.drain_s,
            left,
        )

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
            t.agent_inbox(self.agent_id),  # inbox/+: one segment per sending client
            t.probe(self.agent_id),
        ):
            await self.client.subscribe(topic_filter, qos=1)
        await self._publish_status()
        # a reconnect: the broker may have lost retained state (restarted, no persistence)
        if self.measured.gflops > 0:
            await self._publish_info()
        await self.assignments.republish()

    async def _publish_status(self) -> None:
        reason = "draining" if self.state == DRAINING else ""
        await self.client.publish(
            self.topics.status(self.agent_id), self._status(self.state, reason), qos=1, retain=True
        )

    def _status(self, state: str, reason: str = "") -> bytes:
        msg = Status(
            agent_id=self.agent_id, state=state, session=self.session, ts=time.time(), reason=reason
        )
        return codec.encode(msg)

    # -- measurements ----------------------------------------------------------
    async def _measure(self, seconds: float | None = None) -> None:
        """Calibrate GFLOP/s (on the stage thread, between requests) and test the link."""
        async with self._measuring:
            self.measured = await measure(
                self.measured,
                self.dataplane.executor,
                self.link,
                self.config,
                seconds if seconds is not None else self.config.calibrate_seconds,
            )
            if self.linkwatch is not None:
                self.linkwatch.tested(self.dataplane.clock())

    async def _retest_link(self, watch: LinkWatch) -> None:
        """Received transfers changed pace (agent/linkwatch.py): test the link, re-announce."""
        async with self._measuring:
            clock = self.dataplane.clock
            moved = await retest_link(watch, clock, self.measured, self.link, self.config)
            if moved is None:
                return
            self.measured = moved
        try:
            await self._publish_info()
        except EdgesliceError as exc:
            log.warning("agent=%s could not re-announce its link: %s", self.agent_id, exc)

    async def _on_probe(self, payload: bytes) -> None:
        """A link-test echo, or someone's presence hello: answer it, this id is ours."""
        if is_link_probe(payload):
            self.link.on_probe(payload)
            return
        seen = decode_presence(payload)
        if isinstance(seen, Command) and seen.args.get("session") != self.session:
            answer = here(self.agent_id, seen, self.session, self.hostname)
            await self.client.publish(self.topics.probe(self.agent_id), codec.encode(answer))

    async def _publish_info(self) -> None:
        info = build_info(
            self.config,
            self.profile,
            self.measured,
            memory_budget_bytes=self.memory_budget_bytes,
            hostname=self.hostname,
            limits=self.limits,
            session=self.session,
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
            self.memtrim.tick(dp.in_flight, sum(s.requests for s in dp.stats.values()))
            watch = self.linkwatch
            # a stage worker busy most of the interval bounds what this agent receives and
            # what a link test measures by its CPU, not its link: test once it has room
            # (a load-shift run re-announced a CPU-throttled agent's link at 2.6 MB/s)
            may_test = msg.busy < LINK_TEST_MAX_BUSY and not self._measuring.locked()
            if watch is not None and watch.due(dp.clock(), may_test):  # windows close anyway
                task = asyncio.create_task(self._retest_link(watch), name="link-retest")
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            await asyncio.sleep(self.config.telemetry_interval)

    # -- messages --------------------------------------------------------------
    async def _consume(self) -> None:
        async for msg in self.client.messages():
            try:
                await self._dispatch(msg)
            except Exception as exc:  # an agent never dies from a message
                self.malformed += 1  # exact (telemetry); logged: the first 20, every 1000th
                (log.warning if self.malformed <= 20 or self.malformed % 1000 == 0 else log.debug)(
                    "agent=%s topic=%s dropped message (%d bytes, %d so far): %s",
                    self.agent_id,
                    msg.topic,
                    len(msg.payload),
                    self.malformed,
                    exc,
                )

    async def _dispatch(self, msg: IncomingMessage) -> None:
        parsed = self.topics.parse(msg.topic)
        if parsed.kind is Kind.INBOX:
            self.dataplane.on_chunk(msg.payload, parsed.name)  # name: the sending client
        elif parsed.kind is Kind.ARTIFACT_DATA:
            self.fetcher.on_chunk(parsed.name, msg.payload)
        elif parsed.kind is Kind.PROBE:
            await self._on_probe(msg.payload)
        elif parsed.kind is Kind.ASSIGNMENT_DESIRED:
            self.assignments.on_desired(msg.payload)
            if self.assignments.desired is not None:  # know its plan before a stop comes
                await self.plans.follow(self.assignments.desired.model)
        elif parsed.kind is Kind.PLAN:
            self.plans.on_plan(parsed.name, msg.payload)
        elif parsed.kind is Kind.PLANNER_STATUS:
            self.plans.on_planner_status(msg.payload)
        elif parsed.kind is Kind.CMD:
            # its own task: a command may wait for messages this loop must keep consuming
            task = asyncio.create_task(
                self._on_command(parsed.name, codec.decode(msg.payload, Command))
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- commands ----------------------------------------------------------------
    def _device_summary(self) -> dict[str, Any]:
        """What a sweep's samples need to know about the device that timed them."""
        return {
            "gflops": self.measured.gflops,
            "memory_budget_bytes": self.memory_budget_bytes,
            "profile": self.profile.name,
            "profile_gflops": self.profile.gflops_fp32,
        }

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
                    "gflops": self.measured.gflops,
                    "link_rtt_s": self.measured.link_rtt_s,
                    "link_bandwidth_bps": self.measured.link_bandwidth_bps,
                }
            elif name == "sweep":  # time layers for the learned cost model (agent/sweep.py)
                result = await sweep_command(
                    self.agent_id, cmd.args, self.dataplane.executor, self._device_summary()
                )
            else:
                raise EdgesliceError(f"unknown command {name!r}; known: ping, calibrate, sweep")
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
