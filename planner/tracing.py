"""Traces a model into one functional ATen graph and runs it node by node.

:mod:`planner.profile` finds cut points and costs on this graph, :mod:`planner.stages`
cuts artifacts out of it and :mod:`planner.timing` times it; all three need the same
graph, the same execution order and the same reference values, so they live here once.
``torch.export`` (not ``torch.fx.symbolic_trace``) is used so that models which read
shapes inside ``forward`` trace too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import flop_counter

from edgeslice.broker.protocol.errors import ConfigError

log = logging.getLogger(__name__)

_GUARDS = "_guards_fn"  # call_module node torch.export adds to check input shapes


@dataclass(frozen=True)
class TracedGraph:
    """The exported, functional graph the profile was measured on (reused to build stages)."""

    module: fx.GraphModule
    order: tuple[fx.Node, ...]  # compute nodes in execution order
    placeholders: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]  # flat model outputs
    cache: dict[Any, Any] = field(default_factory=dict, compare=False)  # planner.stages exports


def value_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(value_bytes(v) for v in value)
    return 0


def is_view(node: fx.Node) -> bool:
    """True for ops whose output aliases an input (views, getitem): they allocate nothing."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _sdpa_cpu_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return int(flop_counter.sdpa_flop_count(q, k, v))


def _flop_mode() -> flop_counter.FlopCounterMode:
    # FlopCounterMode has no formula for the CPU flash-attention kernel sdpa dispatches to.
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return flop_counter.FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa_cpu_flops})


def _functionalize(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """``ep.module()`` with in-place ops (``relu_``) replaced by their functional variant.

    Cut analysis follows data edges, which an in-place op on a value read later would
    break. The common case — the mutated value is read by nobody after the mutation —
    is rewritten directly (milliseconds); anything else goes through
    ``run_decompositions({})``, which is correct but costs seconds on a CNN.
    """
    gm = ep.module()
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    rewrites: list[tuple[fx.Node, Any]] = []
    for node in nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        base = node.args[0] if node.args else None
        name = schema.name.split("::")[-1]
        packet = getattr(torch.ops.aten, name.removesuffix("_"), None)
        overload = getattr(packet, getattr(node.target, "_overloadname", "default"), None)
        simple = (
            name.endswith("_")
            and overload is not None
            and isinstance(base, fx.Node)
            and base.op == "call_function"
            and all(position[u] <= position[node] for u in base.users)
        )
        if not simple:
            log.info("in-place op %s on a value read later: running full decomposition", node)
            return ep.run_decompositions({}).module()
        rewrites.append((node, overload))
    for node, overload in rewrites:
        node.target = overload
    gm.recompile()
    return gm


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """Hold torch's own noise about a failed export unless we log at INFO (``-v``).

    torch logs warnings and ``print``s the partial graph (dozens of lines) to stderr before
    raising; the one-line reason is what a user needs first. Captured stderr is written
    back without the graph dump, so nothing else written meanwhile is lost.
    """
    if log.isEnabledFor(logging.INFO):
        yield
        return
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg, lg.level) for lg in loggers if lg.name == "torch" or lg.level != logging.NOTSET]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    captured = io.StringIO()
    real_stderr = sys.stderr
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except Exception as exc:
        text = captured.getvalue()
        graph = getattr(exc, "partial_fx_graph", None)
        if graph:
            text = text.replace(f"{graph}\n", "")
        captured = io.StringIO(text)
        raise
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        if captured.getvalue().strip():
            real_stderr.write(captured.getvalue())


_RAISED_AT = re.compile(
    r"The following call raised this error:\s*\n\s*File \"([^\"]+)\", line (\d+), in \S+\n\s*(.+)"
)


