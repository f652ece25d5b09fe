"""Dynamic batching: dynamic-batch stages, the agent's batch queue, split results, pricing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch
from memfleet import FakeHeader, FakeJob
from torch import nn

from edgeslice.agent.batching import (
    BatchPolicy,
    BatchQueue,
    StageStats,
    batch_key,
    hold_until,
    measure_batch_speedup,
    run_grouped,
    take_matching,
)
from edgeslice.agent.config import AgentConfig
from edgeslice.agent.dataplane import DataPlane, Job
from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.fleetkey import generate_key
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.chunking import Completed, Reassembler, encode_transfer
from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.protocol.messages import BatchSpeedup, Info, RequestEnvelope, RouteHop
from edgeslice.broker.protocol.tensors import pack_tensors, unpack_tensors
from edgeslice.broker.protocol.topics import Topics
from edgeslice.broker.settings import BrokerSettings
from edgeslice.planner.costmodel import (
    Device,
    ModelCost,
    Segment,
    batched_period_s,
    speedup_at,
    stage_period_s,
)
from edgeslice.planner.models.mobilenetv2 import build_mobilenetv2
from edgeslice.planner.models.resnet import build_resnet18
from edgeslice.planner.models.transformer import build_transformer
from edgeslice.planner.modelspec import load_model
from edgeslice.planner.profile import profile_model
from edgeslice.planner.stages import build_stages

KEY = generate_key()
PUBLIC = KEY.public_key()
BRANCHY = Path(__file__).resolve().parents[2] / "examples" / "branchy_model.py"


def _branchy() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    loaded = load_model(f"{BRANCHY}:build")
    return loaded.module, loaded.example_inputs


def _variants(inputs: tuple[torch.Tensor, ...], n: int) -> list[list[torch.Tensor]]:
    """``n`` different requests shaped like ``inputs`` (token ids stay in range)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        request = []
        for t in inputs:
            if t.is_floating_point():
                request.append(torch.randn(t.shape, generator=gen))
            else:
                request.append(t[..., torch.randperm(t.shape[-1], generator=gen)])
        out.append(request)
    return out


# -- stages export with a dynamic batch; batched runs equal one-by-one runs -----------------


@pytest.mark.parametrize(
    ("build", "stages"),
    [
        (lambda: build_mobilenetv2(64), 3),
        (lambda: build_resnet18(64), 2),
        (lambda: build_transformer(32), 2),
        (_branchy, 3),
    ],
    ids=["mobilenetv2", "resnet18", "transformer", "branchy"],
)
def test_every_stage_batches_and_matches_running_requests_one_by_one(build, stages: int) -> None:
    model, inputs = build()
    profile = profile_model(model, inputs, max_segments=12)
    n = len(profile.segments)
    bounds = sorted({0, n} | {round(n * k / stages) for k in range(1, stages)})
    artifacts = build_stages(model, inputs, profile, bounds, KEY)
    assert all(a.batchable for a in artifacts)
    runtime = StageRuntime()
    loaded = [runtime.load(a.data, PUBLIC) for a in artifacts]
    assert all(s.info.batchable for s in loaded)
    requests = _variants(inputs, 4)
    for stage in loaded:
        alone = [stage.run(r) for r in requests]
        together = stage.run_batch(requests)
        assert len(together) == len(requests)
        for a, b in zip(alone, together, strict=True):
            assert [t.shape for t in a] == [t.shape for t in b]
            assert all(
                torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True)
            )
        requests = alone  # the next stage's inputs
    with torch.no_grad():
        expected = [model(*r) for r in _variants(inputs, 4)]
    for got, want in zip(requests, expected, strict=True):
        assert torch.allclose(got[0], want, rtol=1e-4, atol=1e-5)


