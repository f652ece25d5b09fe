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
runs it as a process, which :class:`LinkProxyProcess` starts and stops through
:class:`lab.supervisor.Supervised`; the process also stops itself when the
process that started it is gone (``--parent-pid``: it polls its parent pid). Only loopback
listen addresses are accepted unless ``allow_remote`` is set: an emulator is
not a service. Accuracy measured on a shared 2-core machine (raw TCP): within
3 % from 2 to 200 Mbit/s; a 940 Mbit/s link reaches ~800 Mbit/s, the limit of
one Python event loop, and unshaped the proxy carries ~300 MB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from edgeslice.broker.protocol.errors import BrokerError, ConfigError, EdgesliceError
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
from edgeslice.lab.supervisor import Ready, Supervised

logger = logging.getLogger(__name__)

_MIN_QUEUE = 16 * 1024 * 1024  # delay-line bytes before the reader stops reading
_READY_LINE = "linkem: listening on"


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

        async with asyncio.TaskGroup() as group:
            group.create_task(receive())
            group.create_task(deliver())


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


# -- process form: `python -m edgeslice.lab.linkem`, driven by LinkProxyProcess -------------
class LinkProxyProcess(Supervised):
    """A ``python -m edgeslice.lab.linkem`` child process (a :class:`Supervised`).

    With ``listen_port=0`` the proxy binds a free port itself and names it in its ready
    line, so no other process can take the port between choosing and binding it.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        spec: LinkSpec,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
        log_path: str | None = None,
    ) -> None:
        self.target_host, self.target_port, self.spec = target_host, target_port, spec
        self.listen_host, self.port, self.seed = listen_host, listen_port, seed
        super().__init__("linkem", self.command(), log_path)

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"mqtt://{host}:{self.port}"

    def start(self, ready: Ready = None, timeout: float = 10.0) -> LinkProxyProcess:
        """Start the proxy; return once it listens. BrokerError (with the log tail) if not."""
        try:
            super().start(ready or self._listening, timeout)
        except EdgesliceError as exc:
            raise BrokerError(f"linkem on {self.url}: {exc}") from None
        target = f"{self.target_host}:{self.target_port}"
        logger.info("linkem pid=%s url=%s -> %s", self.pid, self.url, target)
        return self

    def command(self) -> list[str]:
        """The ``python -m edgeslice.lab.linkem`` command line for this proxy."""
        host = f"[{self.target_host}]" if ":" in self.target_host else self.target_host
        cmd = [sys.executable, "-m", "edgeslice.lab.linkem", "--listen-host", self.listen_host]
        cmd += ["--listen-port", str(self.port), "--target", f"{host}:{self.target_port}"]
        cmd += ["--bandwidth-mbit", repr(self.spec.bandwidth_bps * 8 / 1e6)]
        cmd += ["--latency-ms", repr(self.spec.latency_s * 1000)]
        cmd += ["--loss-pct", repr(self.spec.loss_pct), "--parent-pid", str(os.getpid())]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if not is_loopback(self.listen_host):
            cmd.append("--allow-remote")
        return cmd

    def _listening(self) -> bool:
        """Ready check: the ready line is in the log; takes the port it names."""
        for line in self.log_tail().splitlines():
            if line.startswith(_READY_LINE):
                self.port = int(line.split()[3].rpartition(":")[2])
                return True
        return False


def _say(text: str) -> None:
    """One line on stdout, which LinkProxyProcess captures as the proxy log."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace, target: tuple[str, int], spec: LinkSpec) -> int:
    proxy = LinkProxy(seed=args.seed, allow_remote=args.allow_remote)
    try:
        await proxy.start(args.listen_host, args.listen_port, *target, spec)
    except (BrokerError, ConfigError) as exc:
        _say(str(exc))  # already says "linkem: ..."
        return 1
    _say(f"{_READY_LINE} {args.listen_host}:{proxy.port} -> {args.target} ({spec.describe()})")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            _say(f"linkem: parent process {args.parent_pid} is gone; stopping")
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
    stats = proxy.stats()
    await proxy.stop()
    _say(f"linkem: stopped (up {stats.bytes_up} B, down {stats.bytes_down} B)")
    return 0


def _parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--target {text!r} is not HOST:PORT (e.g. 127.0.0.1:1883)")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """``python -m broker.linkem``: one shaping proxy until SIGTERM/SIGINT; exit 2 on bad flags."""
    parser = argparse.ArgumentParser(
        prog="python -m broker.linkem", description="a TCP proxy that emulates one device's link"
    )
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--target", required=True, help="HOST:PORT of the real broker")
    parser.add_argument("--bandwidth-mbit", type=float, default=0.0, help="0 = unlimited")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="one-way, each direction")
    parser.add_argument("--loss-pct", type=float, default=0.0, help="per-segment loss, percent")
    parser.add_argument("--seed", type=int, default=None, help="makes the loss pattern repeat")
    parser.add_argument("--allow-remote", action="store_true", help="listen on a non-loopback")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when it is gone")
    args = parser.parse_args(argv)
    try:
        target = _parse_target(args.target)
        spec = LinkSpec.from_mbit(args.bandwidth_mbit, args.latency_ms, args.loss_pct)
    except ConfigError as exc:
        _say(f"linkem: error: {exc}")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s: %(message)s")
    return asyncio.run(_run(args, target, spec))


if __name__ == "__main__":
    sys.exit(main())
