"""Owns the agent's Prometheus metrics: what one agent did, holds and measured.

Two kinds of figures:

* **events**, observed as they happen through the data plane's ``on_outcome`` hook (one
  call per stage run, with its :class:`StageTiming`, and one per error reply, with its
  :class:`ErrorReply`): requests by outcome, errors by code, and per-stage histograms of
  the time a request waited for the stage worker (``queue``) and the stage's run
  (``compute``; a batch's run for every request in it);
* **state**, read from the service when Prometheus scrapes: queue depth, requests held,
  busy share of the stage worker, CPU, memory, the calibrated GFLOP/s and the link
  figures of the start-up test (round trip, throughput through the broker).

Outcomes: ``ok`` (the stage ran, its output went on), ``failed`` (a final error: the
request fails), ``refused`` (a retryable error, e.g. busy, draining, plan changed, a
transfer refused: the client retries elsewhere or on the new plan). Metric names follow
Prometheus conventions (``_total`` counters, ``_seconds``, ``_bytes``); every series of
one process is one agent, whose id is in ``edgeslice_agent_info``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from edgeslice.agent.telemetry import TelemetrySampler
from edgeslice.broker.metrics import LATENCY_BUCKETS, MetricsEndpoint, MetricsServer
from edgeslice.broker.protocol.messages import DRAINING, ErrorReply, StageTiming

if TYPE_CHECKING:
    from edgeslice.agent.service import AgentService

log = logging.getLogger(__name__)

BUSY_WINDOW_S = 30.0  # edgeslice_agent_busy_ratio: share of the last this-many seconds


class AgentMetrics:
    """The metrics of one :class:`AgentService`, in their own registry."""

    def __init__(self, service: AgentService, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "edgeslice_agent_requests",
            "Stage runs of requests on this agent by outcome: ok, failed (final error), "
            "refused (retryable error: busy, draining, plan changed; the client retries).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("ok", "failed", "refused"):
            self.requests.labels(outcome)  # present at 0 from the start
        self.errors = Counter(
            "edgeslice_agent_request_errors",
            "Error replies sent to clients, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "edgeslice_agent_stage_queue_seconds",
            "Time a request waited for the stage worker (incl. the wait for its batch).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "edgeslice_agent_stage_compute_seconds",
            "Time the stage ran for a request (a batch's run for each request in it).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._busy: collections.deque[tuple[float, float]] = collections.deque()
        self._lock = threading.Lock()
        self.registry.register(_AgentState(self))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds

    def observe(self, outcome: StageTiming | ErrorReply) -> None:
        """The data plane's hook (stage thread or event loop): one stage run or error reply."""
        if isinstance(outcome, ErrorReply):
            self.requests.labels("refused" if outcome.retryable else "failed").inc()
            self.errors.labels(outcome.code or "unknown").inc()
            return
        stage = str(outcome.stage)
        self.requests.labels("ok").inc()
        self.queue_seconds.labels(stage).observe(outcome.queue_s)
        self.compute_seconds.labels(stage).observe(outcome.compute_s)
        batch = max(1, int(getattr(outcome, "batch", 1) or 1))
        with self._lock:
            self._busy.append((time.monotonic(), outcome.compute_s / batch))

    def busy_ratio(self, now: float | None = None) -> float:
        """Share of the last :data:`BUSY_WINDOW_S` the stage worker spent computing."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._busy and self._busy[0][0] < now - BUSY_WINDOW_S:
                self._busy.popleft()
            busy = sum(seconds for _, seconds in self._busy)
        window = min(BUSY_WINDOW_S, max(1e-3, time.time() - self.service.started))
        return min(1.0, busy / window)


class _AgentState(Collector):
    """Gauges read from the service at scrape time (HTTP thread: plain attribute reads)."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self.sampler: TelemetrySampler | None = None

    def collect(self) -> Iterator[Metric]:
        service = self.metrics.service
        dp = service.dataplane
        info = GaugeMetricFamily(
            "edgeslice_agent_info",
            "This agent: id, firmware profile, host, whether emulated.",
            labels=["agent_id", "profile", "hostname", "emulated"],
        )
        emulated = "true" if service.config.emulate else "false"
        info.add_metric([service.agent_id, service.profile.name, service.hostname, emulated], 1)
        yield info
        serving = service.serving.is_set() and service.state != DRAINING
        yield _gauge("serving", "1 while the agent takes new requests.", float(serving))
        yield _gauge("draining", "1 while the agent drains.", float(service.state == DRAINING))
        yield _gauge("queue_depth", "Requests waiting for the stage worker.", dp.queue_depth)
        yield _gauge("in_flight", "Requests held: queued, computing or sending.", dp.in_flight)
        yield _gauge(
            "busy_ratio",
            f"Share of the last {BUSY_WINDOW_S:g} s the stage worker computed (load).",
            self.metrics.busy_ratio(),
        )
        yield _gauge("stages_loaded", "Stage artifacts loaded.", len(service.runtime.loaded()))
        yield _gauge("calibrated_gflops", "GFLOP/s measured at start-up.", service.measured.gflops)
        yield _gauge(
            "memory_budget_bytes", "Memory the planner may fill.", service.memory_budget_bytes
        )
        yield _gauge(
            "link_rtt_seconds",
            "Round trip through the broker (link test).",
            service.measured.link_rtt_s,
        )
        yield _gauge(
            "link_bandwidth_bytes_per_second",
            "Throughput through the broker (link test).",
            service.measured.link_bandwidth_bps,
        )
        malformed = CounterMetricFamily(
            "edgeslice_agent_malformed_messages", "Messages dropped as malformed."
        )
        malformed.add_metric([], service.malformed)
        yield malformed
        yield from self._machine()

    def _machine(self) -> Iterator[Metric]:
        """CPU, memory, load and temperature, from the telemetry sampler (psutil)."""
        try:
            if self.sampler is None:
                self.sampler = TelemetrySampler(self.metrics.service.agent_id)
            t = self.sampler.sample()
        except Exception as exc:  # a scrape never fails for a sensor
            log.debug("metrics: machine sample failed: %s", exc)
            return
        yield _gauge("cpu_percent", "CPU use since the last scrape, percent.", t.cpu_percent)
        yield _gauge("memory_used_bytes", "Memory in use on the machine.", t.mem_used_bytes)
        yield _gauge("memory_total_bytes", "Memory installed.", t.mem_total_bytes)
        if t.load_avg:
            yield _gauge("load_average_1m", "The machine's 1-minute load average.", t.load_avg[0])
        if t.temperature_c is not None:
            yield _gauge("temperature_celsius", "Hottest CPU sensor.", t.temperature_c)


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"edgeslice_agent_{name}", doc, value=float(value))


def serve_agent_metrics(service: AgentService, endpoint: MetricsEndpoint) -> MetricsServer:
    """Define the agent's metrics, hook them to its data plane and serve ``/metrics``."""
    metrics = AgentMetrics(service)
    service.dataplane.on_outcome = metrics.observe
    return MetricsServer(metrics.registry, endpoint)
