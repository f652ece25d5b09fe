"""Runs the amqtt development broker in its own process (``python -m
edgeslice.lab.amqtt_runner``), for :class:`edgeslice.lab.server.LocalBroker` when
mosquitto is not installed.

The runner also polls its parent pid (``--parent-pid``), which covers a broker started
from a thread other than the main one, where no parent-death signal is set.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any


def amqtt_dev_config(host: str, port: int) -> dict[str, Any]:
    """amqtt config for ``host:port``: anonymous, no packet logger, no $SYS (less overhead).

    amqtt 0.12 has no packet size or queue limit to set (256 MiB and unbounded).
    """
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "listeners": {"default": {"type": "tcp", "bind": bind, "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def _say(text: str) -> None:
    """One line on the runner's stderr, which LocalBroker captures as the broker log."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_amqtt(host: str, port: int, parent_pid: int | None = None) -> int:
    """Run an amqtt broker until SIGTERM/SIGINT or until ``parent_pid`` is no longer our parent."""
    import asyncio

    from amqtt.broker import Broker

    async def serve() -> None:
        broker = Broker(amqtt_dev_config(host, port))
        await broker.start()
        _say(f"amqtt listening on {host}:{port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def watch_parent() -> None:
            while parent_pid is not None and os.getppid() == parent_pid:
                await asyncio.sleep(0.5)
            if parent_pid is not None:
                _say(f"parent process {parent_pid} is gone; stopping")
                stop.set()

        watcher = asyncio.create_task(watch_parent())
        await stop.wait()
        watcher.cancel()
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=3.0)
        except Exception as exc:  # a slow or failing shutdown must not keep the port busy
            _say(f"amqtt shutdown did not finish cleanly: {exc!r}")

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve())
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="internal: run the amqtt development broker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    return run_amqtt(args.host, args.port, args.parent_pid)


if __name__ == "__main__":
    sys.exit(_main())
