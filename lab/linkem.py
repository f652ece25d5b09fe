"""Owns link emulation for the testbed: a TCP proxy per agent that shapes bandwidth, delay and loss.

On one machine every agent reaches the broker over loopback, which is faster
and cleaner than any board's Ethernet or Wi-Fi; plans made there would be
wrong on a real fleet. So each emulated agent connects through its own small
asyncio proxy (``--broker mqtt://127.0.0.1:<proxy port>``) that forwards to the
real broker and shapes both directions like the device's ``[link]`` table.
The proxy stands for the device's link, so all connections through one proxy
share its bandwidth; each connection keeps its own byte order.

Per direction, data passes three stages, all on the event loop's clock:

1. **Pacer** (serialisation delay): a piece of ``n`` bytes occupies the link
   for ``n / bandwidth`` seconds and the reader waits that long before reading
   more, so TCP back-pressure reaches the sender as it would on a slow link.
   Pieces are a few milliseconds of link time (see :func:`piece_size`), so a
   large message is paced smoothly rather than in one lump; a credit of one
   piece absorbs timer oversleep so the long-run rate stays exact.
2. **Delay line**: a piece becomes deliverable ``latency_s`` after it left the
   pacer, in order. The line holds many pieces at once (the bandwidth-delay
   product), so latency does not cut throughput the way a per-read sleep would.
3. **Loss, as TCP's user sees it**: a TCP stream cannot drop bytes; a lost
   segment is retransmitted and everything behind it waits (head-of-line
   blocking). So each segment (1448 bytes of a piece) is lost with probability
   ``loss_pct / 100``, and a piece with a lost segment is held back one
   retransmission timeout, ``max(0.2 s, 2 x RTT)`` (Linux's minimum RTO), with
   every later piece behind it. Loss is per segment, not per read, so the
   rate does not depend on how the kernel happens to split reads. What this
   does *not* model: fast retransmit (often one RTT, not an RTO), the
   congestion window shrinking after a loss, and the bandwidth a resend uses.
   The pacer keeps sending while a piece is held back, so loss here costs
   delay and jitter (every message behind a loss waits ~RTO) but almost no
   long-run throughput (25 Mbit/s, 3 ms, 1 % loss: ~23 Mbit/s measured),
   whereas real TCP also loses rate (Mathis: about MSS/RTT x 1.22/sqrt(p)).

The pure parts (:class:`LinkSpec`, :class:`Pacer`, :class:`DelayLine`,
:class:`LossModel`) live in :mod:`lab.linkshape`, tested without sockets.
:class:`LinkProxy` is the in-process asyncio shell; ``python -m edgeslice.lab.linkem``
runs it as a process (:mod:`lab.linkproc`: the process and :class:`LinkProxyProcess`,
which starts and stops it through :class:`lab.supervisor.Supervised`; the process stops
itself when its parent is gone). :meth:`LinkProxy.reshape` changes a running proxy's
shape for every open connection from the next piece on (a link that degrades under load,
nobody reconnects); the process does it on SIGHUP, re-reading its ``--shape-file``
(:meth:`LinkProxyProcess.reshape` writes the file and signals). Only loopback
listen addresses are accepted unless ``allow_remote`` is set: an emulator is
not a service. Accuracy measured on a shared 2-core machine (raw TCP): within
3 % from 2 to 200 Mbit/s; a 940 Mbit/s link reaches ~800 Mbit/s, the limit of
one Python event loop, and unshaped the proxy carries ~300 MB/s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from typing import Any

from edgeslice.broker.protocol.errors import BrokerError, ConfigError
from edgeslice.lab.linkshape import (
    MAX_PIECE,
    DelayLine,
    LinkSpec,
    LinkStats,
    LossModel,
    Pacer,
    is_loopback,
    piece_size,
)

logger = logging.getLogger(__name__)

_MIN_QUEUE = 16 * 1024 * 1024  # delay-line bytes before the reader stops reading


class _Direction:
    """One direction of a proxy's link, shared by its connections: pacer, loss, counters."""

    def __init__(self, spec: LinkSpec, seed: int | str | None) -> None:
        self.spec = spec
        self.piece = piece_size(spec.bandwidth_bps)
        self.pacer = Pacer(spec.bandwidth_bps, burst_bytes=self.piece)
        self.loss = LossModel(spec.loss_pct, spec.retransmit_timeout_s, seed)
        self.queue_limit = _MIN_QUEUE
        if not spec.unlimited:
            in_flight = spec.bandwidth_bps * (spec.latency_s + spec.retransmit_timeout_s)
            self.queue_limit = max(self.queue_limit, int(2 * in_flight))
        self.delivered = 0
        self.seed = seed
        self.lines: set[DelayLine[bytes | None]] = set()  # open connections' delay lines

    def reshape(self, spec: LinkSpec) -> None:
        """Shape from now on like ``spec`` (pieces already in a delay line keep their time)."""
        self.spec, self.piece = spec, piece_size(spec.bandwidth_bps)
        self.pacer.set_rate(spec.bandwidth_bps, burst_bytes=self.piece)
        self.loss = LossModel(spec.loss_pct, spec.retransmit_timeout_s, self.seed)
        if not spec.unlimited:
            in_flight = spec.bandwidth_bps * (spec.latency_s + spec.retransmit_timeout_s)
            self.queue_limit = max(_MIN_QUEUE, int(2 * in_flight))
        for line in self.lines:
            line.latency_s = spec.latency_s

    async def carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Move one connection's bytes from ``reader`` to ``writer`` through the link, then EOF."""
        loop = asyncio.get_running_loop()
        line: DelayLine[bytes | None] = DelayLine(self.spec.latency_s)
        queued, drained = asyncio.Event(), asyncio.Event()

        async def receive() -> None:
            while True:
                while line.bytes_queued >= self.queue_limit:
                    drained.clear()
                    await drained.wait()
                data = await reader.read(self.piece)
                now = loop.time()
                if not data:
                    line.push(now, None, 0)
                    queued.set()
                    return
                left_at = self.pacer.schedule(now, len(data))
                line.push(left_at, data, len(data), self.loss.penalty(len(data)))
                queued.set()
                if left_at > now:
                    await asyncio.sleep(left_at - now)

        async def deliver() -> None:
            while True:
                due = line.next_due()
                if due is None:
                    queued.clear()
                    await queued.wait()
                    continue
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                    continue
                for item in line.pop_due(loop.time()):
                    if item is None:
                        await writer.drain()
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(item)
                    self.delivered += len(item)
                drained.set()
                await writer.drain()

        self.lines.add(line)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(receive())
                group.create_task(deliver())
        finally:
            self.lines.discard(line)


