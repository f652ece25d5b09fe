"""Owns what the agent's and the planner's Prometheus endpoints share: options, server.

Metrics are optional twice over: ``prometheus_client`` comes with the ``metrics`` extra
(``pip install 'edgeslice[metrics]'``), and ``/metrics`` is served only when
``--metrics-port`` (``EDGESLICE_METRICS_PORT``) is given. It binds 127.0.0.1 unless
``--metrics-host`` says otherwise: the figures name agents, models and hosts, so
exposing them is a choice (``--metrics-host 0.0.0.0`` for a Prometheus elsewhere).
Each service gets its own registry, so an agent and a planner (or a whole fleet in one
test process) never mix their series. The metric definitions live with each side
(agent/metrics.py, planner/metrics.py); nothing here imports prometheus_client at import
time.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from edgeslice.broker.protocol.errors import ConfigError

EXTRA_HINT = "pip install 'edgeslice[metrics]'"
DEFAULT_HOST = "127.0.0.1"
# request and stage latencies, from a fast x86 stage (~1 ms) to a Pi 3 running a big one
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class MetricsEndpoint:
    """Where ``/metrics`` is served; port 0 picks a free port (the server says which)."""

    host: str
    port: int


def prometheus_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


def require_prometheus(option: str = "--metrics-port") -> None:
    """One line naming the extra when prometheus_client is missing."""
    if not prometheus_available():
        raise ConfigError(f"{option} needs prometheus_client, which is not installed: {EXTRA_HINT}")


F = TypeVar("F", bound=Callable[..., Any])


def metrics_options(func: F) -> F:
    """Add --metrics-port/--metrics-host and pass ``metrics`` (a MetricsEndpoint or None)."""

    @click.option(
        "--metrics-port",
        type=click.IntRange(0, 65535),
        envvar="EDGESLICE_METRICS_PORT",
        default=None,
        help="Serve Prometheus metrics on http://HOST:PORT/metrics (off by default; needs "
        f"the 'metrics' extra: {EXTRA_HINT}). [env EDGESLICE_METRICS_PORT]",
    )
    @click.option(
        "--metrics-host",
        envvar="EDGESLICE_METRICS_HOST",
        default=DEFAULT_HOST,
        show_default=True,
        help="Address /metrics binds; 0.0.0.0 for a Prometheus on another machine. "
        "[env EDGESLICE_METRICS_HOST]",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        port = kwargs.pop("metrics_port")
        host = kwargs.pop("metrics_host")
        endpoint = None
        if port is not None:
            try:
                require_prometheus()
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            endpoint = MetricsEndpoint(host, port)
        return func(*args, metrics=endpoint, **kwargs)

    return wrapper  # type: ignore[return-value]


class MetricsServer:
    """``/metrics`` of one registry on a daemon thread; :meth:`close` stops it."""

    def __init__(self, registry: Any, endpoint: MetricsEndpoint) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(
                endpoint.port, addr=endpoint.host, registry=registry
            )
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {endpoint.port} on {endpoint.host}: {exc.strerror or exc}"
            ) from None
        self.host = endpoint.host
        self.port = int(self._server.server_port)
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
