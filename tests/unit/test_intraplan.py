"""Tiled plans from the planner: the simple description, tile artifacts, and a planner that
serves one (``intra_layer``) to real agents and a client on the in-memory broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from memfleet import SETTINGS, agent_config, eventually, key_file, running
from torch import nn

from edgeslice.agent.service import AgentService
from edgeslice.broker.fleetkey import load_signing_key
from edgeslice.broker.memory import MemoryBroker
from edgeslice.broker.protocol.boxes import covers, full_box
from edgeslice.broker.protocol.errors import ConfigError, PlanningError
from edgeslice.broker.protocol.pieces import WHOLE, wire_box
from edgeslice.client.inference import InferenceClient
from edgeslice.planner import intraplan
from edgeslice.planner.config import INTRA_LAYER, PlannerConfig
from edgeslice.planner.costmodel import CostParams, Device
from edgeslice.planner.profile import profile_model
from edgeslice.planner.service import PlannerService

TINY_CNN = f"{Path(__file__).resolve()}:build_tiny_cnn"


def build_tiny_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Wide early planes (split by rows, with halo) and many late channels (split by them)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
        nn.Conv2d(8, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    return model, (torch.randn(1, 3, 32, 32),)


DEVICES = [
    Device("fast", 20.0, 2**30, 1e7, 0.001),
    Device("slow1", 5.0, 2**30, 1e7, 0.001),
    Device("slow2", 5.0, 2**30, 1e7, 0.001),
]


def test_intra_layer_choices_are_the_tiling_strategies() -> None:
    from edgeslice.planner.intramodes import MODES
    from edgeslice.planner.tiling import STRATEGIES

    assert ("", intraplan.DP, intraplan.AUTO, *STRATEGIES, "fixed") == INTRA_LAYER
    assert ("", *MODES) == INTRA_LAYER
    with pytest.raises(ConfigError, match="intra-layer"):
        PlannerConfig(model_spec=TINY_CNN, broker=SETTINGS, intra_layer="rows")


def test_simple_description_splits_planes_by_rows_and_late_layers_by_channels(
    tmp_path: Path,
) -> None:
    model, inputs = build_tiny_cnn()
    profile = profile_model(model, inputs, max_segments=8)
    blocks = intraplan.simple_description(profile, DEVICES)
    intraplan.check_description(profile, blocks)
    strategies = [b.strategy for b in blocks]
    assert "inh" in strategies and "outc" in strategies, strategies
    first = blocks[0]
    assert [a for a, _box in first.tiles] == ["fast", "slow1", "slow2"]
    rows = [box[1][1] - box[1][0] for _a, box in first.tiles]
    assert rows[0] > rows[1] and rows[0] > rows[2]  # shares by speed
    built = intraplan.build_tiled(
        model, inputs, profile, blocks, load_signing_key(key_file(tmp_path))
    )
    stages = intraplan.tiled_stages(profile, blocks, built)
    for stage in stages:  # every tile's output boxes cover the stage's output
        outs = [wire_box(t.out_box) for t in stage.tiles]
        if outs != [WHOLE]:
            shape = profile.segments[stage.end_segment - 1].outputs[0].shape
            assert covers(outs, full_box(shape)), stage
    assert stages[0].tiles[0].in_box[1][1] > stages[0].tiles[0].out_box[1][1]  # halo row
    wanted = intraplan.tiled_assignments(stages, built)
    assert sorted(wanted) == ["fast", "slow1", "slow2"]
    assert all(len(a) == len({s.stage for s in a}) for a in wanted.values())  # one per stage
    only_one = intraplan.simple_description(profile, DEVICES[:1])
    assert [b.strategy for b in only_one] == [""] and only_one[0].tiles[0][0] == "fast"
    with pytest.raises(PlanningError, match="does not continue"):
        intraplan.check_description(profile, blocks[1:])


def test_dp_description_splits_only_where_compute_outweighs_the_exchange(
    tmp_path: Path,
) -> None:
    model, inputs = build_tiny_cnn()
    profile = profile_model(model, inputs, max_segments=8)
    params = CostParams()
    fast = [Device(f"f{i}", 100.0, 2**30, 1e6, 0.01) for i in range(3)]  # slow links
    whole = intraplan.dp_description(profile, fast, params)
    assert len(whole) == 1, whole  # one block: no exchange is worth its link time
    slow = [Device(f"s{i}", 0.05, 2**30, 1e9, 0.0001) for i in range(3)]  # fast links
    split = intraplan.dp_description(profile, slow, params)
    intraplan.check_description(profile, split)
    assert any(b.strategy for b in split), split
    built = intraplan.build_tiled(
        model, inputs, profile, split, load_signing_key(key_file(tmp_path))
    )
    assert [len(arts) for arts in built] == [len(b.tiles) for b in split]


def test_modes_plan_their_baselines_and_publish_the_dps_prices(tmp_path: Path) -> None:
    """Each mode is the same DP, restricted: single strategies split wherever they can,
    fixed fusion fuses row tiles over one length; a DP plan's published latency and block
    times are the DP's own."""
    from edgeslice.planner.intradp import PIPELINE, BlockChoice, TileDevice
    from edgeslice.planner.intramodes import Prices, describe, prediction
    from edgeslice.planner.intraprice import Pricer
    from edgeslice.planner.tiling import ProfileBlocks

    model, inputs = build_tiny_cnn()
    profile = profile_model(model, inputs, max_segments=8)
    params = CostParams()
    slow_links = [Device(f"s{i}", 1.0, 2**30, 1e6, 0.01) for i in range(3)]
    prices = Prices(slow_links, params)
    pricer = Pricer(
        ProfileBlocks(profile),
        [TileDevice(d.agent_id, d.gflops) for d in slow_links],
        prices.compute,
        prices.transfer,
    )

    def plan(mode: str):  # type: ignore[no-untyped-def]
        config = PlannerConfig(model_spec=TINY_CNN, broker=SETTINGS, intra_layer=mode)
        return describe(config, profile, slow_links, params)

    free = plan("dp")
    assert free.priced is not None and len(free.blocks) <= 2  # slow links: few exchanges
    for mode in ("outc", "inh", "grid"):
        forced = plan(mode)
        assert forced.priced is not None and forced.priced.latency_s > free.priced.latency_s
        for block in forced.blocks:
            assert block.strategy in (mode, "")
            if block.strategy:
                assert block.end - block.start == 1
            else:  # whole only where the strategy cannot split (or the tensor is too small)
                for k in range(block.start, block.end):
                    assert pricer.tiles(BlockChoice(k, k + 1, mode)) is None, (mode, k)
        assert any(b.strategy == mode for b in forced.blocks), mode
    fixed = plan("fixed")
    assert fixed.constraints is not None and fixed.constraints.fixed_fusion is not None
    assert {b.strategy for b in fixed.blocks} <= {"inh", ""}
    assert max(b.end - b.start for b in fixed.blocks if b.strategy) > 1

    priced = plan("inh").priced
    assert priced is not None
    published, tile_compute = prediction(priced, "cnn", "latency", slow_links, params)
    assert published.latency_s == priced.latency_s
    for stage, block, computes in zip(published.stages, priced.blocks, tile_compute, strict=True):
        assert stage.compute_s + stage.in_transfer_s == pytest.approx(block.seconds)
        assert len(computes) == len(block.tiles) and max(computes) == stage.period_s
        assert (block.strategy == PIPELINE) == (len(computes) == 1)
    built = intraplan.build_tiled(
        model, inputs, profile, plan("inh").blocks, load_signing_key(key_file(tmp_path))
    )
    stages = intraplan.tiled_stages(
        profile, plan("inh").blocks, built, published.stages, tile_compute
    )
    assert [s.replica_period_s for s in stages] == tile_compute


