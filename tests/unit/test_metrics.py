"""Prometheus ``/metrics`` of a planner and two agents serving requests in one process."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from memfleet import MLP_SPEC, SETTINGS, agent_config, eventually, key_file, running  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from edgeslice.agent.cli import agent_cmd  # noqa: E402
from edgeslice.agent.metrics import AgentMetrics, serve_agent_metrics  # noqa: E402
from edgeslice.agent.service import AgentService  # noqa: E402
from edgeslice.broker import metrics as broker_metrics  # noqa: E402
from edgeslice.broker.memory import MemoryBroker  # noqa: E402
from edgeslice.broker.metrics import MetricsEndpoint, MetricsServer  # noqa: E402
from edgeslice.broker.protocol.errors import ConfigError  # noqa: E402
from edgeslice.broker.protocol.messages import ErrorReply  # noqa: E402
from edgeslice.client.inference import InferenceClient  # noqa: E402
from edgeslice.planner.cli import planner_cmd  # noqa: E402
from edgeslice.planner.config import PlannerConfig  # noqa: E402
from edgeslice.planner.metrics import serve_planner_metrics  # noqa: E402
from edgeslice.planner.service import PlannerService  # noqa: E402

ANY_PORT = MetricsEndpoint("127.0.0.1", 0)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """GET /metrics and index every sample by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_planner_and_agents_serve_metrics_for_the_requests_they_ran(tmp_path: Path) -> None:
    async def scenario() -> tuple[Samples, Samples, list[Samples]]:
        broker = MemoryBroker()
        config = PlannerConfig(
            model_spec=MLP_SPEC,
            broker=SETTINGS,
            min_agents=2,
            max_segments=4,
            replan_delay_s=0.05,
            fleet_key_file=key_file(tmp_path),
        )
        planner = PlannerService(config, transport=broker.factory)
        agents = [
            AgentService(agent_config(name, tmp_path), transport=broker.factory)
            for name in ("a1", "a2")
        ]
        servers = [serve_planner_metrics(planner, ANY_PORT)]
        servers += [serve_agent_metrics(agent, ANY_PORT) for agent in agents]
        try:
            before = await asyncio.to_thread(scrape, servers[0].url)
            async with running(planner.run), running(agents[0].run), running(agents[1].run):
                await eventually(lambda: planner.model_name, what="model loaded")
                async with InferenceClient(
                    SETTINGS, planner.model_name, transport=broker.factory
                ) as client:
                    await client.wait_ready(timeout=90.0)
                    batch = [torch.randn(1, 16) for _ in range(5)]
                    await asyncio.gather(*(client.infer(x, timeout=60.0) for x in batch))
                planned = await asyncio.to_thread(scrape, servers[0].url)
                served = [await asyncio.to_thread(scrape, s.url) for s in servers[1:]]
        finally:
            for server in servers:
                server.close()
        return before, planned, served

    before, planned, served = asyncio.run(scenario())
    assert value(before, "edgeslice_planner_plan_version") == 0
    assert value(before, "edgeslice_planner_plans_published_total", kind="plan") == 0

    assert value(planned, "edgeslice_planner_plan_version") >= 1
    assert value(planned, "edgeslice_planner_plan_ready") == 1
    assert value(planned, "edgeslice_planner_agents_usable") == 2
    assert value(planned, "edgeslice_planner_plans_published_total", kind="plan") >= 1
    stages = int(value(planned, "edgeslice_planner_plan_stages"))
    assert stages >= 1
    for stage in range(stages):
        predicted = value(
            planned, "edgeslice_planner_stage_predicted_compute_seconds", stage=str(stage)
        )
        assert predicted > 0
        assert value(planned, "edgeslice_planner_stage_replicas", stage=str(stage)) >= 1
    assert value(planned, "edgeslice_planner_predicted_period_seconds") > 0

    # every request ran every stage once, on one agent or the other
    ok = sum(value(s, "edgeslice_agent_requests_total", outcome="ok") for s in served)
    assert ok == 5 * stages
    assert sum(value(s, "edgeslice_agent_requests_total", outcome="failed") for s in served) == 0
    computed = sum(total(s, "edgeslice_agent_stage_compute_seconds_count") for s in served)
    queued = sum(total(s, "edgeslice_agent_stage_queue_seconds_count") for s in served)
    assert computed == queued == 5 * stages
    for samples, agent_id in zip(served, ("a1", "a2"), strict=True):
        info = [labels for (name, labels), _ in samples.items() if name == "edgeslice_agent_info"]
        assert dict(info[0])["agent_id"] == agent_id
        assert dict(info[0])["profile"] == "x86-laptop"
        assert value(samples, "edgeslice_agent_serving") == 1
        assert value(samples, "edgeslice_agent_queue_depth") == 0
        assert 0 <= value(samples, "edgeslice_agent_busy_ratio") <= 1
        assert value(samples, "edgeslice_agent_link_rtt_seconds") > 0
        assert value(samples, "edgeslice_agent_link_bandwidth_bytes_per_second") > 0
        assert value(samples, "edgeslice_agent_calibrated_gflops") > 0
        assert value(samples, "edgeslice_agent_memory_total_bytes") > 0
        assert value(samples, "process_resident_memory_bytes") > 0
    # a stage that ran has its histogram buckets
    busiest = max(served, key=lambda s: value(s, "edgeslice_agent_requests_total", outcome="ok"))
    assert value(busiest, "edgeslice_agent_busy_ratio") > 0


def test_error_replies_count_as_failed_or_refused_by_their_retryable_flag(tmp_path: Path) -> None:
    agent = AgentService(agent_config("a1", tmp_path), transport=MemoryBroker().factory)
    metrics = AgentMetrics(agent)
    agent.dataplane.on_outcome = metrics.observe
    final = ErrorReply(error="boom", stage=0, agent="a1", retryable=False, code="stage_failed")
    busy = ErrorReply(error="busy", stage=0, agent="a1", retryable=True, code="busy")
    agent.dataplane.on_outcome(final)
    for _ in range(2):
        agent.dataplane.on_outcome(busy)
    server = MetricsServer(metrics.registry, ANY_PORT)
    try:
        samples = scrape(server.url)
    finally:
        server.close()
    assert value(samples, "edgeslice_agent_requests_total", outcome="failed") == 1
    assert value(samples, "edgeslice_agent_requests_total", outcome="refused") == 2
    assert value(samples, "edgeslice_agent_requests_total", outcome="ok") == 0
    assert value(samples, "edgeslice_agent_request_errors_total", code="busy") == 2
    assert value(samples, "edgeslice_agent_serving") == 0  # never started


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics-port {port} on 127.0.0.1"):
            MetricsServer(prometheus_client.CollectorRegistry(), MetricsEndpoint("127.0.0.1", port))


@pytest.mark.parametrize(
    "command, args",
    [(agent_cmd, []), (planner_cmd, ["--model", "mobilenetv2"])],
)
def test_metrics_port_without_prometheus_client_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, command: object, args: list[str]
) -> None:
    monkeypatch.setattr(broker_metrics, "prometheus_available", lambda: False)
    result = CliRunner().invoke(command, [*args], env={"EDGESLICE_METRICS_PORT": "9109"})  # type: ignore[arg-type]
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [
        "Error: --metrics-port needs prometheus_client, which is not installed: "
        "pip install 'edgeslice[metrics]'"
    ]
