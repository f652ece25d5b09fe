"""Profiles a model: where it can be cut, and what each segment between cuts costs.

The model is traced with ``torch.export`` (which, unlike ``torch.fx.symbolic_trace``,
handles Python control flow on shapes) into a flat ATen graph. A *cut point* is a
position in the graph's node order where only activations cross — at most
:data:`MAX_CROSSING` tensors, never a parameter, and none computed from another one
crossing with it, so a cut never falls inside a residual block. Nodes between two
cut points form a *segment*; the planner assigns whole runs of segments to devices.

Per segment we measure FLOPs (``FlopCounterMode`` on a real reference run, node by
node), parameter + buffer bytes (each tensor counted once per segment), the bytes that
cross the cut after it, and a peak working-memory estimate from a liveness walk.

``max_segments`` merges adjacent segments greedily: the adjacent pair with the smallest
combined FLOPs goes first (ties: drop the cut with the larger crossing), so that cheap
elementwise segments fold into their neighbours and the planner's DP stays small while
the cuts left are spread by compute.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, fx, nn

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.planner.tracing import (
    TracedGraph,
    crossing_after,
    is_view,
    live_ranges,
    reference_run,
    trace,
    value_bytes,
)
from edgeslice.planner.tracing import (
    count_flops as count_flops,  # re-exported: part of this module's API
)

if TYPE_CHECKING:
    from edgeslice.planner.costmodel import ModelCost

log = logging.getLogger(__name__)

MAX_CROSSING = 4  # tensors allowed to cross one cut


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape, dtype and size of one tensor crossing a cut (or a model input)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class SegmentProfile:
    """One segment: graph nodes ``first..last`` (positions in the node order) and its costs."""

    index: int
    first: int
    last: int
    node_names: tuple[str, ...]
    flops: float
    param_bytes: int
    out_bytes: int
    act_bytes: int
    outputs: tuple[TensorInfo, ...]  # what crosses the cut after this segment


@dataclass(frozen=True)
class ModelProfile:
    """Segments of a model in execution order; ``graph`` is kept for :mod:`planner.stages`."""

    name: str
    inputs: tuple[TensorInfo, ...]
    segments: tuple[SegmentProfile, ...]
    graph: TracedGraph = field(compare=False, repr=False)

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def total_flops(self) -> float:
        return sum(s.flops for s in self.segments)

    def crossing(self, boundary: int) -> tuple[TensorInfo, ...]:
        """Tensors that cross boundary ``b`` (0 = the model inputs, n = the model outputs)."""
        return self.inputs if boundary == 0 else self.segments[boundary - 1].outputs

    def to_cost(self) -> ModelCost:
        """The planner's pure cost view of this profile (no torch inside)."""
        from edgeslice.planner.costmodel import ModelCost, Segment

        segments = tuple(
            Segment(
                flops=s.flops,
                param_bytes=s.param_bytes,
                out_bytes=s.out_bytes,
                act_bytes=s.act_bytes,
            )
            for s in self.segments
        )
        return ModelCost(name=self.name, input_bytes=self.input_bytes, segments=segments)


def tensor_info(name: str, value: Any) -> TensorInfo:
    """Describe a tensor value; ``ConfigError`` for anything else (e.g. a Python int output)."""
    if not isinstance(value, Tensor):
        raise ConfigError(
            f"graph value {name!r} is a {type(value).__name__}, not a tensor; edgeslice moves "
            "only tensors between devices, so make the model return tensors"
        )
    dtype = str(value.dtype).removeprefix("torch.")
    return TensorInfo(
        name, tuple(int(d) for d in value.shape), dtype, value.numel() * value.element_size()
    )


