"""Owns intra-layer (tiled) execution of a block: tile boxes, input boxes, tile programs, costs.

A block is profile segments ``[start, end)`` (half-open, like a stage) with exactly one
tensor crossing the cut before it and one after it. A *tile* computes one box of the
block's output from one box of its input (:mod:`broker.protocol.boxes`; the batch
dimension is always whole); the input box comes from the backward region analysis of
:mod:`planner.tilegraph`, so a block of several segments recomputes its halo (fusion) and
a block of one segment exchanges after every layer. Strategies split the output:

* ``outc``: channel ranges (output features for a linear layer). A conv with
  ``groups=1`` reads every input channel; depthwise convs, batch norm and elementwise
  ops keep the channel range.
* ``inh`` / ``inw``: row / column ranges; ``grid``: both (rows of tiles, each row cut
  into columns by the shares of the tiles in it).

Shares are uneven on purpose: devices of different speeds get boxes sized by share.
:func:`tile_module` rebuilds the block's ATen ops on the tile: every op reads exactly
the window it needs, cropped from what its producer holds; convs and pools run with
``padding=0`` on inputs padded explicitly only where the window leaves the image (zeros
for a conv, -inf for a max-pool, as the whole model pads), never at a border between
tiles, and weights, biases and batch-norm statistics are sliced to the channels the
tile computes. The module returns a one-element tuple (like a stage module) and is
exportable with ``torch.export``.

Analyses are cached on the traced graph (``graph.cache["tiling"]``), so the planner's DP
can ask for thousands of (block, box) pairs of a 150-node model in well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from edgeslice.broker.protocol.boxes import Box, box_shape, contains, full_box, volume
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.profile import ModelProfile
from edgeslice.planner.tileboxes import STRATEGIES, grid_shape, tile_boxes
from edgeslice.planner.tilegraph import (
    Op,
    Regions,
    analyse,
    clamp,
    conv_flops,
    pads,
    parse_op,
    shape_of,
    stored_tensor,
)
from edgeslice.planner.tracing import crossing_after, live_ranges

__all__ = [
    "STRATEGIES",
    "Block",
    "ProfileBlocks",
    "block",
    "boundary_nodes",
    "grid_shape",
    "input_box",
    "tile_boxes",
    "tile_flops",
    "tile_module",
    "tile_param_bytes",
    "tileable",
]

aten = torch.ops.aten
MAX_CACHED_TILES = 20_000  # region analyses kept per traced graph (a few KB each)


@dataclass(frozen=True)
class Block:
    """Segments ``[start, end)`` as ops between one source tensor and one output tensor."""

    start: int
    end: int
    source: fx.Node | None
    output: fx.Node | None
    ops: tuple[Op, ...]
    problem: str | None  # why this block cannot be tiled at all (None: it can)
    out_shape: tuple[int, ...] = ()  # of the output tensor, batch first


def _cache(profile: ModelProfile) -> dict[Any, Any]:
    cache: dict[Any, Any] = profile.graph.cache.setdefault("tiling", {})
    return cache


def boundary_nodes(profile: ModelProfile, b: int) -> list[fx.Node]:
    """Tensors crossing boundary ``b`` (0: the model inputs, n: its outputs)."""
    graph, n = profile.graph, len(profile.segments)
    if b == 0:
        return list(graph.placeholders)
    if b == n:
        return list(graph.outputs)
    cache = _cache(profile)
    if "live" not in cache:
        cache["live"] = live_ranges(graph)
    defined, last = cache["live"]
    return crossing_after(graph, profile.segments[b - 1].last, defined, last)


def _parsed(profile: ModelProfile, node: fx.Node) -> Op | str:
    ops = _cache(profile).setdefault("ops", {})
    if node not in ops:
        ops[node] = parse_op(node, profile.graph.module)
    result: Op | str = ops[node]
    return result


def block(profile: ModelProfile, start: int, end: int) -> Block:
    """The block of segments ``[start, end)``, with ``problem`` set when it is not tileable."""
    n = len(profile.segments)
    if not 0 <= start < end <= n:
        raise PlanningError(f"block [{start}, {end}) is not a run of the {n} segments")
    cache = _cache(profile)
    key = ("block", start, end)
    if key in cache:
        found: Block = cache[key]
        return found
    ins, outs = boundary_nodes(profile, start), boundary_nodes(profile, end)
    nodes = profile.graph.order[profile.segments[start].first : profile.segments[end - 1].last + 1]
    ops, problem = [], None
    if len(ins) != 1 or len(outs) != 1:
        problem = f"{len(ins)} tensors enter and {len(outs)} leave (tiling needs one of each)"
    else:
        inside = {ins[0], *nodes}
        for node in nodes:
            op = _parsed(profile, node)
            if isinstance(op, str):
                problem = op
                break
            if any(arg not in inside for arg in op.inputs):
                problem = f"{node.name} reads a tensor from outside the block"
                break
            ops.append(op)
        if problem is None and outs[0] not in nodes:
            problem = "the block's output is not computed inside it"
    source, output = (ins[0], outs[0]) if problem is None else (None, None)
    shape = shape_of(output) if output is not None else ()
    result = Block(start, end, source, output, tuple(ops), problem, shape)
    cache[key] = result
    return result


def tileable(profile: ModelProfile, start: int, end: int) -> frozenset[str]:
    """Strategies that can split segments ``[start, end)`` (empty: none, run it whole).

    Spatial strategies need a 4-D output at least 2 wide in the split dimension and no op
    that needs its whole input plane (global pool, flatten, linear); ``outc`` needs at
    least 2 output channels (features).
    """
    blk = block(profile, start, end)
    if blk.problem is not None:
        return frozenset()
    shape = blk.out_shape
    ok = set()
    if len(shape) >= 2 and shape[1] >= 2:
        ok.add("outc")
    if len(shape) == 4 and all(op.spatial for op in blk.ops):
        if shape[2] >= 2:
            ok.add("inh")
        if shape[3] >= 2:
            ok.add("inw")
        if shape[2] >= 2 and shape[3] >= 2:
            ok.add("grid")
    return frozenset(ok)


def _regions(profile: ModelProfile, start: int, end: int, out_box: Box) -> tuple[Block, Regions]:
    blk = block(profile, start, end)
    if blk.problem is not None or blk.source is None or blk.output is None:
        raise PlanningError(f"segments [{start}, {end}) of {profile.name!r}: {blk.problem}")
    if not contains(full_box(blk.out_shape), out_box) or any(hi <= lo for lo, hi in out_box):
        raise PlanningError(f"box {out_box} is not a non-empty part of shape {blk.out_shape}")
    cache: dict[Any, Regions] = _cache(profile).setdefault("regions", {})
    key = (start, end, out_box)
    if key not in cache:
        if len(cache) >= MAX_CACHED_TILES:  # re-plans with new speeds make new boxes
            cache.clear()
        cache[key] = analyse(blk.ops, blk.source, blk.output, out_box)
    return blk, cache[key]


def input_box(profile: ModelProfile, start: int, end: int, out_box: Box) -> Box:
    """The region of the block's input a tile needs to compute ``out_box`` (halo included)."""
    blk, regions = _regions(profile, start, end, out_box)
    assert blk.source is not None
    return regions.held[blk.source]


