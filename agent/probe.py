"""The agent's own probe topic: the link test, and one live agent per ``--id``.

``agents/{id}/probe`` is the one topic an agent may both publish and read (see the ACL in
lab/mosquitto_conf.py), so it carries two things:

* **Link test** payloads: an 8-byte big-endian sequence number (small, so the first byte
  is 0) plus padding; the agent times their round trip agent -> broker -> agent.
* **Presence** messages (msgpack maps, first byte never 0): a starting agent publishes a
  ``Command(name="presence")`` hello with its session; an agent already running under that
  id answers with a ``CommandResult`` naming its session and host.

Why presence: two agents with the same id (the default is the host name) would take the
MQTT client id ``agent-{id}`` from each other once a second forever. So before it
connects under that client id, :func:`claim_id` opens a side connection, says hello and
listens. An answer from another session means the id is taken: :class:`ConfigError` with
a one-line message; the running agent is never disturbed. How long to listen: the hello's
own echo marks when the running agent has it too (the broker delivers both at once), so a
short window after the echo suffices; when the retained status says another session is
online (delivered before the echo) the window grows, for a busy device, and if nothing
answers the status is stale (a device that lost power) and the id is free. Two agents
starting at once both say hello; the older session answers, the younger one yields.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import struct
import time
import uuid

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import ConfigError, EdgesliceError
from edgeslice.broker.protocol.messages import (
    DRAINING,
    ONLINE,
    Command,
    CommandResult,
    Message,
    Status,
)
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport, TransportFactory

log = logging.getLogger(__name__)

PRESENCE = "presence"
ECHO_TIMEOUT_S = 5.0  # no echo of our own hello: the broker is not routing the probe topic
MIN_ANSWER_WINDOW_S = 0.25  # after the echo, when nothing says the id is in use
LIVE_ANSWER_WINDOW_S = 3.0  # after the echo, when a retained status says it is online
LIVE = (ONLINE, DRAINING)  # a draining agent still runs (and answers) under its id


def is_link_probe(payload: bytes) -> bool:
    return payload[:1] == b"\x00"


def hello(session: int, hostname: str) -> Command:
    return Command(
        request_id=uuid.uuid4().hex,
        name=PRESENCE,
        sender=hostname,
        args={"session": session, "hostname": hostname},
        ts=time.time(),
    )


def here(agent_id: str, to: Command, session: int, hostname: str) -> CommandResult:
    """The answer of the agent that runs under ``agent_id`` to someone's hello."""
    return CommandResult(
        request_id=to.request_id,
        agent_id=agent_id,
        name=PRESENCE,
        ok=True,
        result={"session": session, "hostname": hostname},
        ts=time.time(),
    )


def decode_presence(payload: bytes) -> Command | CommandResult | None:
    """A presence hello or answer; None for anything else (raises on undecodable bytes)."""
    msg: Message = codec.decode(payload)
    if isinstance(msg, Command | CommandResult) and msg.name == PRESENCE:
        return msg
    return None


def clash_message(agent_id: str, session: object, hostname: object) -> str:
    return (
        f"agent id {agent_id!r} is already online (session {session}, host {hostname}): "
        "give this agent another --id"
    )


async def claim_id(
    connect: TransportFactory,
    topics: Topics,
    agent_id: str,
    session: int,
    hostname: str,
    live_window_s: float = LIVE_ANSWER_WINDOW_S,
) -> None:
    """Return once no other live agent runs under ``agent_id``; else ConfigError naming it."""
    probe = topics.probe(agent_id)
    side = connect(f"agent-{agent_id}-check-{session}")
    await side.connect()
    try:
        await side.subscribe(topics.status(agent_id), qos=1)
        await side.subscribe(probe, qos=1)
        mine = hello(session, hostname)
        sent = time.monotonic()
        await side.publish(probe, codec.encode(mine), qos=1)
        stale: Status | None = None
        until = sent + ECHO_TIMEOUT_S
        while (remaining := until - time.monotonic()) > 0:
            msg = await side.next_message(remaining)
            if msg is None:
                break
            if msg.topic != probe:
                status = _status(msg.payload)
                if status is not None and status.state in LIVE and status.session != session:
                    stale = status
                continue
            if is_link_probe(msg.payload):
                continue
            seen = _presence(msg.payload)
            if isinstance(seen, CommandResult) and seen.request_id == mine.request_id:
                other = seen.result.get("session")
                if other != session:
                    raise ConfigError(clash_message(agent_id, other, seen.result.get("hostname")))
            elif isinstance(seen, Command) and seen.request_id == mine.request_id:
                rtt = time.monotonic() - sent  # our echo: the running agent has it too
                window = live_window_s if stale is not None else MIN_ANSWER_WINDOW_S
                until = time.monotonic() + max(window, 4 * rtt)
            elif isinstance(seen, Command) and _session(seen) > session:
                # another agent starting under this id, younger than us: we answer, it yields
                await side.publish(probe, codec.encode(here(agent_id, seen, session, hostname)))
        if stale is not None:
            log.warning(
                "agent=%s retained status says session %d is online, but nobody answers "
                "under this id: taking it over",
                agent_id,
                stale.session,
            )
    finally:
        await side.close()


def _status(payload: bytes) -> Status | None:
    try:
        return codec.decode(payload, Status) if payload else None
    except EdgesliceError:
        return None


def _presence(payload: bytes) -> Command | CommandResult | None:
    try:
        return decode_presence(payload)
    except EdgesliceError:
        return None


def _session(cmd: Command) -> int:
    value = cmd.args.get("session")
    return value if isinstance(value, int) else 0


class LinkTest:
    """Round trip and throughput agent -> broker -> agent on the agent's probe topic."""

    def __init__(self, client: Transport, topic: str) -> None:
        self.client = client
        self.topic = topic
        self._waiters: dict[int, asyncio.Future[float]] = {}

    async def run(self, test_bytes: int) -> tuple[float, float]:
        """(median round trip s, bytes/s) of 5 small probes, then ``test_bytes`` in 4 parts.

        The bulk part's time less the least small round trip is its transfer time, but
        never less than half the bulk part's time: on a busy link a small probe can wait
        behind other traffic longer than the bulk part takes, and ``elapsed - rtt`` near
        or below 0 made absurd figures (256 KiB / 1 us = 262 GB/s, seen in the soak)."""
        rtts = []
        for i in range(5):
            rtts.append(await self._roundtrip(i, 8))
        size = max(test_bytes, 16 * 1024)
        count = 4
        start = time.perf_counter()
        waits = [self._roundtrip(100 + i, size // count) for i in range(count)]
        await asyncio.wait_for(asyncio.gather(*waits), 30.0)
        elapsed = time.perf_counter() - start
        return statistics.median(rtts), size / max(elapsed - min(rtts), elapsed / 2)

    async def _roundtrip(self, seq: int, size: int) -> float:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[seq] = fut
        start = time.perf_counter()
        payload = struct.pack("!Q", seq) + os.urandom(max(0, size - 8))
        await self.client.publish(self.topic, payload, qos=1)
        try:
            await asyncio.wait_for(fut, 10.0)
        finally:
            self._waiters.pop(seq, None)
        return time.perf_counter() - start

    def on_probe(self, payload: bytes) -> None:
        if len(payload) >= 8:
            fut = self._waiters.get(struct.unpack("!Q", payload[:8])[0])
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())