class BakedBatch(nn.Module):
    """Flattens with the batch size written into the code: no dynamic batch possible."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).reshape(1, -1))


def test_a_stage_that_bakes_the_batch_in_is_not_batchable_and_runs_one_by_one() -> None:
    model, inputs = BakedBatch().eval(), (torch.randn(1, 3, 8, 8),)
    profile = profile_model(model, inputs)
    (artifact,) = build_stages(model, inputs, profile, [0, len(profile.segments)], KEY)
    assert artifact.batchable is False
    stage = StageRuntime().load(artifact.data, PUBLIC)
    assert stage.info.batchable is False
    requests = _variants(inputs, 3)
    with torch.no_grad():
        for got, r in zip(stage.run_batch(requests), requests, strict=True):
            assert torch.allclose(got[0], model(*r), atol=1e-6)


# -- the queue: what runs together ----------------------------------------------------------


def _job(name: str, artifact: str = "a", version: int = 1, **kw: Any) -> FakeJob:
    deadline = kw.pop("deadline", 0.0)
    header = FakeHeader({"route": [["pi", artifact]]}, plan_version=version, deadline=deadline)
    return FakeJob(header, name=name, **kw)


def test_batch_key_is_artifact_plan_version_and_stage() -> None:
    assert batch_key(_job("x").header) == ("a", "p", 1, 0)  # type: ignore[arg-type]
    assert batch_key(FakeHeader({"route": []})) is None  # type: ignore[arg-type]
    assert batch_key(FakeHeader({})) is None  # type: ignore[arg-type]


def test_take_matching_keeps_the_others_in_order() -> None:
    pending = deque([_job("1"), _job("2", "b"), _job("3"), _job("4", version=2), _job("5")])
    taken = take_matching(pending, BatchQueue.key_of, ("a", "p", 1, 0), 2)
    assert [j.name for j in taken] == ["1", "3"]
    assert [j.name for j in pending] == ["2", "4", "5"]


def test_hold_until_is_bounded_by_the_wait_and_by_deadlines() -> None:
    jobs = [_job("1", received_at=10.0), _job("2", received_at=10.5)]
    assert hold_until(jobs, 0.002, 0.1) == pytest.approx(10.002)
    jobs.append(_job("3", received_at=10.5, deadline=10.05))
    assert hold_until(jobs, 0.002, 0.1) == pytest.approx(9.95)  # cannot wait at all


def _queue(policy: BatchPolicy, batchable: bool = True, now: float = 100.0) -> BatchQueue[Any]:
    return BatchQueue(policy, lambda _key: batchable, lambda _key: 0.01, clock=lambda: now)


def test_queued_requests_of_one_stage_run_together_up_to_max_batch() -> None:
    async def go() -> list[list[str]]:
        queue = _queue(BatchPolicy(max_batch=3, max_wait_s=0.0))
        for job in [_job("1"), _job("2", "b"), _job("3"), _job("4"), _job("5"), _job("6", "b")]:
            queue.put_nowait(job)
        return [[j.name for j in await queue.get_batch()] for _ in range(3)]

    assert asyncio.run(go()) == [["1", "3", "4"], ["2", "6"], ["5"]]


def test_a_stage_that_cannot_batch_or_max_batch_1_takes_one_at_a_time() -> None:
    async def go(queue: BatchQueue[Any]) -> list[str]:
        for name in "123":
            queue.put_nowait(_job(name))
        return [j.name for j in await queue.get_batch()]

    assert asyncio.run(go(_queue(BatchPolicy(8, 0.0), batchable=False))) == ["1"]
    assert asyncio.run(go(_queue(BatchPolicy(1, 0.0)))) == ["1"]


def test_a_batch_waits_for_a_request_arriving_within_the_wait() -> None:
    async def go() -> list[str]:
        queue = _queue(BatchPolicy(max_batch=2, max_wait_s=3600.0))
        queue.put_nowait(_job("1"))
        batch = asyncio.ensure_future(queue.get_batch())
        await asyncio.sleep(0)
        assert not batch.done()  # held for a second request
        queue.put_nowait(_job("2", "b"))  # another stage: does not join
        queue.put_nowait(_job("3"))
        return [j.name for j in await batch]

    assert asyncio.run(go()) == ["1", "3"]


def test_a_request_whose_deadline_would_pass_is_not_held() -> None:
    async def go() -> list[str]:
        queue = _queue(BatchPolicy(max_batch=8, max_wait_s=3600.0), now=100.0)
        queue.put_nowait(_job("1", deadline=100.005))  # expected compute 0.01 s: no time
        return [j.name for j in await asyncio.wait_for(queue.get_batch(), 60.0)]

    assert asyncio.run(go()) == ["1"]


def test_policy_and_config_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_wait_s=-1.0)
    broker = BrokerSettings()
    with pytest.raises(ConfigError, match="max-batch"):
        AgentConfig(agent_id="a", profile="x86-laptop", broker=broker, max_batch=0)
    with pytest.raises(ConfigError, match="max-batch-wait"):
        AgentConfig(agent_id="a", profile="x86-laptop", broker=broker, max_batch_wait_ms=-1)


# -- the data plane splits a batch back into one reply per request ---------------------------


def test_a_batch_is_answered_per_request_with_its_own_timings() -> None:
    model, inputs = build_mobilenetv2(32)
    profile = profile_model(model, inputs, max_segments=4)
    (artifact,) = build_stages(model, inputs, profile, [0, len(profile.segments)], KEY)
    runtime = StageRuntime()
    runtime.load(artifact.data, PUBLIC)
    plane = DataPlane("pi-1", None, Topics("t"), runtime)  # type: ignore[arg-type]
    requests = _variants(inputs, 3)
    jobs = []
    for i, request in enumerate(requests):
        tensors, payload = pack_tensors(request)
        env = RequestEnvelope(
            route=[RouteHop("pi-1", artifact.sha256)], reply_to=f"c{i}", tensors=tensors
        )
        chunks = encode_transfer(
            bytes(payload), request_id=f"r{i}", kind="request", meta=codec.to_wire(env)
        )
        done = Reassembler().feed(chunks.chunks[0], 0.0)
        assert isinstance(done, Completed)
        jobs.append(Job(done, received_at=10.0 + i, recv_s=0.0, client_id=f"c{i}"))
    bad = dataclasses.replace(jobs[2], client_id="intruder")  # fails alone, others still run
    try:
        out = plane._compute_batch([jobs[0], jobs[1], bad, jobs[2]], started=20.0)
    finally:
        plane.close()
    assert [o.topic for o in out] == [
        Topics("t").client_results(c) for c in ("c0", "c1", "intruder", "c2")
    ]
    replies = [Reassembler().feed(o.chunks[0], 0.0) for o in out]
    assert all(isinstance(r, Completed) for r in replies)
    assert [r.header.kind for r in replies] == ["result", "result", "error", "result"]  # type: ignore[union-attr]
    with torch.no_grad():
        for reply, request, waited in zip(
            [replies[0], replies[1], replies[3]], requests, [10.0, 9.0, 8.0], strict=True
        ):
            assert isinstance(reply, Completed)
            env = codec.from_wire(reply.header.meta, RequestEnvelope)
            (got,) = unpack_tensors(env.tensors, reply.payload)
            assert torch.allclose(got, model(*request), rtol=1e-4, atol=1e-5)
            (timing,) = env.timings
            assert timing.batch == 3 and timing.queue_s == pytest.approx(waited)
    stats = plane.stats[artifact.sha256]
    assert (stats.count, stats.batched, stats.batch_mean) == (0, 3, 3.0)


def test_stage_stats_keep_batch_1_compute_apart_from_batched_runs() -> None:
    stats = StageStats(0)
    stats.add(0.010, 0.001)
    stats.add(0.040, 0.002, batch=8)
    assert (stats.count, stats.compute_s) == (1, 0.010)
    assert (stats.batched, stats.batched_compute_s) == (1, pytest.approx(0.005))
    assert stats.queue_s == pytest.approx(0.0015)


def test_run_grouped_falls_back_to_one_by_one_when_a_batch_fails() -> None:
    class Flaky:
        sha256 = "s"

        def run_batch(self, requests: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
            if len(requests) > 1 or requests[0][0].item() < 0:
                raise RuntimeError("no")
            return [[r[0] * 2] for r in requests]

    ran = run_grouped(
        [Flaky()] * 3, [[torch.tensor(1.0)], [torch.tensor(-1.0)], [torch.tensor(2.0)]]
    )  # type: ignore[list-item]
    assert [r[2] for r in ran] == [1, 1, 1]
    assert isinstance(ran[1][0], RuntimeError)
    assert [float(r[0][0]) for r in (ran[0], ran[2])] == [2.0, 4.0]  # type: ignore[index]


# -- the speed-up: measured, announced, priced ---------------------------------------------


def test_batch_speedup_is_measured_per_batch_size_and_travels_in_info() -> None:
    points = measure_batch_speedup(8, seconds=0.05, threads=1)
    assert [p.batch for p in points] == [2, 4, 8]
    assert all(p.speedup > 0 for p in points)
    assert measure_batch_speedup(1) == []
    info = Info(agent_id="a", profile="p", max_batch=8, batch_speedup=points)
    back = codec.decode(codec.encode(info), Info)
    assert back.batch_speedup == points and back.max_batch == 8
    old = codec.decode(codec.encode(Info(agent_id="a", profile="p")), Info)
    assert (old.max_batch, old.batch_speedup) == (0, [])  # an older agent: no batching said


def test_speedup_at_interpolates_the_measured_points() -> None:
    points = [BatchSpeedup(2, 1.4), BatchSpeedup(4, 2.0), BatchSpeedup(8, 2.4)]
    assert speedup_at(points, 1) == 1.0
    assert speedup_at(points, 2) == pytest.approx(1.4)
    assert speedup_at(points, 3) == pytest.approx(1.7)
    assert speedup_at(points, 8) == pytest.approx(2.4)
    assert speedup_at(points, 16) == pytest.approx(2.4)  # not extrapolated
    assert speedup_at([], 8) == 1.0


def test_batched_period_divides_compute_only() -> None:
    model = ModelCost("m", 1000, (Segment(1e9, 0, 1000, 0),))
    device = Device("d", gflops=10.0, memory_bytes=1 << 30, bandwidth_bps=1e9, rtt_s=0.001)
    plain = stage_period_s(model, 0, 1, device)
    assert batched_period_s(model, 0, 1, device) == pytest.approx(plain)  # speed-up 1
    fast = dataclasses.replace(device, batch_speedup=2.0)
    halved = batched_period_s(model, 0, 1, fast)
    assert plain / 2 < halved < plain  # compute halves, hop CPU does not
    assert halved == pytest.approx(batched_period_s(model, 0, 1, device, speedup=2.0))
    linky = ModelCost("m", 10**9, (Segment(1e6, 0, 10**9, 0),))  # link-bound: no gain
    assert batched_period_s(linky, 0, 1, fast) == pytest.approx(stage_period_s(linky, 0, 1, fast))