def tile_flops(profile: ModelProfile, start: int, end: int, out_box: Box) -> float:
    """FLOPs of the tile, halo recompute included, counted as the profile counts them."""
    blk, regions = _regions(profile, start, end, out_box)
    total = 0.0
    for op in blk.ops:
        box = regions.held.get(op.node)
        if box is not None:
            total += conv_flops(op, box, op.shape[0])
    return total


def _param_rows(op: Op, box: Box) -> tuple[int, int]:
    """Rows (dim 0) of this op's parameters the tile needs."""
    return op.channel_range(*box[0]) if op.kind in ("conv", "bn", "linear") else (0, 0)


def tile_param_bytes(profile: ModelProfile, start: int, end: int, out_box: Box) -> int:
    """Bytes of the (sliced) weights, biases and statistics the tile's program holds."""
    blk, regions = _regions(profile, start, end, out_box)
    seen: dict[tuple[str, int, int], int] = {}
    for op in blk.ops:
        box = regions.held.get(op.node)
        if box is None:
            continue
        lo, hi = _param_rows(op, box)
        for target, row in zip(op.params, op.row_bytes, strict=True):
            if target is not None:
                seen[(target, lo, hi)] = row * (hi - lo)
    return sum(seen.values())


class ProfileBlocks:
    """A profile as :class:`planner.intradp.BlockCosts`: what the tiling DP asks of a model.

    With ``priced`` (the planner's :class:`~planner.costmodel.ModelCost`: segments in
    calibration-equivalent FLOPs, timed on the planner host) a block costs what the
    pipeline planner says it does, and a tile that block's cost times its share of the
    block's counted FLOPs (halo recomputation included); a block with no counted FLOPs
    (activations, pools) by its share of the output. Without it, counted FLOPs. With
    ``factors`` (:func:`planner.tilecost.tile_factors`) a tile costs its block's measured
    tile factor times that.
    """

    def __init__(self, profile: ModelProfile, priced: Any = None, factors: Any = None) -> None:
        self.profile = profile
        self.n_segments = len(profile.segments)
        self.priced = priced
        self.factors = factors  # planner.tilecost: measured tile factors, or None

    def tileable(self, start: int, end: int) -> frozenset[str]:
        return tileable(self.profile, start, end)

    def out_shape(self, boundary: int) -> tuple[int, ...] | None:
        crossing = self.profile.crossing(boundary)
        return crossing[0].shape if len(crossing) == 1 else None

    def boundary_bytes(self, boundary: int) -> int:
        return sum(t.nbytes for t in self.profile.crossing(boundary))

    def input_box(self, start: int, end: int, out_box: Box) -> Box:
        return input_box(self.profile, start, end, out_box)

    def flops(self, start: int, end: int, out_box: Box) -> float:
        """A tile's FLOPs; the empty box (a whole block) as profiled (class docstring)."""
        counted = sum(s.flops for s in self.profile.segments[start:end])
        whole = counted
        if self.priced is not None:
            whole = sum(s.flops for s in self.priced.segments[start:end])
        if not out_box:
            return whole
        shape = self.out_shape(end)
        if counted > 0:
            share = tile_flops(self.profile, start, end, out_box) / counted
        else:
            share = volume(out_box) / volume(full_box(shape)) if shape else 1.0
        if self.factors is None or shape is None:
            return whole * share
        from edgeslice.planner.tilecost import block_factor, strategy_of

        costs = [s.flops for s in (self.priced or self.profile).segments]
        factor = block_factor(self.factors, costs, start, end, strategy_of(out_box, shape))
        return whole * share * factor

    def param_bytes(self, start: int, end: int, out_box: Box) -> int:
        if not out_box:
            return sum(s.param_bytes for s in self.profile.segments[start:end])
        return tile_param_bytes(self.profile, start, end, out_box)


