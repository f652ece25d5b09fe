"""The tiled-plan DP: exact against brute force, honours constraints and memory limits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslice.broker.protocol.boxes import box_shape, full_box, intersect, volume
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.intradp import (
    PIPELINE,
    BlockChoice,
    Constraints,
    TileDevice,
    brute_force,
    evaluate,
    plan_tiled,
)
from edgeslice.planner.models.vgg import build_vgg
from edgeslice.planner.profile import profile_model
from edgeslice.planner.tiling import ProfileBlocks

GFLOPS = 1e9


def _small_cnn() -> ProfileBlocks:
    """Five segments: convs (one strided), a pool, and a classifier only ``outc`` splits."""
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        ).eval()
    profile = profile_model(net, (torch.randn(1, 3, 40, 40, generator=gen),), max_segments=5)
    return ProfileBlocks(profile)


@pytest.fixture(scope="module")
def cnn() -> ProfileBlocks:
    return _small_cnn()


def _costs(devices: list[TileDevice], bandwidth: float, hop_s: float = 1e-4):
    speed = {d.name: d.speed * GFLOPS for d in devices}

    def compute(device: str, flops: float) -> float:
        return 2e-4 + flops / speed[device]  # a fixed price per program run, too

    def transfer(nbytes: int, receiver: str | None) -> float:
        return hop_s + nbytes / bandwidth

    return compute, transfer


TWO = [TileDevice("slow", 0.2), TileDevice("fast", 0.6)]


@pytest.mark.parametrize(
    ("bandwidth", "hop_s"), [(1e8, 0.05), (1e6, 1e-4), (1e10, 1e-5)], ids=["hops", "slow", "fast"]
)
def test_dp_finds_the_brute_force_optimum(cnn, bandwidth: float, hop_s: float) -> None:
    compute, transfer = _costs(TWO, bandwidth, hop_s)
    plan = plan_tiled(cnn, TWO, compute, transfer)
    best = brute_force(cnn, TWO, compute, transfer)
    assert plan.exact
    assert plan.latency_s == pytest.approx(best.latency_s, rel=1e-9)
    again = evaluate(cnn, TWO, plan.choices, compute, transfer)
    assert again.latency_s == pytest.approx(plan.latency_s, rel=1e-12)
    tiled = [b for b in plan.blocks if b.strategy != PIPELINE]
    if hop_s == 0.05:  # every hop is dear: the fast device alone, the input sent once
        assert [(b.strategy, b.tiles[0].device) for b in plan.blocks] == [(PIPELINE, "fast")]
    else:  # both devices work on the convolutions
        assert tiled and all(len(b.tiles) == 2 for b in tiled)


def test_three_devices_and_fusion_against_brute_force(cnn) -> None:
    three = [TileDevice("a", 0.3), TileDevice("b", 0.5), TileDevice("c", 0.2)]
    compute, transfer = _costs(three, 3e8, hop_s=2e-5)
    rules = Constraints(strategies=frozenset({PIPELINE, "inh", "outc"}), max_fusion=3)
    plan = plan_tiled(cnn, three, compute, transfer, rules)
    best = brute_force(cnn, three, compute, transfer, rules)
    assert plan.latency_s == pytest.approx(best.latency_s, rel=1e-9)
    assert any(b.end - b.start > 1 and b.strategy != PIPELINE for b in plan.blocks)


@pytest.mark.parametrize(
    "rules",
    [
        Constraints(strategies=frozenset({PIPELINE})),
        Constraints(strategies=frozenset({PIPELINE, "inw"})),
        Constraints(strategies=frozenset({PIPELINE, "grid", "outc"}), max_fusion=1),
        Constraints(fixed_fusion=2),
        Constraints(strategies=frozenset({PIPELINE, "inh"}), fixed_fusion=3),
    ],
    ids=["pipeline-only", "inw-only", "no-fusion", "fixed-2", "inh-fixed-3"],
)
def test_constraints_are_honoured(cnn, rules: Constraints) -> None:
    compute, transfer = _costs(TWO, 1e10)
    plan = plan_tiled(cnn, TWO, compute, transfer, rules)
    assert plan.latency_s == pytest.approx(
        brute_force(cnn, TWO, compute, transfer, rules).latency_s, rel=1e-9
    )
    for b in plan.blocks:
        assert b.strategy in rules.strategies
        if b.strategy == PIPELINE:
            continue
        if rules.fixed_fusion is not None:
            assert b.end - b.start == rules.fixed_fusion or b.end == cnn.n_segments
        assert b.end - b.start <= rules.max_fusion
    free = plan_tiled(cnn, TWO, compute, transfer)
    assert free.latency_s <= plan.latency_s * (1 + 1e-12)


def test_memory_limits_shape_the_plan(cnn) -> None:
    total = cnn.param_bytes(0, cnn.n_segments, ())
    compute, transfer = _costs(TWO, 1e6)  # unlimited memory: all on "fast" (test above)
    tight = [TileDevice("slow", 0.2, total * 0.7), TileDevice("fast", 0.6, total * 0.7)]
    plan = plan_tiled(cnn, tight, compute, transfer)
    best = brute_force(cnn, tight, compute, transfer)
    assert plan.exact
    assert plan.latency_s == pytest.approx(best.latency_s, rel=1e-9)
    for d in tight:
        assert 0 < plan.memory_bytes[d.name] <= d.memory_bytes
    tiny = [TileDevice("slow", 0.2, total * 0.3), TileDevice("fast", 0.6, total * 0.3)]
    with pytest.raises(PlanningError, match="fits"):
        plan_tiled(cnn, tiny, compute, transfer)


def _bytes_per_element(cnn, boundary: int) -> int:
    return cnn.boundary_bytes(boundary) // volume(full_box(cnn.out_shape(boundary)))


def test_local_pieces_cost_nothing_and_bytes_add_up(cnn) -> None:
    compute, transfer = _costs(TWO, 1e8)
    choices = [
        BlockChoice(0, 1, "inh"),
        BlockChoice(1, 3, "inh"),  # ReLU, max-pool, strided conv: a halo of rows
        BlockChoice(3, 4, PIPELINE, "fast"),
        BlockChoice(4, 5, PIPELINE, "fast"),
    ]
    plan = evaluate(cnn, TWO, choices, compute, transfer)
    per = _bytes_per_element(cnn, 1)
    partly_local = 0
    for tile, own in zip(plan.blocks[1].tiles, plan.blocks[0].tiles, strict=True):
        held = intersect(tile.in_box, own.out_box)
        assert tile.recv_bytes == (volume(tile.in_box) - volume(held)) * per
        partly_local += 0 < tile.recv_bytes < volume(tile.in_box) * per
    assert partly_local >= 1
    slow_piece = plan.blocks[1].tiles[0].out_box
    assert plan.blocks[2].tiles[0].recv_bytes == volume(slow_piece) * _bytes_per_element(cnn, 3)
    assert plan.blocks[3].tiles[0].recv_bytes == 0  # same device: nothing crosses
    received = sum(t.recv_bytes for b in plan.blocks for t in b.tiles)
    assert sum(plan.sent_bytes.values()) == received + cnn.boundary_bytes(5)
    assert plan.sent_bytes[None] == sum(t.recv_bytes for t in plan.blocks[0].tiles)
    assert plan.latency_s == pytest.approx(sum(b.seconds for b in plan.blocks) + plan.gather_s)


def test_tile_shares_follow_device_speed(cnn) -> None:
    compute, transfer = _costs(TWO, 1e8)
    choices = [BlockChoice(0, 1, "inh"), BlockChoice(1, 5, PIPELINE, "fast")]
    slow, fast = evaluate(cnn, TWO, choices, compute, transfer).blocks[0].tiles
    rows = [box_shape(t.out_box)[1] for t in (slow, fast)]
    assert sum(rows) == 40 and abs(rows[1] - 30) <= 1  # speeds 0.2 : 0.6
    assert fast.flops > 2.5 * slow.flops


def test_bad_plans_and_devices_are_refused(cnn) -> None:
    compute, transfer = _costs(TWO, 1e8)
    with pytest.raises(PlanningError, match="continue"):
        evaluate(cnn, TWO, [BlockChoice(1, 5, PIPELINE, "fast")], compute, transfer)
    with pytest.raises(PlanningError, match="covers"):
        evaluate(cnn, TWO, [BlockChoice(0, 2, PIPELINE, "fast")], compute, transfer)
    last = cnn.n_segments - 1  # the linear layer: outc only
    with pytest.raises(PlanningError, match="cannot run"):
        evaluate(
            cnn,
            TWO,
            [BlockChoice(0, last, PIPELINE, "fast"), BlockChoice(last, last + 1, "inh")],
            compute,
            transfer,
        )
    with pytest.raises(PlanningError, match="distinct"):
        plan_tiled(cnn, [TWO[0], TWO[0]], compute, transfer)
    with pytest.raises(PlanningError, match="unknown"):
        plan_tiled(cnn, TWO, compute, transfer, Constraints(strategies=frozenset({"rows"})))


def test_relaxing_constraints_never_hurts_on_vgg() -> None:
    model, inputs = build_vgg(64)
    blocks = ProfileBlocks(profile_model(model, inputs))
    devices = [TileDevice("a", 1.0), TileDevice("b", 1.0), TileDevice("c", 0.5)]
    compute, transfer = _costs(devices, 1e8)
    pipeline = plan_tiled(blocks, devices, compute, transfer, Constraints(frozenset({PIPELINE})))
    no_fusion = plan_tiled(blocks, devices, compute, transfer, Constraints(max_fusion=1))
    fused = plan_tiled(blocks, devices, compute, transfer)
    assert fused.latency_s <= no_fusion.latency_s <= pipeline.latency_s
    assert fused.latency_s < pipeline.latency_s  # tiling pays on a plain CNN
    assert len(pipeline.blocks) == 1


@pytest.mark.parametrize(
    "rules",
    [
        Constraints(strategies=frozenset({"inh"}), max_fusion=1, forced=True),
        Constraints(strategies=frozenset({"outc"}), max_fusion=1, forced=True),
        Constraints(strategies=frozenset({"inh"}), fixed_fusion=2, forced=True),
    ],
    ids=["inh", "outc", "inh-fixed-2"],
)
def test_forced_splits_run_whole_only_where_the_strategy_cannot_split(cnn, rules) -> None:
    """FlexPie's single-strategy baselines: split wherever the strategy can, even where a
    whole block would be faster (links here are slow), and whole only where it cannot."""
    compute, transfer = _costs(TWO, 1e6)
    plan = plan_tiled(cnn, TWO, compute, transfer, rules)
    assert plan.latency_s == pytest.approx(
        brute_force(cnn, TWO, compute, transfer, rules).latency_s, rel=1e-9
    )
    (strategy,) = rules.strategies
    for b in plan.blocks:
        if b.strategy == PIPELINE:  # no block of the strategy starts at any of its segments
            for k in range(b.start, b.end):
                assert strategy not in cnn.tileable(k, k + 1) or cnn.out_shape(k + 1) is None
        else:
            assert b.strategy == strategy
            assert b.end - b.start == (rules.fixed_fusion or 1) or b.end == cnn.n_segments
    assert any(b.strategy == strategy for b in plan.blocks)
    free = plan_tiled(cnn, TWO, compute, transfer)
    assert free.latency_s < plan.latency_s  # the free DP keeps these slow exchanges out
    with pytest.raises(PlanningError, match="force"):
        plan_tiled(cnn, TWO, compute, transfer, Constraints(strategies=frozenset({PIPELINE}),
                                                            forced=True))  # fmt: skip


def test_ties_go_to_the_pipeline_block(cnn) -> None:
    """A tiled block no faster than the whole one (within rounding) only adds risk: the DP
    and the oracle keep the block whole, even when the split is a rounding error faster."""
    devices = [TileDevice("a", 1.0), TileDevice("b", 1.0)]

    def compute(device: str, flops: float) -> float:
        return 1.0 + flops * 1e-17  # a fixed price per run dwarfs the work (1e-10 s)

    def transfer(nbytes: int, receiver: str | None) -> float:
        return 0.0

    for rules in (Constraints(), Constraints(max_fusion=1)):
        for search in (plan_tiled, brute_force):
            plan = search(cnn, devices, compute, transfer, rules)
            assert [b.strategy for b in plan.blocks] == [PIPELINE], (search, plan.choices)
