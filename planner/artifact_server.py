"""Serves sealed stage artifacts to agents: ``artifacts/{sha}/get`` -> chunks on ``.../data``.

The planner keeps every artifact it built (a re-plan to a known cut reuses it) and sends
one on request as a chunked transfer at QoS 1. Agents subscribe to its data topic before
asking, but one that asks while a send is under way may have missed its first chunks, so
such requests are answered by one more send once the current one ends (requests during a
send coalesce into that one; an agent that already has the artifact ignores the repeat).
"""

from __future__ import annotations

import asyncio
import logging

from edgeslice.broker.protocol.chunking import stream_transfer
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.transport import Transport

log = logging.getLogger(__name__)


class ArtifactServer:
    """Artifacts by sha256, and the sends under way (see the module docstring)."""

    def __init__(self, client: Transport, topics: Topics) -> None:
        self.client = client
        self.topics = topics
        self.artifacts: dict[str, bytes] = {}
        self._serving: set[str] = set()
        self._again: set[str] = set()  # asked for during a send: send once more after it
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, sha: str, data: bytes) -> None:
        self.artifacts[sha] = data

    def on_get(self, sha: str) -> None:
        """Someone asked for ``sha``: start a send unless one is under way."""
        data = self.artifacts.get(sha)
        if data is None:
            log.warning("asked for unknown artifact %s", sha[:12])
            return
        if sha in self._serving:
            self._again.add(sha)
            return
        self._serving.add(sha)
        task = asyncio.create_task(self._send(sha, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._serving.discard(sha))

    async def _send(self, sha: str, data: bytes) -> None:
        topic = self.topics.artifact_data(sha)
        while True:
            self._again.discard(sha)
            _header, chunks = stream_transfer(data, request_id=sha[:16], kind="artifact")
            acks = [self.client.publish_nowait(topic, chunk, qos=1) for chunk in chunks]
            try:
                await asyncio.gather(*acks)
            except Exception as exc:
                log.warning("sending artifact=%s failed: %s", sha[:12], exc)
                return
            log.info("served artifact=%s bytes=%d", sha[:12], len(data))
            if sha not in self._again:
                return

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