class _Builder:
    """Writes one tile's graph: crops, explicit border padding, ops on sliced parameters."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.stored: dict[tuple[str, int, int], fx.Node] = {}

    def call(self, target: Any, *args: Any) -> fx.Node:
        return self.graph.call_function(target, tuple(args))

    def param(self, target: str | None, rows: tuple[int, int]) -> fx.Node | None:
        if target is None:
            return None
        key = (target, *rows)
        if key not in self.stored:
            value = stored_tensor(self.module, target)[rows[0] : rows[1]]
            name = f"p{len(self.stored)}"
            self.root.register_buffer(name, value.detach().clone().contiguous())
            self.stored[key] = self.graph.get_attr(name)
        return self.stored[key]

    def crop(self, x: fx.Node, have: Box, want: Box) -> fx.Node:
        for dim, ((h0, h1), (w0, w1)) in enumerate(zip(have, want, strict=True)):
            if (h0, h1) != (w0, w1):
                x = self.call(aten.slice.Tensor, x, dim + 1, w0 - h0, w1 - h0)
        return x

    def pad(self, x: fx.Node, border: list[tuple[int, int]], value: float) -> fx.Node:
        if not any(a or b for a, b in border):
            return x
        flat = [p for pair in reversed(border[1:]) for p in pair]  # last dim first, not C
        return self.call(aten.constant_pad_nd.default, x, flat, value)

    def emit(self, op: Op, xs: list[fx.Node], box: Box, border: list[tuple[int, int]]) -> fx.Node:
        if op.kind in ("conv", "maxpool"):
            strides = [w.stride for w in op.windows]
            dilations = [w.dilation for w in op.windows]
            if op.kind == "maxpool":
                x = self.pad(xs[0], border, -math.inf)
                kernel = [w.kernel for w in op.windows]
                return self.call(aten.max_pool2d.default, x, kernel, strides, [0, 0], dilations)
            x = self.pad(xs[0], border, 0.0)
            lo, hi = op.channel_range(*box[0])
            groups = 1 if op.groups == 1 else (hi - lo) // (op.shape[1] // op.groups)
            weight, bias = (self.param(t, (lo, hi)) for t in op.params)
            y = self.call(aten.conv2d.default, x, weight, bias, strides, [0, 0], dilations, groups)
            return self.crop(y, ((lo, hi), *box[1:]), box)
        if op.kind == "linear":
            weight, bias = (self.param(t, box[0]) for t in op.params)
            return self.call(aten.linear.default, xs[0], weight, bias)
        if op.kind == "adapool":
            return self.call(aten.adaptive_avg_pool2d.default, xs[0], list(box_shape(box)[1:]))
        if op.kind == "flatten":
            plane = op.in_shapes[0][2] * op.in_shapes[0][3]
            first = box[0][0] // plane * plane
            y = self.call(aten.flatten.using_ints, xs[0], 1, -1)
            held = -(-box[0][1] // plane) * plane
            return self.crop(y, ((first, held),), box)
        # bn, unary, binary: the same node on cropped inputs and channel-sliced parameters
        mapping = dict(zip(op.inputs, xs, strict=True))
        for arg in op.node.all_input_nodes:
            if arg.op == "get_attr":
                mapping[arg] = self.param(str(arg.target), box[0])  # type: ignore[assignment]
        copied = self.graph.node_copy(op.node, lambda n: mapping[n])
        copied.meta = {}
        return copied


def tile_module(profile: ModelProfile, start: int, end: int, out_box: Box) -> fx.GraphModule:
    """A program for one tile: ``(x,)`` of the input box -> ``(y,)`` of ``out_box``.

    ``x`` is the block input cropped to :func:`input_box` (whole batch dimension);
    ``y`` equals the whole model's activation on ``out_box``.
    """
    blk, regions = _regions(profile, start, end, out_box)
    assert blk.source is not None and blk.output is not None
    b = _Builder(profile.graph.module)
    env = {blk.source: b.graph.placeholder("x")}
    for op in blk.ops:
        box = regions.held.get(op.node)
        if box is None:
            continue
        xs: list[fx.Node] = []
        border: list[tuple[int, int]] = []
        for j, arg in enumerate(op.inputs):
            want = regions.reads[(op.node, j)]
            xs.append(b.crop(env[arg], regions.held[arg], clamp(want, op.in_shapes[j])))
            border = pads(want, op.in_shapes[j]) if j == 0 else border
        env[op.node] = b.emit(op, xs, box, border)
    b.graph.output((env[blk.output],))
    b.graph.lint()
    return fx.GraphModule(b.root, b.graph)
