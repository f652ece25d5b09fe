"""Cuts a profiled model into stage artifacts: signed, self-contained programs an agent runs.

A stage is a run of consecutive profile segments. Its program is the slice of the
exported ATen graph between two cut points, rebuilt as a ``GraphModule`` whose inputs
are the tensors crossing the cut before it and whose outputs are those crossing the
cut after it — always a flat tuple, so several model inputs or several crossing
tensors need no special case. That module is exported again with ``torch.export``
(inputs captured from one reference run of the whole graph) and written with
``torch.export.save``, which stores the graph as JSON and plain tensors as raw bytes.
The agent therefore needs neither the user's code nor our pickles; the archive is
still signed with the planner's private key (:mod:`broker.protocol.artifacts`) because
``torch.export.load`` *can* unpickle (tensor subclasses, sample inputs), and we drop
the sample inputs before saving so that stages do not carry a copy of an activation.

Every stage is checked before it is returned: the exported program is run on its
captured inputs and must reproduce the reference outputs. Exports are cached on the
traced graph per (node range, compression), so re-planning with a cut that was used
before only re-signs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import time
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from edgeslice.broker.protocol.artifacts import (
    STAGE_FORMAT,
    STAGE_KIND,
    PrivateKey,
    TensorSpec,
    artifact_id,
    seal,
)
from edgeslice.broker.protocol.errors import ArtifactError, PlanningError
from edgeslice.planner.batchdim import Template, batch_literals, export_batched, instantiate
from edgeslice.planner.profile import (
    ModelProfile,
    TracedGraph,
    crossing_after,
    live_ranges,
    reference_run,
)

log = logging.getLogger(__name__)

COMPRESSIONS = (None, "zlib")
_RTOL, _ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class StageArtifact:
    """One signed stage: segments ``[start_segment, end_segment)`` of the profile."""

    index: int
    start_segment: int
    end_segment: int
    sha256: str  # artifact_id(data): the content address agents fetch and cache by
    data: bytes = field(repr=False)  # the sealed envelope
    size: int
    input_specs: tuple[TensorSpec, ...]
    output_specs: tuple[TensorSpec, ...]
    param_bytes: int
    batchable: bool = False  # exported with a dynamic dim 0 (planner/batchdim.py)


@dataclass(frozen=True)
class _Exported:
    body: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    param_bytes: int
    seconds: float
    batchable: bool = False


def _spec(name: str, value: Tensor) -> TensorSpec:
    return TensorSpec(
        tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch."), name
    )


def _install(root: nn.Module, source: fx.GraphModule, target: str) -> None:
    """Copy attribute ``target`` from ``source`` into ``root``, keeping param/buffer kinds."""
    *path, leaf = target.split(".")
    src_parent = functools.reduce(getattr, path, source)
    dst_parent = root
    for part in path:
        if not hasattr(dst_parent, part):
            dst_parent.add_module(part, nn.Module())
        dst_parent = getattr(dst_parent, part)
    value = getattr(src_parent, leaf)
    if isinstance(value, nn.Parameter):
        dst_parent.register_parameter(leaf, value)
    elif isinstance(src_parent, nn.Module) and leaf in src_parent._buffers:
        dst_parent.register_buffer(leaf, value)
    elif isinstance(value, nn.Module):
        dst_parent.add_module(leaf, value)
    else:
        setattr(dst_parent, leaf, value)


def stage_module(
    graph: TracedGraph,
    first: int,
    last: int,
    inputs: Sequence[fx.Node],
    outputs: Sequence[fx.Node],
    batch_literals: Mapping[fx.Node, Template] | None = None,
) -> fx.GraphModule:
    """The sub-graph of nodes ``first..last`` as a module: flat inputs in, flat tuple out.

    With ``batch_literals`` (planner/batchdim.py) the batch size in node arguments becomes
    an expression of the first input's dim 0, so the module runs at any batch size.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root = nn.Module()
    for i, node in enumerate(inputs):
        env[node] = g.placeholder(f"in{i}_{node.name}")
    batch_node: list[fx.Node] = []

    def batch() -> fx.Node:
        if not batch_node:
            batch_node.append(g.call_function(torch.ops.aten.sym_size.int, (env[inputs[0]], 0)))
        return batch_node[0]

    def remap(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise ArtifactError(f"stage {first}..{last} reads {node.name} from outside")
            _install(root, graph.module, str(node.target))
            env[node] = g.get_attr(str(node.target))
        return env[node]

    for node in graph.order[first : last + 1]:
        template = (batch_literals or {}).get(node)
        if template is None:
            env[node] = g.node_copy(node, remap)
            continue
        args, kwargs = instantiate(template, remap, batch, g)  # expressions before their user
        env[node] = copied = g.node_copy(node, remap)
        copied.args, copied.kwargs = args, kwargs
    g.output(tuple(remap(v) for v in outputs))
    gm = fx.GraphModule(root, g)
    return gm


def _boundary_nodes(profile: ModelProfile, b: int) -> list[fx.Node]:
    graph, segments = profile.graph, profile.segments
    if b == 0:
        return list(graph.placeholders)
    if b == len(segments):
        return list(graph.outputs)
    defined, last = live_ranges(graph)
    return crossing_after(graph, segments[b - 1].last, defined, last)


def _export(
    gm: nn.Module,
    inputs: list[Tensor],
    expected: list[Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    compression: str | None,
    label: str,
    batched: fx.GraphModule | None = None,
) -> _Exported:
    """Export, save and self-check one stage module; with ``batched`` (the same stage with
    the batch size as an expression) try a dynamic batch first, fixed shapes if it fails."""
    start = time.perf_counter()
    ep = None
    if batched is not None:
        try:
            ep = export_batched(batched, inputs, expected)
        except Exception as exc:  # not batchable: fixed shapes, one request at a time
            log.info("%s: no dynamic batch (%s: %s)", label, type(exc).__name__, str(exc)[:300])
    batchable = ep is not None
    with torch.no_grad():
        if ep is None:
            ep = torch.export.export(gm, tuple(inputs))
        got = ep.module()(*inputs)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape or not torch.allclose(g, e, rtol=_RTOL, atol=_ATOL):
            raise ArtifactError(
                f"{label}: exported program disagrees with the reference on "
                f"output {i} ({output_names[i]})"
            )
    ep.example_inputs = None  # an activation copy the agent never needs
    for node in ep.graph.nodes:
        # provenance naming Python object ids (graph_id): the only part of the archive that
        # differs between two exports of the same cut, so a restarted planner could not
        # rebuild the artifacts it published (same cut -> same sha; planner/startup.py)
        node.meta.pop("from_node", None)
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    body = buffer.getvalue()
    if compression == "zlib":
        body = zlib.compress(body, 6)
    params = {id(t): t.numel() * t.element_size() for t in ep.state_dict.values()}
    params.update(
        {
            id(t): t.numel() * t.element_size()
            for t in ep.constants.values()
            if isinstance(t, Tensor)
        }
    )
    return _Exported(
        body=body,
        inputs=tuple(_spec(n, t) for n, t in zip(input_names, inputs, strict=True)),
        outputs=tuple(_spec(n, t) for n, t in zip(output_names, expected, strict=True)),
        param_bytes=sum(params.values()),
        seconds=time.perf_counter() - start,
        batchable=batchable,
    )


def _check_boundaries(profile: ModelProfile, boundaries: Sequence[int]) -> list[int]:
    bounds = [int(b) for b in boundaries]
    n = len(profile.segments)
    if (
        len(bounds) < 2
        or bounds[0] != 0
        or bounds[-1] != n
        or any(a >= b for a, b in itertools.pairwise(bounds))
    ):
        raise PlanningError(
            f"stage boundaries {bounds} must rise strictly from 0 to {n} (the segment count "
            f"of model {profile.name!r})"
        )
    return bounds


def build_stages(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    profile: ModelProfile,
    boundaries: Sequence[int],
    key: PrivateKey,
    compression: str | None = None,
    batch: bool = True,
    only: Collection[int] | None = None,
) -> list[StageArtifact]:
    """Build, check, save and sign one artifact per stage between consecutive ``boundaries``
    (``only``: just the stages of these indices, e.g. the whole blocks of a tiled plan).

    ``key`` is the planner's Ed25519 private key (:func:`broker.fleetkey.load_signing_key`).

    ``boundaries`` are segment indices, e.g. ``[0, 5, 12, n]`` gives three stages;
    ``compression`` is ``None`` or ``"zlib"`` (applied to the saved archive, recorded
    in the signed meta). ``module`` is run once eagerly to check that the traced graph
    still matches it. With ``batch`` (default) each stage is exported with a dynamic
    batch dimension where it can be (planner/batchdim.py; meta ``batchable``).
    """
    if compression not in COMPRESSIONS:
        raise PlanningError(
            f"unknown artifact compression {compression!r}; use one of {COMPRESSIONS}"
        )
    bounds = _check_boundaries(profile, boundaries)
    graph = profile.graph
    inputs = tuple(example_inputs)
    crossings = [_boundary_nodes(profile, b) for b in bounds]
    keep = {v for nodes in crossings for v in nodes}
    values: dict[fx.Node, Any] = dict(zip(graph.placeholders, inputs, strict=True))
    values.update(reference_run(graph, inputs, keep=keep, count_flops=False).values)
    with torch.no_grad():
        eager = module.eval()(*inputs)
    flat_eager = torch.utils._pytree.tree_leaves(eager)
    for i, (ref, out) in enumerate(
        zip((values[v] for v in graph.outputs), flat_eager, strict=False)
    ):
        if not torch.allclose(ref, out, rtol=_RTOL, atol=_ATOL):
            raise ArtifactError(
                f"model {profile.name!r}: traced graph output {i} differs "
                "from the module's own output; was the module changed?"
            )
    cache: dict[Any, _Exported] = graph.cache
    literals, why_not = batch_literals(module, inputs, graph) if batch else (None, "off")
    if literals is None and batch:
        log.info("model %s: stages run one request at a time: %s", profile.name, why_not)
    artifacts = []
    for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if only is not None and index not in only:
            continue
        first, last = profile.segments[lo].first, profile.segments[hi - 1].last
        ins, outs = crossings[index], crossings[index + 1]
        cache_key = (first, last, compression, literals is not None)
        exported = cache.get(cache_key)
        if exported is None:
            gm = stage_module(graph, first, last, ins, outs)
            generic = (
                None if literals is None else stage_module(graph, first, last, ins, outs, literals)
            )
            exported = _export(
                gm,
                [values[v] for v in ins],
                [values[v] for v in outs],
                [v.name for v in ins],
                [v.name for v in outs],
                compression,
                f"model {profile.name!r} stage {index}",
                generic,
            )
            cache[cache_key] = exported
            log.info(
                "exported model=%s stage=%d segments=%d..%d bytes=%d seconds=%.2f",
                profile.name,
                index,
                lo,
                hi,
                len(exported.body),
                exported.seconds,
            )
        artifacts.append(_seal(exported, profile.name, index, lo, hi, compression, key))
    return artifacts


def _seal(
    exported: _Exported,
    model: str,
    index: int,
    lo: int,
    hi: int,
    compression: str | None,
    key: PrivateKey,
    extra: Mapping[str, Any] | None = None,
) -> StageArtifact:
    """Sign one exported stage with its meta (``extra``: more signed meta, e.g. a tile's)."""
    meta = {
        "kind": STAGE_KIND,
        "format": STAGE_FORMAT,
        "torch": torch.__version__.split("+")[0],
        "model": model,
        "index": index,
        "start_segment": lo,
        "end_segment": hi,
        "inputs": [s.to_wire() for s in exported.inputs],
        "outputs": [s.to_wire() for s in exported.outputs],
        "param_bytes": exported.param_bytes,
        "compression": compression or "none",
        "batchable": exported.batchable,
        "body_sha256": hashlib.sha256(exported.body).hexdigest(),
        **(extra or {}),
    }
    data = seal(exported.body, meta, key)
    return StageArtifact(
        index=index,
        start_segment=lo,
        end_segment=hi,
        sha256=artifact_id(data),
        data=data,
        size=len(data),
        input_specs=exported.inputs,
        output_specs=exported.outputs,
        param_bytes=exported.param_bytes,
        batchable=exported.batchable,
    )


class _FlatTuple(nn.Module):
    """A module whose outputs are always a flat tuple, as stage programs' are."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.utils._pytree.tree_leaves(self.inner(*inputs)))


def build_module_artifact(
    module: nn.Module,
    inputs: Sequence[Tensor],
    expected: Sequence[Tensor],
    *,
    model: str,
    index: int,
    start_segment: int,
    end_segment: int,
    key: PrivateKey,
    compression: str | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> StageArtifact:
    """One signed stage artifact from any module (e.g. one tile of a tiled block,
    planner/intraplan.py): exported with fixed shapes, checked to reproduce ``expected``
    on ``inputs``, saved and sealed exactly like :func:`build_stages`' stages."""
    if compression not in COMPRESSIONS:
        raise PlanningError(f"unknown artifact compression {compression!r}")
    label = f"model {model!r} stage {index}"
    exported = _export(
        _FlatTuple(module.eval()),
        list(inputs),
        list(expected),
        [f"in{i}" for i in range(len(inputs))],
        [f"out{i}" for i in range(len(expected))],
        compression,
        label,
    )
    return _seal(exported, model, index, start_segment, end_segment, compression, key, extra_meta)
