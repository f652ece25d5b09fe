"""Gives stage programs a dynamic batch dimension, so an agent can run several requests at once.

The profile's graph is traced at the example input's batch size ``B0``, so every shape
computed from the batch is a literal in it: ``view(x, [1, 32, 3, 4, 64])`` in an attention
block, ``expand(cls, [1, -1, -1])``. Which literals are the batch is not guessable from
one trace (with ``B0 = 1``, a 1 may be anything), so :func:`batch_literals` traces the
model a second time at ``2·B0`` (the *twin*) and compares the two graphs node by node:
an int argument that differs is a function of the batch, taken as ``scale·B + offset``
from its two values. A stage replaces each such literal by that expression over its first
input's dim 0 (:func:`instantiate`), and :func:`export_batched` exports it with
``torch.export.Dim`` on dim 0 of every input.

Nothing here is trusted unchecked: the batched program must reproduce the reference at
the example batch and, on a batch of three different inputs, what it gives for each of
them alone (``allclose``). A model whose twin graph differs in structure (control flow on
the batch size), inputs without a common dim 0, an export that fails or a check that
disagrees make the stage *not batchable*: it is exported with fixed shapes as before, and
its artifact says ``batchable: false`` so the agent runs its requests one by one.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from edgeslice.planner.tracing import TracedGraph, trace

log = logging.getLogger(__name__)

MAX_BATCH = 1024  # the largest batch an exported stage accepts
CHECK_BATCH = 3  # the verification batch: three different inputs at once
_TWIN_KEY = "batch_twin"  # in TracedGraph.cache, beside planner.stages' exports
_RTOL, _ATOL = 1e-4, 1e-5


@dataclass(frozen=True)
class BatchInt:
    """An int argument that is ``scale * batch + offset`` (batch: the stage's dim 0)."""

    scale: int
    offset: int


Template = tuple[Any, Any]  # (args, kwargs) with BatchInt where the batch enters


def example_batch(inputs: Sequence[Tensor]) -> int | None:
    """The common dim 0 of all ``inputs``; None when they have none (a scalar, or sizes
    that differ), which makes batching impossible."""
    sizes = {int(t.shape[0]) if isinstance(t, Tensor) and t.dim() > 0 else -1 for t in inputs}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        return None
    return sizes.pop()


def _template(a: Any, b: Any, b0: int, same: Callable[[fx.Node, Any], bool]) -> tuple[Any, bool]:
    """``a`` (at batch b0) with each int that differs in ``b`` (at 2·b0) as a BatchInt, and
    whether there was one; raises ValueError where the two differ otherwise."""
    if isinstance(a, fx.Node):
        if not same(a, b):
            raise ValueError(f"argument {a.name} is another node at twice the batch")
        return a, False
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        parts = [_template(x, y, b0, same) for x, y in zip(a, b, strict=True)]
        out = [p for p, _ in parts]
        return (tuple(out) if isinstance(a, tuple) else out), any(c for _, c in parts)
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        kw = {k: _template(a[k], b[k], b0, same) for k in a}
        return {k: p for k, (p, _) in kw.items()}, any(c for _, c in kw.values())
    if type(a) is type(b) and a == b:
        return a, False
    if type(a) is int and type(b) is int and (b - a) % b0 == 0:
        scale = (b - a) // b0
        return BatchInt(scale, a - scale * b0), True
    raise ValueError(f"argument {a!r} becomes {b!r} at twice the batch")


def batch_literals(
    module: nn.Module, inputs: Sequence[Tensor], graph: TracedGraph
) -> tuple[dict[fx.Node, Template] | None, str]:
    """Per node of ``graph`` whose arguments hold the batch size: its (args, kwargs) template.

    Returns ``(None, reason)`` when the model cannot take a dynamic batch. Cached on the
    graph (one extra trace per model).
    """
    cached = graph.cache.get(_TWIN_KEY)
    if cached is None:
        cached = graph.cache[_TWIN_KEY] = _batch_literals(module, tuple(inputs), graph)
    result: tuple[dict[fx.Node, Template] | None, str] = cached
    return result


def _batch_literals(
    module: nn.Module, inputs: tuple[Tensor, ...], graph: TracedGraph
) -> tuple[dict[fx.Node, Template] | None, str]:
    b0 = example_batch(inputs)
    if b0 is None:
        return None, "the model inputs have no common batch dimension (dim 0)"
    try:
        twin = trace(module, tuple(torch.cat([t, t]) for t in inputs))
    except Exception as exc:
        return None, f"the model does not trace at batch {2 * b0}: {str(exc)[:200]}"
    if len(twin.order) != len(graph.order) or len(twin.placeholders) != len(graph.placeholders):
        return None, "the traced graph changes with the batch size (control flow on it)"
    ia = {n: i for i, n in enumerate(graph.module.graph.nodes)}
    ib = {n: i for i, n in enumerate(twin.module.graph.nodes)}

    def same(x: fx.Node, y: Any) -> bool:
        return isinstance(y, fx.Node) and ia[x] == ib[y]

    found: dict[fx.Node, Template] = {}
    for a, b in zip(graph.order, twin.order, strict=True):
        if a.target != b.target:
            return None, f"node {a.name} is {a.target} at one batch size, {b.target} at another"
        try:
            (args, kwargs), changed = _template((a.args, a.kwargs), (b.args, b.kwargs), b0, same)
        except ValueError as exc:
            return None, f"node {a.name}: {exc}"
        if changed:
            found[a] = (args, kwargs)
    return found, ""


def instantiate(
    template: Any, remap: Callable[[fx.Node], fx.Node], batch: Callable[[], fx.Node], g: fx.Graph
) -> Any:
    """The template with nodes remapped into ``g`` and each BatchInt an expression of
    ``batch()`` (the stage's dim 0 as a SymInt node), created in ``g`` before its user."""
    if isinstance(template, BatchInt):
        value: Any = batch()
        if template.scale != 1:
            value = g.call_function(operator.mul, (value, template.scale))
        if template.offset:
            value = g.call_function(operator.add, (value, template.offset))
        return value
    if isinstance(template, fx.Node):
        return remap(template)
    if isinstance(template, list | tuple):
        out = [instantiate(v, remap, batch, g) for v in template]
        return tuple(out) if isinstance(template, tuple) else out
    if isinstance(template, dict):
        return {k: instantiate(v, remap, batch, g) for k, v in template.items()}
    return template


def batch_of(inputs: Sequence[Tensor], k: int) -> list[Tensor]:
    """``k`` different samples of ``inputs`` concatenated on dim 0 (float inputs scaled and
    shifted, integer ones rolled), so a program that mixes samples is caught."""
    out = []
    for t in inputs:
        parts = []
        for i in range(k):
            if t.is_floating_point():
                parts.append(t * (1.0 + 0.25 * i) + 0.01 * i)
            elif t.dim() > 1 and t.dtype != torch.bool:
                parts.append(torch.roll(t, shifts=i, dims=-1))
            else:
                parts.append(t)
        out.append(torch.cat(parts))
    return out


def _close(got: Sequence[Tensor], expected: Sequence[Tensor]) -> bool:
    return len(got) == len(expected) and all(
        g.shape == e.shape and torch.allclose(g, e, rtol=_RTOL, atol=_ATOL)
        for g, e in zip(got, expected, strict=True)
    )


def export_batched(gm: fx.GraphModule, inputs: Sequence[Tensor], expected: Sequence[Tensor]) -> Any:
    """Export ``gm`` with a dynamic dim 0 on every input and check it (module docstring);
    raises ValueError (or torch's own error) when it cannot be batched."""
    b0 = example_batch(inputs)
    if b0 is None:
        raise ValueError("stage inputs have no common batch dimension")
    if any(not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != b0 for t in expected):
        raise ValueError("a stage output does not carry the batch on dim 0")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH * b0)
    with torch.no_grad():
        ep = torch.export.export(
            gm, tuple(batch_of(inputs, 2)), dynamic_shapes=tuple({0: batch} for _ in inputs)
        )
        program = ep.module()
        if not _close(list(program(*inputs)), expected):
            raise ValueError("the batched program disagrees with the reference at batch size 1")
        mixed = batch_of(inputs, CHECK_BATCH)
        together = list(program(*mixed))
        alone = [list(program(*(t[i * b0 : (i + 1) * b0] for t in mixed))) for i in range(3)]
    for j, out in enumerate(together):
        if out.shape[0] != CHECK_BATCH * b0:
            raise ValueError(f"output {j} has {out.shape[0]} rows for {CHECK_BATCH * b0} inputs")
        if not _close(list(out.split(b0)), [a[j] for a in alone]):
            raise ValueError(f"output {j} differs when requests run together (samples mix)")
    return ep


def literal_count(templates: Mapping[fx.Node, Template], nodes: Sequence[fx.Node]) -> int:
    """How many nodes of ``nodes`` carry the batch size in their arguments."""
    return sum(1 for n in nodes if n in templates)