class LinkProxy:
    """An in-process asyncio TCP proxy that shapes both directions like one device's link."""

    def __init__(self, seed: int | None = None, allow_remote: bool = False) -> None:
        self.seed = seed
        self.allow_remote = allow_remote
        self.listen_host = "127.0.0.1"
        self.port = 0
        self.target_host = ""
        self.target_port = 0
        self.spec = LinkSpec()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._up = self._down = _Direction(self.spec, None)
        self._connections = 0

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"mqtt://{host}:{self.port}"

    async def start(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        spec: LinkSpec,
    ) -> LinkProxy:
        """Listen on ``listen_host:listen_port`` (0 = a free port) and forward to the target."""
        if not (self.allow_remote or is_loopback(listen_host)):
            raise ConfigError(
                f"linkem: refusing to listen on {listen_host}: only loopback addresses are "
                "allowed (use 127.0.0.1, or allow_remote/--allow-remote on purpose)"
            )
        self.listen_host, self.target_host, self.target_port = listen_host, target_host, target_port
        self.spec = spec
        up_seed, down_seed = (
            (None, None) if self.seed is None else (f"{self.seed}:up", f"{self.seed}:dn")
        )
        self._up, self._down = _Direction(spec, up_seed), _Direction(spec, down_seed)
        try:
            self._server = await asyncio.start_server(
                self._serve, listen_host, listen_port, limit=MAX_PIECE
            )
        except OSError as exc:
            raise BrokerError(
                f"linkem: cannot listen on {listen_host}:{listen_port}: {exc.strerror or exc} "
                "(port taken? use port 0 for a free one)"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info(
            "linkem listen=%s:%d target=%s:%d link=%s",
            listen_host, self.port, target_host, target_port, spec.describe(),
        )  # fmt: skip
        return self

    def reshape(self, spec: LinkSpec) -> None:
        """Change both directions' shape while running (open connections included)."""
        self.spec = spec
        self._up.reshape(spec)
        self._down.reshape(spec)
        logger.info(
            "linkem listen=%s:%d reshaped: %s", self.listen_host, self.port, spec.describe()
        )

    def stats(self) -> LinkStats:
        """A snapshot of the proxy's counters."""
        return LinkStats(
            bytes_up=self._up.delivered,
            bytes_down=self._down.delivered,
            connections=self._connections,
            open_connections=len(self._tasks),
            held_back_up=self._up.loss.held_back,
            held_back_down=self._down.loss.held_back,
        )

    async def stop(self) -> None:
        """Stop listening and drop every connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: dial the target, carry both directions until both end."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._connections += 1
        streams = [writer]
        try:
            await self._relay(reader, writer, streams)
        except asyncio.CancelledError:
            # Python 3.11's start_server callback calls task.exception() on a cancelled
            # task and logs a traceback; a connection dropped by stop() ends normally.
            if self._server is not None:
                raise
        finally:
            for stream in streams:
                stream.close()
            self._tasks.discard(task)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        streams: list[asyncio.StreamWriter],
    ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            target_reader, target_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port, limit=MAX_PIECE),
                timeout=10.0,
            )
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "linkem cannot reach target=%s:%d for client=%s: %s",
                self.target_host, self.target_port, peer, exc,
            )  # fmt: skip
            return
        streams.append(target_writer)
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._up.carry(reader, target_writer))
                group.create_task(self._down.carry(target_reader, writer))
        except* (ConnectionError, OSError) as errors:
            logger.debug("linkem client=%s connection ended: %r", peer, errors.exceptions[0])


if __name__ == "__main__":  # the process form lives in lab/linkproc.py
    from edgeslice.lab.linkproc import main

    sys.exit(main())
