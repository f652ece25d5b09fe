"""Profiling: cut points respect the model's structure and costs add up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslice.planner.models.mobilenetv2 import build_mobilenetv2
from edgeslice.planner.models.resnet import build_resnet18
from edgeslice.planner.models.transformer import build_transformer
from edgeslice.planner.modelspec import load_model
from edgeslice.planner.profile import (
    MAX_CROSSING,
    ModelProfile,
    count_flops,
    format_profile,
    profile_model,
)

BRANCHY = Path(__file__).resolve().parents[2] / "examples" / "branchy_model.py"
ADD = torch.ops.aten.add.Tensor
CAT = torch.ops.aten.cat.default


@pytest.fixture(scope="module")
def branchy() -> tuple[nn.Module, tuple[torch.Tensor, ...], ModelProfile]:
    loaded = load_model(f"{BRANCHY}:build")
    profile = profile_model(loaded.module, loaded.example_inputs, name="branchy")
    return loaded.module, loaded.example_inputs, profile


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, tuple[torch.Tensor, ...], ModelProfile]:
    model, inputs = build_resnet18(64)
    return model, inputs, profile_model(model, inputs, name="resnet18")


def _segment_of(profile: ModelProfile) -> dict[str, int]:
    return {name: s.index for s in profile.segments for name in s.node_names}


def _module_paths(node: torch.fx.Node) -> list[str]:
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def _assert_block_uncut(profile: ModelProfile, block: str, start: str | None = None) -> None:
    """Nodes of ``block`` from its fork (first node of ``start``) to the add/cat merging
    its branches share a segment."""
    nodes = [n for n in profile.graph.order if block in _module_paths(n)]
    assert nodes, f"no nodes for {block}"
    merge = [n for n in nodes if n.target in (ADD, CAT)][-1]
    first = next(n for n in nodes if (start or block) in _module_paths(n))
    seg = _segment_of(profile)
    inside = nodes[nodes.index(first) : nodes.index(merge) + 1]
    assert len(inside) >= 3
    assert {seg[n.name] for n in inside} == {seg[first.name]}, block


def test_symbolic_trace_fails_but_profiling_works(branchy) -> None:
    model, _, profile = branchy
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    assert len(profile.segments) > 5


def test_branchy_cuts_never_split_residuals_or_the_branch_fork(branchy) -> None:
    _, _, profile = branchy
    for block in ("res1", "res2", "branch"):
        _assert_block_uncut(profile, block)
    # fuse: the metadata side path before the conv is independent and may be cut.
    _assert_block_uncut(profile, "fuse", start="fuse.conv")


def test_branchy_counts_what_crosses(branchy) -> None:
    _, inputs, profile = branchy
    assert [t.name for t in profile.crossing(0)] == ["image", "meta"]
    assert profile.input_bytes == sum(t.numel() * 4 for t in inputs)
    # Until the metadata input is consumed it rides along with the image features.
    with_meta = [s for s in profile.segments if "meta" in [t.name for t in s.outputs]]
    assert with_meta and all(len(s.outputs) == 2 for s in with_meta)
    for s in profile.segments:
        assert 1 <= len(s.outputs) <= MAX_CROSSING
        assert s.out_bytes == sum(t.nbytes for t in s.outputs)
    assert profile.segments[-1].outputs[0].shape == (1, 10)


def test_resnet_blocks_are_never_cut_and_one_tensor_crosses(resnet) -> None:
    _, _, profile = resnet
    for layer in range(1, 5):
        for block in range(2):
            _assert_block_uncut(profile, f"layer{layer}.{block}")
    assert all(len(s.outputs) == 1 for s in profile.segments)


def test_segments_tile_the_graph_in_order(resnet) -> None:
    _, _, profile = resnet
    assert profile.segments[0].first == 0
    assert profile.segments[-1].last == len(profile.graph.order) - 1
    for a, b in zip(profile.segments, profile.segments[1:], strict=False):
        assert b.first == a.last + 1
        assert b.index == a.index + 1


@pytest.mark.parametrize(
    "build",
    [lambda: build_mobilenetv2(64), lambda: build_resnet18(64), lambda: build_transformer(32)],
    ids=["mobilenetv2", "resnet18", "transformer"],
)
def test_segment_flops_sum_to_the_whole_model(build) -> None:
    model, inputs = build()
    profile = profile_model(model, inputs, max_segments=12)
    total = count_flops(model, inputs)
    assert total > 0
    assert profile.total_flops == pytest.approx(total, rel=1e-6)
    assert len(profile.segments) <= 12
    assert sum(s.param_bytes for s in profile.segments) == pytest.approx(
        sum(p.numel() * 4 for p in model.parameters()), rel=0.02
    )


def test_transformer_attention_flops_are_counted() -> None:
    model, inputs = build_transformer(32)
    linear_only = sum(
        2 * m.in_features * m.out_features * (32 if name != "pool" and name != "classifier" else 1)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )
    assert count_flops(model, inputs) > linear_only  # attention matmuls add to linears


def test_max_segments_merges_without_losing_cost(branchy) -> None:
    model, inputs, full = branchy
    merged = profile_model(model, inputs, max_segments=4)
    assert len(merged.segments) == 4
    assert merged.total_flops == pytest.approx(full.total_flops)
    assert sum(s.param_bytes for s in merged.segments) == sum(s.param_bytes for s in full.segments)
    kept = {s.last for s in merged.segments}
    assert kept <= {s.last for s in full.segments}  # merging only removes cuts
    assert merged.segments[-1].out_bytes == full.segments[-1].out_bytes


def test_activation_peak_covers_inputs_and_outputs(branchy) -> None:
    _, _, profile = branchy
    for s in profile.segments:
        assert s.act_bytes >= s.out_bytes
        assert s.act_bytes >= sum(t.nbytes for t in profile.crossing(s.index))


def test_format_profile_lists_every_segment(branchy) -> None:
    _, _, profile = branchy
    table = format_profile(profile)
    lines = table.splitlines()
    assert "branchy" in lines[0] and "FLOPs" in lines[1]
    assert len(lines) == 3 + len(profile.segments)
    assert lines[-1].rstrip().endswith("100.0%")


def test_to_cost_matches_the_profile(branchy) -> None:
    costmodel = pytest.importorskip("edgeslice.planner.costmodel")
    _, _, profile = branchy
    cost = profile.to_cost()
    assert isinstance(cost, costmodel.ModelCost)
    assert cost.name == "branchy" and cost.input_bytes == profile.input_bytes
    assert [s.flops for s in cost.segments] == [s.flops for s in profile.segments]
    assert [s.out_bytes for s in cost.segments] == [s.out_bytes for s in profile.segments]
