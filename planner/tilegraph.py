"""Owns the region analysis of tiled execution: which part of every activation a tile needs.

A *block* is a run of profile segments ``[start, end)`` (half-open, like a stage's
``start_segment``/``end_segment``) read as a small DAG of ATen ops between one input
tensor (the *source*, crossing the cut before it) and one output tensor. Each supported
node becomes an :class:`Op` that knows, for a box of its output, the box of every tensor
input it reads (:meth:`Op.needs`), *unclamped*: a convolution's window may reach past the
image border, and how far is exactly the zero (conv) or -inf (max-pool) padding the tile
must add there. :func:`analyse` walks the block backwards from an output box; a value
read by several consumers (a residual's skip tensor) holds the hull of their needs.

Supported ops: ``conv2d`` (stride, padding, dilation, groups incl. depthwise),
``max_pool2d``, ``batch_norm`` in eval mode, elementwise unary ops (ReLU, ReLU6, dropout
in eval mode, ...), same-shape ``add``/``sub``/``mul``, ``adaptive_avg_pool2d``,
``flatten`` from dim 1 and ``linear`` on ``(N, F)`` inputs. The last three cannot be
split spatially (a 1×1 pool or a linear layer needs its whole input), see
:attr:`Op.spatial`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from edgeslice.broker.protocol.boxes import Box
from edgeslice.broker.protocol.errors import PlanningError

aten = torch.ops.aten

UNARY = frozenset(
    {
        aten.relu.default,
        aten.relu6.default,
        aten.hardtanh.default,
        aten.leaky_relu.default,
        aten.elu.default,
        aten.tanh.default,
        aten.sigmoid.default,
        aten.silu.default,
        aten.gelu.default,
        aten.hardswish.default,
        aten.hardsigmoid.default,
        aten.clone.default,
        aten.dropout.default,  # only with train=False (checked in parse_op)
    }
)
BINARY = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor})


@dataclass(frozen=True)
class Window:
    """One spatial dimension of a sliding window (conv or pool)."""

    kernel: int
    stride: int
    padding: int
    dilation: int

    def need(self, lo: int, hi: int) -> tuple[int, int]:
        """Input rows (unclamped, may reach into the padding) that output rows ``[lo, hi)`` read."""
        start = lo * self.stride - self.padding
        return start, (hi - 1) * self.stride - self.padding + self.dilation * (self.kernel - 1) + 1


@dataclass(frozen=True)
class Op:
    """One ATen node of a block as the region analysis sees it."""

    node: fx.Node
    kind: str  # conv, maxpool, bn, unary, binary, adapool, flatten, linear
    inputs: tuple[fx.Node, ...]  # tensor arguments, in argument order
    shape: tuple[int, ...]  # output shape, batch first
    in_shapes: tuple[tuple[int, ...], ...]
    windows: tuple[Window, ...] = ()  # conv / max-pool: (H, W)
    groups: int = 1
    params: tuple[str | None, ...] = ()  # get_attr targets: (weight, bias[, mean, var])
    row_bytes: tuple[int, ...] = ()  # bytes of one dim-0 row of each parameter (0: None)

    @property
    def spatial(self) -> bool:
        """Whether a tile may cover part of this op's height and width."""
        if self.kind in ("flatten", "linear"):
            return False
        if self.kind == "adapool":
            pairs = zip(self.in_shapes[0][2:], self.shape[2:], strict=True)
            return all(o > 1 and i % o == 0 for i, o in pairs)
        return True

    def channel_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The output channels a conv tile computes for ``[lo, hi)``: whole groups."""
        if self.kind != "conv" or self.groups == 1:
            return lo, hi
        per = self.shape[1] // self.groups
        return lo // per * per, -(-hi // per) * per

    def needs(self, box: Box) -> list[Box]:
        """For output region ``box``, the unclamped region each tensor input is read on."""
        return _NEEDS[self.kind](self, box)


def _conv_needs(op: Op, box: Box) -> list[Box]:
    cin = op.in_shapes[0][1]
    if op.groups == 1:
        channels = (0, cin)
    else:
        lo, hi = op.channel_range(*box[0])
        per_out, per_in = op.shape[1] // op.groups, cin // op.groups
        channels = (lo // per_out * per_in, hi // per_out * per_in)
    spatial = tuple(w.need(lo, hi) for w, (lo, hi) in zip(op.windows, box[1:], strict=True))
    return [(channels, *spatial)]


def _pool_needs(op: Op, box: Box) -> list[Box]:
    spatial = tuple(w.need(lo, hi) for w, (lo, hi) in zip(op.windows, box[1:], strict=True))
    return [(box[0], *spatial)]


def _same_needs(op: Op, box: Box) -> list[Box]:
    return [box] * len(op.inputs)


def _adapool_needs(op: Op, box: Box) -> list[Box]:
    spatial = []
    for (lo, hi), n_in, n_out in zip(box[1:], op.in_shapes[0][2:], op.shape[2:], strict=True):
        if (lo, hi) == (0, n_out):
            spatial.append((0, n_in))
        elif n_in % n_out == 0:
            spatial.append((lo * (n_in // n_out), hi * (n_in // n_out)))
        else:
            raise PlanningError(
                f"{op.node.name}: adaptive pool {n_in} -> {n_out} cannot be split spatially "
                "(input not a multiple of the output)"
            )
    return [(box[0], *spatial)]


def _flatten_needs(op: Op, box: Box) -> list[Box]:
    _, _, h, w = op.in_shapes[0]
    (lo, hi), plane = box[0], h * w
    return [((lo // plane, -(-hi // plane)), (0, h), (0, w))]


def _linear_needs(op: Op, box: Box) -> list[Box]:
    return [((0, op.in_shapes[0][1]),)]


_NEEDS: dict[str, Callable[[Op, Box], list[Box]]] = {
    "conv": _conv_needs,
    "maxpool": _pool_needs,
    "bn": _same_needs,
    "unary": _same_needs,
    "binary": _same_needs,
    "adapool": _adapool_needs,
    "flatten": _flatten_needs,
    "linear": _linear_needs,
}


def shape_of(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(d) for d in node.meta["val"].shape)


def _pair(value: Any, default: Sequence[int]) -> tuple[int, int]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    values = values or list(default)
    return (int(values[0]), int(values[-1]))


def _windows(kw: dict[str, Any], kernel: tuple[int, int]) -> tuple[Window, ...]:
    stride = _pair(kw.get("stride", 1), kernel)
    padding = _pair(kw.get("padding", 0), (0, 0))
    dilation = _pair(kw.get("dilation", 1), (1, 1))
    return tuple(Window(kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))


def _target(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return str(value.target)
    raise ValueError("a parameter is computed, not a stored tensor")


def parse_op(node: fx.Node, module: fx.GraphModule) -> Op | str:
    """The :class:`Op` for ``node``, or a one-line reason why tiling cannot handle it."""
    op = _parse(node, module)
    if isinstance(op, str) or not op.params:
        return op
    rows = []
    for target in op.params:
        value = None if target is None else stored_tensor(module, target)
        rows.append(0 if value is None else value.numel() // value.shape[0] * value.element_size())
    return dataclasses.replace(op, row_bytes=tuple(rows))


def _parse(node: fx.Node, module: fx.GraphModule) -> Op | str:
    val = node.meta.get("val")
    if node.op != "call_function" or not isinstance(val, Tensor):
        return f"{node.name}: not a tensor op"
    if not val.dtype.is_floating_point:
        return f"{node.name}: {val.dtype} output"
    pair = node.normalized_arguments(module, normalize_to_only_use_kwargs=True)
    if pair is None:
        return f"{node.name}: {node.target} has no schema"
    kw = dict(pair.kwargs)
    first = kw.get("input", kw.get("self"))
    if not isinstance(first, fx.Node):
        return f"{node.name}: first argument is not a tensor"
    shape = tuple(int(d) for d in val.shape)
    base: dict[str, Any] = {"node": node, "inputs": (first,), "shape": shape}
    base["in_shapes"] = (shape_of(first),)
    rank = len(base["in_shapes"][0])
    target = node.target
    try:
        if target is aten.conv2d.default and rank == 4:
            params = (_target(kw["weight"]), _target(kw.get("bias")))
            kh, kw_ = stored_tensor(module, params[0] or "").shape[2:]
            return Op(
                kind="conv",
                windows=_windows(kw, (int(kh), int(kw_))),
                groups=int(kw.get("groups", 1)),
                params=params,
                **base,
            )
        if target is aten.max_pool2d.default and rank == 4:
            kernel = _pair(kw["kernel_size"], ())
            return Op(kind="maxpool", windows=_windows(kw, kernel), **base)
        if target is aten.batch_norm.default and rank in (2, 4) and not kw["training"]:
            names = ("weight", "bias", "running_mean", "running_var")
            return Op(kind="bn", params=tuple(_target(kw.get(n)) for n in names), **base)
        if target in UNARY and not kw.get("train", False):
            return Op(kind="unary", **base)
        if target in BINARY:
            other = kw.get("other")
            if isinstance(other, fx.Node):
                if shape_of(other) != shape or base["in_shapes"][0] != shape:
                    return f"{node.name}: broadcasting {target}"
                base["inputs"] = (first, other)
                base["in_shapes"] = (shape, shape)
            elif not isinstance(other, int | float):
                return f"{node.name}: {target} with {type(other).__name__}"
            return Op(kind="binary", **base)
        if target is aten.adaptive_avg_pool2d.default and rank == 4:
            return Op(kind="adapool", **base)
        flat = kw.get("start_dim") == 1 and kw.get("end_dim", -1) in (-1, 3)
        if target is aten.flatten.using_ints and rank == 4 and flat:
            return Op(kind="flatten", **base)
        if target is aten.linear.default and rank == 2:
            return Op(
                kind="linear", params=(_target(kw["weight"]), _target(kw.get("bias"))), **base
            )
    except (KeyError, ValueError) as exc:
        return f"{node.name}: {exc}"
    return f"{node.name}: {target} on a rank-{rank} tensor is not supported by tiling"


def stored_tensor(module: fx.GraphModule, target: str) -> Tensor:
    value = functools.reduce(getattr, target.split("."), module)
    if not isinstance(value, Tensor):
        raise ValueError(f"{target} is not a tensor")
    return value


# ---- boxes with padding -------------------------------------------------------------------


def clamp(want: Box, shape: Sequence[int]) -> Box:
    """The part of ``want`` (unclamped, batch excluded) inside a tensor of ``shape``; may be
    empty in a dimension (``lo == hi``) when a window lies wholly in the padding."""
    out = []
    for (lo, hi), n in zip(want, shape[1:], strict=True):
        a = min(max(lo, 0), n)
        out.append((a, min(max(hi, a), n)))
    return tuple(out)


def pads(want: Box, shape: Sequence[int]) -> list[tuple[int, int]]:
    """Padding (before, after) per dimension that turns ``clamp(want)`` into ``want``."""
    out = []
    for (lo, hi), (a, b) in zip(want, clamp(want, shape), strict=True):
        before = max(0, min(a - lo, hi - lo))
        out.append((before, (hi - lo) - (b - a) - before))
    return out


def _held_part(want: Box, shape: Sequence[int]) -> Box:
    """What the producer must hold for ``want``: its clamped part, or one element at the
    nearest border when the window is all padding (so every value stays non-empty)."""
    out = []
    for (lo, _), (a, b), n in zip(want, clamp(want, shape), shape[1:], strict=True):
        e = min(max(lo, 0), n - 1)
        out.append((a, b) if b > a else (e, e + 1))
    return tuple(out)


def hull(a: Box, b: Box) -> Box:
    return tuple((min(x0, y0), max(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))


@dataclass(frozen=True)
class Regions:
    """What one tile computes: the region of every value it holds, and what each op reads."""

    held: dict[fx.Node, Box]  # block source included: its entry is the tile's input box
    reads: dict[tuple[fx.Node, int], Box]  # (op node, tensor argument) -> unclamped window


def analyse(ops: Sequence[Op], source: fx.Node, output: fx.Node, out_box: Box) -> Regions:
    """Backward region analysis of one tile of a block (ops in execution order)."""
    held: dict[fx.Node, Box] = {output: out_box}
    reads: dict[tuple[fx.Node, int], Box] = {}
    for op in reversed(ops):
        box = held.get(op.node)
        if box is None:
            continue  # feeds nothing the tile computes
        for j, (arg, want) in enumerate(zip(op.inputs, op.needs(box), strict=True)):
            reads[(op.node, j)] = want
            part = _held_part(want, op.in_shapes[j])
            held[arg] = hull(held[arg], part) if arg in held else part
    if source not in held:
        raise PlanningError(f"block output {output.name} does not depend on its input")
    return Regions(held, reads)


def conv_flops(op: Op, box: Box, batch: int) -> float:
    """FLOPs of a conv or linear tile as ``torch.utils.flop_counter`` counts them (2·MACs)."""
    if op.kind == "linear":
        return 2.0 * batch * op.in_shapes[0][1] * (box[0][1] - box[0][0])
    if op.kind != "conv":
        return 0.0
    lo, hi = op.channel_range(*box[0])
    per_in = op.in_shapes[0][1] // op.groups
    window = math.prod(w.kernel for w in op.windows)
    return 2.0 * batch * (hi - lo) * per_in * window * math.prod(b - a for a, b in box[1:])