def test_tiles_are_priced_by_the_planners_timed_segment_costs() -> None:
    """With the planner's timed costs a block costs what the pipeline planner says; a tile
    its share of the block's counted FLOPs, or of its output where nothing is counted."""
    from edgeslice.broker.protocol.boxes import volume
    from edgeslice.planner.costmodel import ModelCost, Segment
    from edgeslice.planner.tiling import ProfileBlocks, tile_boxes

    model, inputs = build_tiny_cnn()
    profile = profile_model(model, inputs, max_segments=8)
    counted = ProfileBlocks(profile)
    timed = [2.0 * s.flops + 1e6 for s in profile.segments]  # activations cost time too
    cost = ModelCost("cnn", profile.input_bytes, tuple(Segment(f, 0, 0, 0) for f in timed))
    priced = ProfileBlocks(profile, cost)
    n = len(profile.segments)
    assert priced.flops(0, n, ()) == pytest.approx(sum(timed))
    assert counted.flops(0, n, ()) == pytest.approx(profile.total_flops)
    top, bottom = tile_boxes(profile.segments[0].outputs[0].shape, "inh", [1.0, 1.0])
    for box in (top, bottom):  # the block's timed cost, shared as the counted FLOPs are
        share = counted.flops(0, 1, box) / counted.flops(0, 1, ())
        assert priced.flops(0, 1, box) == pytest.approx(timed[0] * share)
    free = next(k for k, s in enumerate(profile.segments) if s.flops == 0)  # a ReLU
    shape = profile.segments[free].outputs[0].shape
    half = tile_boxes(shape, "inh", [1.0, 1.0])[0]
    assert counted.flops(free, free + 1, half) == 0
    assert priced.flops(free, free + 1, half) == pytest.approx(
        timed[free] * volume(half) / volume(full_box(shape))
    )


