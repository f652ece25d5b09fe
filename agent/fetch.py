"""Fetches stage artifacts over MQTT on demand: ask the planner, reassemble, verify digest, cache.

The planner serves an artifact's sealed bytes as a chunked transfer on
``artifacts/{sha}/data`` when someone publishes on ``artifacts/{sha}/get``; several agents
asking for the same artifact share one send. The digest is checked here and the planner's
signature by the runtime before anything is deserialized; an artifact the runtime refuses
is deleted from the cache (:meth:`StageRuntime.load` with ``cache``), so the next
assignment fetches it afresh instead of loading it from disk.

Chunks are taken only for an artifact a fetch is waiting for; the artifact's sha (from the
topic) is the reassembler's *sender*, so garbage on one artifact's topic holds at most two
transfers, and half-finished ones expire after ``idle_s`` without a chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid

from edgeslice.agent.runtime import ArtifactCache
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, Refused
from edgeslice.broker.protocol.errors import ArtifactError
from edgeslice.broker.protocol.messages import Command
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport

log = logging.getLogger(__name__)


class ArtifactFetcher:
    """Gets sealed artifacts from the disk cache or from the planner (see module doc)."""

    def __init__(
        self,
        agent_id: str,
        client: Transport,
        topics: Topics,
        cache: ArtifactCache,
        timeout_s: float = 120.0,
        attempts: int = 3,
        idle_s: float = 15.0,
    ) -> None:
        self.agent_id = agent_id
        self.client = client
        self.topics = topics
        self.cache = cache
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.reassembler = Reassembler(
            max_open=16,
            max_age_s=timeout_s,
            max_chunk_bytes=1 << 24,
            max_open_per_sender=2,  # one send, and a resend the planner started after it
            idle_s=idle_s,
        )
        self._expired_at = 0.0
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    async def get(self, sha: str) -> bytes:
        """The sealed artifact ``sha``: from cache, else fetched (retried), verified, cached."""
        cached = await asyncio.to_thread(self.cache.get, sha)
        if cached is not None:
            log.info("agent=%s artifact=%s from cache", self.agent_id, sha[:12])
            return cached
        last_error = ""
        for attempt in range(1, self.attempts + 1):
            try:
                data = await self._fetch_once(sha)
            except TimeoutError:
                last_error = f"no answer within {self.timeout_s:.0f}s"
                log.warning(
                    "agent=%s artifact=%s attempt %d: %s",
                    self.agent_id,
                    sha[:12],
                    attempt,
                    last_error,
                )
                continue
            await asyncio.to_thread(self.cache.put, sha, data)
            return data
        raise ArtifactError(
            f"agent {self.agent_id} could not fetch artifact {sha[:12]} from the planner "
            f"({last_error}, {self.attempts} attempts): is `edgeslice planner` running on "
            "this namespace?"
        )

    async def _fetch_once(self, sha: str) -> bytes:
        loop = asyncio.get_running_loop()
        fut = self._waiting.get(sha)
        if fut is None or fut.done():
            fut = self._waiting[sha] = loop.create_future()
        topic = self.topics.artifact_data(sha)
        await self.client.subscribe(topic, qos=1)
        try:
            request = Command(
                request_id=uuid.uuid4().hex,
                name="artifact",
                sender=self.agent_id,
                args={"sha256": sha},
                ts=time.time(),
            )
            await self.client.publish(self.topics.artifact_get(sha), codec.encode(request), qos=1)
            started = time.perf_counter()
            data = await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
            log.info(
                "agent=%s artifact=%s fetched bytes=%d seconds=%.2f",
                self.agent_id,
                sha[:12],
                len(data),
                time.perf_counter() - started,
            )
            return data
        finally:
            await self.client.unsubscribe(topic)

    def on_chunk(self, sha: str, payload: bytes) -> None:
        """An ``artifacts/{sha}/data`` chunk; completes the waiting fetch when whole."""
        waiting = self._waiting.get(sha)
        if waiting is None or waiting.done():
            return  # nobody here asked for it (a late resend, or garbage): hold nothing
        now = time.time()
        if now - self._expired_at >= 1.0:
            self._expired_at = now
            for refused in self.reassembler.expire(now):
                log.warning(
                    "agent=%s artifact=%s transfer dropped: %s %s",
                    self.agent_id,
                    refused.sender[:12],
                    refused.reason,
                    refused.detail,
                )
        result = self.reassembler.feed(payload, now, sender=sha)
        if result is None:
            return
        if isinstance(result, Refused):
            if result.is_error:
                log.warning(
                    "agent=%s artifact=%s chunk refused: %s %s",
                    self.agent_id,
                    sha[:12],
                    result.reason,
                    result.detail,
                )
            return
        assert isinstance(result, Completed)
        fut = self._waiting.get(sha)
        if fut is None or fut.done():
            return
        digest = hashlib.sha256(result.payload).hexdigest()
        if digest != sha:
            log.warning(
                "agent=%s artifact=%s arrived with digest %s; asking again",
                self.agent_id,
                sha[:12],
                digest[:12],
            )
            return
        fut.set_result(bytes(result.payload))
