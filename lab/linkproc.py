"""Owns the link proxy's process form: ``python -m edgeslice.lab.linkem`` and its supervisor.

:class:`LinkProxyProcess` starts one proxy process (a :class:`lab.supervisor.Supervised`),
learns its port from the ready line, and changes its shape while it runs
(:meth:`LinkProxyProcess.reshape`: write the shape file, SIGHUP). :func:`main` is the
process itself (``lab/linkem.py`` runs it under ``-m``): a :class:`lab.linkem.LinkProxy`
until SIGTERM/SIGINT or until its parent is gone, re-reading ``--shape-file`` on SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from edgeslice.broker.protocol.errors import BrokerError, ConfigError, EdgesliceError
from edgeslice.lab.linkem import LinkProxy
from edgeslice.lab.linkshape import LinkSpec, is_loopback, read_shape_file, write_shape_file
from edgeslice.lab.supervisor import Ready, Supervised

logger = logging.getLogger(__name__)

_READY_LINE = "linkem: listening on"


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
        shape_file: str | None = None,
    ) -> None:
        self.target_host, self.target_port, self.spec = target_host, target_port, spec
        self.shape_file = shape_file
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
        if self.shape_file is not None:
            cmd += ["--shape-file", self.shape_file]
        if not is_loopback(self.listen_host):
            cmd.append("--allow-remote")
        return cmd

    def reshape(self, spec: LinkSpec) -> None:
        """Change the running proxy's shape: write its shape file, then SIGHUP it."""
        if self.shape_file is None:
            raise ConfigError("linkem: reshape needs a proxy started with a shape_file")
        write_shape_file(self.shape_file, spec)
        self.spec = spec
        self.signal(signal.SIGHUP)

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
    loop.add_signal_handler(signal.SIGHUP, _reload, proxy, args.shape_file)
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


def _reload(proxy: LinkProxy, shape_file: str | None) -> None:
    """SIGHUP: apply the shape file; a bad or missing file keeps the current shape."""
    try:
        if shape_file is None:
            raise ConfigError("SIGHUP but no --shape-file to read")
        proxy.reshape(read_shape_file(shape_file))
    except ConfigError as exc:
        _say(f"linkem: shape unchanged ({proxy.spec.describe()}): {exc}")
        return
    _say(f"linkem: reshaped to {proxy.spec.describe()}")


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
    parser.add_argument("--shape-file", default=None, help="JSON shape re-read on SIGHUP")
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
