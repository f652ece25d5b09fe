"""A fleet split across a broker cluster: two NATS servers routed together on loopback.

The agents connect to server A, the planner and the inference client to server B; every
message between them crosses the cluster route. Both servers run JetStream (NATS' MQTT
support keeps sessions and retained messages in JetStream streams) clustered over the
same routes; with two servers the MQTT streams get 2 replicas and the JetStream meta
group needs both servers up (a quorum of 2 of 2): two servers spread the load and the
connections, a third is what survives the loss of one (lab/server.NatsCluster).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_broker_matrix import AGENTS, FAST, MODEL_SOURCE, Peer, _offline, _online

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import ONLINE, PlanMessage, PlannerStatus
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.inference import InferenceClient
from edgeslice.lab.brokers import find_nats
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.server import NatsCluster
from edgeslice.planner.modelspec import load_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_nats() is None, reason="nats-server not installed"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster(2) as servers:
        yield servers


def test_fleet_across_two_routed_servers(cluster: NatsCluster, tmp_path: Path) -> None:
    server_a, server_b = cluster.servers
    source = tmp_path / "cluster_model.py"
    source.write_text(MODEL_SOURCE)
    spec = f"{source}:build"
    loaded = load_model(spec)
    with torch.inference_mode():
        expected = loaded.module(*loaded.example_inputs)
    namespace = "nc" + uuid.uuid4().hex[:8]
    t = Topics(namespace)
    key = str(tmp_path / "fleet.key")
    planners = LocalFleet(server_b.url, namespace, str(tmp_path / "b"), fleet_key_file=key)
    agents = LocalFleet(server_a.url, namespace, str(tmp_path / "a"), fleet_key_file=key)
    on_a, on_b = Peer(server_a), Peer(server_b)
    try:
        on_b.subscribe(t.planner_status())
        on_a.subscribe(t.plan(loaded.name), *(t.status(a) for a in AGENTS))
        planners.start_planner(spec, ["--replan-delay", "1", "--strategy", "even-split"])
        for agent_id in AGENTS:  # starting while the planner starts (as on one broker)
            agents.start_agent(AgentSpec(agent_id, "x86-laptop", FAST))
        on_b.first(
            t.planner_status(), 120, lambda p: codec.decode(p, PlannerStatus).state == ONLINE
        )
        # server A sees the planner's retained plan become ready, server B the agents
        on_a.first(t.plan(loaded.name), 180, lambda p: codec.decode(p, PlanMessage).ready)
        on_b.subscribe(*(t.status(a) for a in AGENTS))

        # the retained copies arrive on subscribe (a live re-publish may come first)
        def all_retained(out: list[Any]) -> bool:
            return all(
                any(m.topic == t.status(a) and m.retain and _online(m.payload) for m in out)
                for a in AGENTS
            )

        got = list(on_b.seen)
        got += on_b.until(lambda out: all_retained(got + out), 10.0)
        for agent_id in AGENTS:
            assert any(
                m.topic == t.status(agent_id) and m.retain and _online(m.payload) for m in got
            ), f"no retained online status of {agent_id} on server B"

        async def infer() -> None:
            settings = parse_broker_url(server_b.url, namespace)
            async with InferenceClient(settings, loaded.name) as client:
                await client.wait_ready(120)
                for _ in range(5):
                    result = await client.infer(loaded.example_inputs, timeout=60)
                    torch.testing.assert_close(result.outputs[0], expected, rtol=1e-4, atol=1e-4)
                    assert set(result.route) == set(AGENTS)

        asyncio.run(infer())

        big = bytes(range(256)) * (6 * 1024)  # 1.5 MiB across the route
        on_a.subscribe(t.root + "/big")
        on_b.publish(t.root + "/big", big)
        assert on_a.first(t.root + "/big", 20).payload == big

        agents.signal(AGENTS[-1], signal.SIGKILL)  # its last will, published on A, seen on B
        assert codec.decode(on_b.first(t.status(AGENTS[-1]), 60, _offline).payload).reason
    except BaseException:
        for fleet, name in ((planners, "planner"), *((agents, a) for a in AGENTS)):
            print(f"--- {name} log tail ---\n{fleet.log_tail(name, 15)}")
        for label, server in (("A", server_a), ("B", server_b)):
            print(f"--- server {label} ---\n{server.log_tail(1500)}")
        raise
    finally:
        on_a.close()
        on_b.close()
        planners.close()  # first: a draining agent then has no planner to wait for
        agents.close()
