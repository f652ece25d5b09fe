"""Owns the planner's Prometheus metrics: the plan it serves and the fleet it plans on.

The plan figures are read from the service when Prometheus scrapes (version, ready,
stages, the predicted latency and period, and per stage the predicted compute and
transfer time and the replica count), so they always describe the plan being served,
adopted ones included. ``edgeslice_planner_plans_published_total`` counts plan versions
as they go out (``kind`` ``plan`` or ``withdrawn``), through the service's ``on_plan``
callback, which this module chains in front of any callback already set.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeslice.broker.metrics import MetricsEndpoint, MetricsServer
from edgeslice.broker.protocol.messages import PlanMessage

if TYPE_CHECKING:
    from edgeslice.planner.service import PlannerService

log = logging.getLogger(__name__)


class PlannerMetrics:
    """The metrics of one :class:`PlannerService`, in their own registry."""

    def __init__(self, service: PlannerService, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or CollectorRegistry()
        self.published = Counter(
            "edgeslice_planner_plans_published",
            "Plan versions published: kind=plan (a new layout) or withdrawn (no plan fits).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("plan", "withdrawn"):
            self.published.labels(kind)
        self.registry.register(_PlannerState(service))

    def on_plan(self, plan: PlanMessage) -> None:
        self.published.labels("plan" if plan.stages else "withdrawn").inc()


class _PlannerState(Collector):
    """Gauges read from the service at scrape time (HTTP thread: plain attribute reads)."""

    def __init__(self, service: PlannerService) -> None:
        self.service = service
        self._usable = 0
        self._known = 0

    def collect(self) -> Iterator[Metric]:
        service = self.service
        config = service.config
        info = GaugeMetricFamily(
            "edgeslice_planner_info",
            "This planner: the model it serves, its strategy and objective.",
            labels=["model", "planner_id", "strategy", "objective"],
        )
        model = service.model_name or config.model_spec
        info.add_metric([model, config.planner_id, config.strategy, config.objective], 1)
        yield info
        try:  # the event loop may fold a message in meanwhile: keep the last good count
            self._usable = len(service.registry.usable_ids())
            self._known = len(service.registry.agents)
        except RuntimeError:
            log.debug("metrics: fleet changed during the scrape; last counts kept")
        yield _gauge("agents_usable", "Agents the planner may place stages on.", self._usable)
        yield _gauge("agents_known", "Agents seen (any state).", self._known)
        plan = service.plan_message
        yield _gauge("plan_version", "Version of the plan served (0: none yet).", service.version)
        yield _gauge("plan_ready", "1 when every agent of the plan reported ready.", _ready(plan))
        yield _gauge("plan_stages", "Pipeline stages of the plan.", len(plan.stages) if plan else 0)
        withdrawn = plan is not None and not plan.stages
        yield _gauge("plan_withdrawn", "1 while no plan fits the usable agents.", withdrawn)
        if plan is None:
            return
        yield _gauge(
            "predicted_latency_seconds",
            "Predicted latency of one request on the plan.",
            plan.predicted_latency_s,
        )
        yield _gauge(
            "predicted_period_seconds",
            "Predicted time between results at full load (the slowest stage).",
            plan.predicted_period_s,
        )
        per_stage = {
            "stage_predicted_compute_seconds": "Predicted compute time of each stage.",
            "stage_predicted_transfer_seconds": "Predicted time to send each stage's output.",
            "stage_replicas": "Agents running each stage.",
        }
        families = {
            name: GaugeMetricFamily(f"edgeslice_planner_{name}", doc, labels=["stage"])
            for name, doc in per_stage.items()
        }
        for stage in plan.stages:
            label = [str(stage.stage)]
            families["stage_predicted_compute_seconds"].add_metric(label, stage.predicted_compute_s)
            families["stage_predicted_transfer_seconds"].add_metric(
                label, stage.predicted_transfer_s
            )
            families["stage_replicas"].add_metric(label, len(stage.agents))
        yield from families.values()


def _ready(plan: PlanMessage | None) -> bool:
    return plan is not None and bool(plan.stages) and plan.ready


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"edgeslice_planner_{name}", doc, value=float(value))


def serve_planner_metrics(service: PlannerService, endpoint: MetricsEndpoint) -> MetricsServer:
    """Define the planner's metrics, count its plans and serve ``/metrics``."""
    metrics = PlannerMetrics(service)
    before = service.on_plan

    def on_plan(plan: PlanMessage) -> None:
        metrics.on_plan(plan)
        if before is not None:
            before(plan)

    service.on_plan = on_plan
    return MetricsServer(metrics.registry, endpoint)