def export_failure(module: nn.Module, exc: BaseException) -> str:
    """One line: why torch.export failed, where in the user's code, and what to do."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    found = _RAISED_AT.search(str(exc))
    if found:
        where = f" at {found.group(1)}:{found.group(2)} (`{found.group(3).strip()[:120]}`)"
    else:
        torch_dir = str(Path(torch.__file__).parent)
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if not f.filename.startswith(("<", torch_dir)) and f.filename != __file__
        ]
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return (
        f"torch.export could not trace {type(module).__name__}: {reason}{where}; make "
        "forward() exportable (no Python if/while on tensor values: see the torch.export "
        "docs on data-dependent control flow); run with -v for torch's full report"
    )


def count_flops(module: nn.Module, inputs: tuple[Tensor, ...]) -> float:
    """FLOPs of one no-grad forward pass, counted the same way as the segments are."""
    with torch.no_grad(), _flop_mode() as counter:
        module(*inputs)
    return float(counter.get_total_flops())


def trace(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> TracedGraph:
    """Export ``module`` and list its compute nodes, inputs and flat outputs."""
    module.eval()
    try:
        with _quiet_torch_export():
            ep = torch.export.export(module, tuple(example_inputs))
    except Exception as exc:
        log.info("torch.export report for %s:\n%s", type(module).__name__, exc)
        raise ConfigError(export_failure(module, exc)) from exc
    try:
        gm = _functionalize(ep)
    except Exception as exc:  # e.g. a submodule named like a GraphModule attribute ("meta")
        raise ConfigError(
            f"torch.export traced {type(module).__name__} but could not rebuild it as a graph "
            f"module: {type(exc).__name__}: {str(exc)[:1000]} (rename submodules that shadow "
            "torch.fx.GraphModule attributes such as 'meta', 'graph' or 'code')"
        ) from exc
    order, placeholders = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            placeholders.append(node)
        elif node.op == "call_module" and node.target == _GUARDS:
            continue
        elif node.op in ("call_function", "call_method"):
            order.append(node)
        elif node.op == "call_module":
            raise ConfigError(
                f"exported graph of {type(module).__name__} calls submodule "
                f"{node.target!r}; edgeslice cannot split such a graph"
            )
    (out_node,) = gm.graph.find_nodes(op="output")
    flat, _ = torch.utils._pytree.tree_flatten(out_node.args[0])
    if not all(isinstance(v, fx.Node) for v in flat):
        raise ConfigError(f"{type(module).__name__} returns constants; return only tensors")
    return TracedGraph(gm, tuple(order), tuple(placeholders), tuple(flat))


class _Reference(fx.Interpreter):
    """Runs the graph once, recording each node's FLOPs and output (or just its size)."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node] | None, count_flops: bool) -> None:
        super().__init__(gm)
        self.count_flops = count_flops
        self.flops: dict[fx.Node, float] = {}
        self.nbytes: dict[fx.Node, int] = {}
        self.values: dict[fx.Node, Any] = {}
        self.keep = keep

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.target == _GUARDS:
            return None
        if self.count_flops:
            with _flop_mode() as counter:
                out = super().run_node(n)
            self.flops[n] = float(counter.get_total_flops())
        else:
            out = super().run_node(n)
        self.nbytes[n] = value_bytes(out)
        if self.keep is None or n in self.keep:
            self.values[n] = out
        return out


def reference_run(
    graph: TracedGraph,
    inputs: tuple[Tensor, ...],
    keep: set[fx.Node] | None = None,
    count_flops: bool = True,
) -> _Reference:
    """One no-grad run of the traced graph; ``keep`` limits which outputs are retained."""
    ref = _Reference(graph.module, keep, count_flops)
    with torch.no_grad():
        ref.run(*inputs, enable_io_processing=False)
    return ref


def live_ranges(graph: TracedGraph) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """Definition and last-use positions of every activation (placeholders defined at -1)."""
    end = len(graph.order)
    defined = {p: -1 for p in graph.placeholders} | {n: i for i, n in enumerate(graph.order)}
    last = dict.fromkeys(defined, -1)
    for i, node in enumerate(graph.order):
        for arg in node.all_input_nodes:
            if arg in defined:
                last[arg] = max(last[arg], i)
    for out in graph.outputs:
        last[out] = end
    return defined, last


def crossing_after(
    graph: TracedGraph, position: int, defined: dict[fx.Node, int], last: dict[fx.Node, int]
) -> list[fx.Node]:
    """Activations defined at or before ``position`` and used after it, in definition order."""
    return [v for v, d in defined.items() if d <= position < last[v]]