def _ancestors(graph: TracedGraph, defined: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Bitset (Python int over definition order) of every activation's transitive inputs."""
    bit = {v: 1 << i for i, v in enumerate(defined)}
    anc: dict[fx.Node, int] = dict.fromkeys(graph.placeholders, 0)
    for node in graph.order:
        mask = 0
        for arg in node.all_input_nodes:
            if arg in bit:
                mask |= anc[arg] | bit[arg]
        anc[node] = mask
    return anc


def _cut_positions(
    graph: TracedGraph, defined: dict[fx.Node, int], last: dict[fx.Node, int]
) -> list[int]:
    """Positions after which 1..MAX_CROSSING *independent* tensors cross.

    Independent: no two crossing values share an ancestor (or are one another's
    ancestor). Inside a residual block or a fork of branches, the tensors that cross
    all descend from the block input — a cut there would ship the skip tensor or both
    half-done branches, and is refused. Unrelated tensors, such as a second model
    input still waiting to be used, may cross together.
    """
    bit = {v: 1 << i for i, v in enumerate(defined)}
    anc = _ancestors(graph, defined)
    cuts = []
    for pos in range(len(graph.order) - 1):
        crossing = crossing_after(graph, pos, defined, last)
        if not 0 < len(crossing) <= MAX_CROSSING:
            continue
        if not all(isinstance(v.meta.get("val"), Tensor) for v in crossing):
            continue
        seen = 0
        for v in crossing:
            lineage = anc[v] | bit[v]
            if seen & lineage:
                break
            seen |= lineage
        else:
            cuts.append(pos)
    return cuts


def _merge(
    ranges: list[tuple[int, int]], flops: list[float], out_bytes: list[int], limit: int
) -> list[tuple[int, int]]:
    """Merge adjacent ranges, cheapest pair first, until at most ``limit`` remain."""
    ranges, flops, out_bytes = list(ranges), list(flops), list(out_bytes)
    while len(ranges) > max(1, limit):
        k = min(range(len(ranges) - 1), key=lambda i: (flops[i] + flops[i + 1], out_bytes[i]))
        ranges[k : k + 2] = [(ranges[k][0], ranges[k + 1][1])]
        flops[k : k + 2] = [flops[k] + flops[k + 1]]
        out_bytes[k : k + 2] = [out_bytes[k + 1]]
    return ranges


def _param_bytes(gm: fx.GraphModule, nodes: list[fx.Node]) -> int:
    """Bytes of the parameters, buffers and constants the nodes read, each counted once."""
    seen: dict[str, int] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg.target not in seen:
                obj = functools.reduce(getattr, str(arg.target).split("."), gm)
                if isinstance(obj, nn.Module):
                    size = sum(value_bytes(t) for t in obj.state_dict().values())
                else:
                    size = value_bytes(obj)
                seen[str(arg.target)] = size
    return sum(seen.values())


def _peak_bytes(
    graph: TracedGraph,
    first: int,
    last_pos: int,
    nbytes: dict[fx.Node, int],
    defined: dict[fx.Node, int],
    last: dict[fx.Node, int],
) -> int:
    """Peak bytes of live activations while running nodes ``first..last_pos`` (views free)."""
    live = {v: nbytes.get(v, 0) for v in crossing_after(graph, first - 1, defined, last)}
    peak = sum(live.values())
    for pos in range(first, last_pos + 1):
        node = graph.order[pos]
        live[node] = 0 if is_view(node) else nbytes.get(node, 0)
        peak = max(peak, sum(live.values()))
        for v in [v for v in live if last[v] <= pos]:
            del live[v]
    return peak


def profile_model(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    max_segments: int | None = None,
    name: str = "model",
) -> ModelProfile:
    """Trace, find cut points, measure each segment; see the module docstring."""
    inputs = tuple(example_inputs)
    graph = trace(module, inputs)
    defined, last = live_ranges(graph)
    ref = reference_run(graph, inputs, keep=set())
    for p, value in zip(graph.placeholders, inputs, strict=True):
        ref.nbytes[p] = value_bytes(value)
    cuts = _cut_positions(graph, defined, last)
    ends = [*cuts, len(graph.order) - 1]
    ranges = [(a + 1, b) for a, b in zip([-1, *cuts], ends, strict=True)]
    seg_flops = [sum(ref.flops[graph.order[i]] for i in range(a, b + 1)) for a, b in ranges]

    def out_info(end: int) -> tuple[TensorInfo, ...]:
        values = (
            graph.outputs
            if end == len(graph.order) - 1
            else crossing_after(graph, end, defined, last)
        )
        return tuple(tensor_info(v.name, v.meta.get("val")) for v in values)

    if max_segments is not None and len(ranges) > max_segments:
        out_sizes = [sum(t.nbytes for t in out_info(b)) for _, b in ranges]
        ranges = _merge(ranges, seg_flops, out_sizes, max_segments)
    segments = []
    for index, (a, b) in enumerate(ranges):
        nodes = list(graph.order[a : b + 1])
        outputs = out_info(b)
        segments.append(
            SegmentProfile(
                index=index,
                first=a,
                last=b,
                node_names=tuple(n.name for n in nodes),
                flops=sum(ref.flops[n] for n in nodes),
                param_bytes=_param_bytes(graph.module, nodes),
                out_bytes=sum(t.nbytes for t in outputs),
                act_bytes=_peak_bytes(graph, a, b, ref.nbytes, defined, last),
                outputs=outputs,
            )
        )
    infos = tuple(tensor_info(p.name, v) for p, v in zip(graph.placeholders, inputs, strict=True))
    log.info(
        "profiled model=%s nodes=%d cut_points=%d segments=%d gflops=%.3f",
        name,
        len(graph.order),
        len(cuts),
        len(segments),
        sum(seg_flops) / 1e9,
    )
    return ModelProfile(name, infos, tuple(segments), graph)


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    return f"{n:.1f} {unit}"


def format_profile(profile: ModelProfile) -> str:
    """A readable table for ``edgeslice profile``: one row per segment, with running totals."""
    header = (
        f"{'seg':>3}  {'nodes':<34} {'FLOPs':>10} {'params':>10} {'out':>10} "
        f"{'act peak':>10} {'cum FLOPs':>10} {'cum %':>6}"
    )
    lines = [
        f"model {profile.name}: {len(profile.segments)} segments, "
        f"{_human(profile.total_flops, 'FLOP')}, input {_human(profile.input_bytes)}",
        header,
        "-" * len(header),
    ]
    total = profile.total_flops or 1.0
    cum = 0.0
    for s in profile.segments:
        cum += s.flops
        span = (
            s.node_names[0]
            if len(s.node_names) == 1
            else (f"{s.node_names[0]}..{s.node_names[-1]}")
        )
        label = f"{span[:26]} ({len(s.node_names)})"
        lines.append(
            f"{s.index:>3}  {label:<34} {_human(s.flops, 'F'):>10} "
            f"{_human(s.param_bytes):>10} {_human(s.out_bytes):>10} "
            f"{_human(s.act_bytes):>10} {_human(cum, 'F'):>10} {100 * cum / total:>5.1f}%"
        )
    return "\n".join(lines)