def test_tile_factors_are_measured_and_weighted_by_segment_cost() -> None:
    from edgeslice.planner.tilecost import block_factor, strategy_of, tile_factors
    from edgeslice.planner.tiling import ProfileBlocks, tile_boxes

    model, inputs = build_tiny_cnn()
    profile = profile_model(model, inputs, max_segments=8)
    factors = tile_factors(profile, inputs, 2, ["inh", "outc"], repeats=1)
    assert factors and all(f > 0 for f in factors.values())
    assert {s for _k, s in factors} <= {"inh", "outc"}
    assert tile_factors(profile, inputs, 2, ["inh", "outc"], repeats=1) is factors  # kept
    fake = {(0, "inh"): 3.0, (1, "inh"): 1.0}
    assert block_factor(fake, [1.0, 3.0], 0, 2, "inh") == pytest.approx(1.5)
    assert block_factor(fake, [1.0, 3.0], 0, 2, "grid") == 1.0  # none measured
    shape = profile.segments[0].outputs[0].shape
    rows, chans = (tile_boxes(shape, s, [1.0, 1.0])[0] for s in ("inh", "outc"))
    assert (strategy_of(rows, shape), strategy_of(chans, shape)) == ("inh", "outc")
    plain = ProfileBlocks(profile)
    scaled = ProfileBlocks(profile, None, {(0, "inh"): 2.0})
    assert scaled.flops(0, 1, rows) == pytest.approx(2.0 * plain.flops(0, 1, rows))
    assert scaled.flops(0, 1, ()) == plain.flops(0, 1, ())  # whole blocks are not tiles


@pytest.mark.parametrize("mode", ["auto", "dp"])
def test_planner_serves_a_tiled_plan_end_to_end(tmp_path: Path, mode: str) -> None:
    model, _ = build_tiny_cnn()

    async def scenario() -> None:
        broker = MemoryBroker()
        config = PlannerConfig(
            model_spec=TINY_CNN,
            broker=SETTINGS,
            objective="latency",
            min_agents=3,
            max_segments=8,
            replan_delay_s=0.05,
            fleet_key_file=key_file(tmp_path),
            intra_layer=mode,
        )
        planner = PlannerService(config, transport=broker.factory)
        agents = [
            AgentService(agent_config(name, tmp_path), transport=broker.factory)
            for name in ("a1", "a2", "a3")
        ]
        async with (
            running(planner.run),
            running(agents[0].run),
            running(agents[1].run),
            running(agents[2].run),
        ):
            await eventually(lambda: planner.model_name, what="model loaded")
            async with InferenceClient(
                SETTINGS, planner.model_name, transport=broker.factory
            ) as client:
                plan = await client.wait_ready(timeout=60.0)
                assert all(s.tiles for s in plan.stages)
                if mode == "auto":
                    assert {s.tiling for s in plan.stages} >= {"inh", "outc"}
                batch = [torch.randn(1, 3, 32, 32) for _ in range(3)]
                results = await asyncio.gather(*(client.infer(x, timeout=30.0) for x in batch))
        with torch.no_grad():
            for x, result in zip(batch, results, strict=True):
                assert torch.allclose(result.outputs[0], model(x), atol=1e-4)
        if mode == "auto":
            assert {t["agent"] for t in results[0].timings} == {"a1", "a2", "a3"}

    asyncio.run(scenario())
