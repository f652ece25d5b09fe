"""Owns the search for a tiled plan: per block of segments, one device or a tiled strategy.

:func:`plan_tiled` minimises one request's latency as :mod:`planner.intraprice` defines
it, by a DP over (boundary, layout of the tensor crossing it). A layout is the client
(boundary 0), one device holding the whole tensor (after a pipeline block), or a tiled
strategy (its pieces follow from the boundary's shape and the device speeds). From each
state the DP tries every block that starts there: pipeline on each device, of any length
(a run of blocks on one device is one block), and each allowed strategy over all devices
for blocks of 1..``max_fusion`` segments (fusion: the halo is recomputed inside the
block instead of exchanged after each segment). A step's cost depends only on the
previous layout and the block, so the DP is exact for the objective.

Memory: a device holds the parameters of all blocks and tiles it runs. When no device
could run out (each one could hold the whole model) a state keeps only its fastest
label; otherwise every Pareto-optimal (latency, memory per device) label, at most
``max_labels`` (past that, the slowest are dropped and the plan says ``exact=False``).
Time O(n · (n + F·S) · L · k) without memory limits, for n segments, F = ``max_fusion``,
S strategies, L layouts per boundary (k + S) and k devices; the tile analyses behind it
are cached by :mod:`planner.tiling`.

:class:`Constraints` restrict the search for the benchmark's baselines: one strategy
(``strategies={"inh", "pipeline"}``), no fusion (``max_fusion=1``), fixed fusion
(``fixed_fusion=L``), pipeline only (``strategies={"pipeline"}``), and ``forced``: every
block split by an allowed strategy wherever one can split it, whole on one device only
where none can (FlexPie's single-strategy baselines); the same objective prices them
all. On equal latency the DP prefers pipeline blocks: a tiled block that costs the same
only adds pieces that can go wrong. :func:`brute_force` is the test oracle.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.intraprice import (
    PIPELINE,
    TILED,
    WHOLE,
    BlockChoice,
    BlockCosts,
    ComputeFn,
    IntraPlan,
    Piece,
    Pricer,
    TileDevice,
    TransferFn,
    evaluate,
)

__all__ = [
    "PIPELINE",
    "TILED",
    "BlockChoice",
    "Constraints",
    "IntraPlan",
    "TileDevice",
    "brute_force",
    "evaluate",
    "plan_tiled",
]

_CLIENT = ("client", None)  # the layout at boundary 0


@dataclass(frozen=True)
class Constraints:
    """What the search may use. Fusion off is ``max_fusion=1``; ``fixed_fusion=L`` makes
    every tiled block exactly ``L`` segments (shorter only where the model ends, or, when
    ``forced``, where a longer block cannot be split). ``forced``: at a segment where some
    allowed tiled block can start, only tiled blocks may; elsewhere a one-segment block
    runs whole on one device (pipeline, whether or not ``strategies`` names it)."""

    strategies: frozenset[str] = frozenset({PIPELINE, *TILED})
    max_fusion: int = 8
    fixed_fusion: int | None = None
    forced: bool = False
    max_labels: int = 256  # Pareto labels kept per state under memory limits

    def tiled_ends(self, start: int, n: int) -> range:
        if self.fixed_fusion is not None:
            end = min(start + self.fixed_fusion, n)
            return range(end, end + 1)
        return range(start + 1, min(start + self.max_fusion, n) + 1)


@dataclass(frozen=True)
class _Label:
    latency: float
    memory: tuple[int, ...]
    parent: _Label | None
    choice: BlockChoice | None
    tiled: int = 0  # tiled blocks so far: the tie-break (fewer wins at equal latency)


TIE = 1e-9  # latencies within this fraction of each other are equal


def _no_slower(a: tuple[float, int], b: tuple[float, int]) -> bool:
    """(latency, tiled blocks) ``a`` at least as good as ``b``: faster, or as fast (within
    :data:`TIE`) with no more tiled blocks."""
    if abs(a[0] - b[0]) <= TIE * max(abs(a[0]), abs(b[0])):
        return a[1] <= b[1]
    return a[0] < b[0]


def _better(a: tuple[float, int], b: tuple[float, int]) -> bool:
    return _no_slower(a, b) and not _no_slower(b, a)


def _choices(
    model: BlockCosts,
    devices: Sequence[TileDevice],
    c: Constraints,
    start: int,
    pricer: Pricer,
) -> list[BlockChoice]:
    n = model.n_segments
    tiled = [s for s in TILED if s in c.strategies]
    splits: list[BlockChoice] = []
    for end in c.tiled_ends(start, n) if tiled else ():
        allowed = model.tileable(start, end)
        splits += [BlockChoice(start, end, s) for s in tiled if s in allowed]
    if not c.forced:
        whole = range(start + 1, n + 1) if PIPELINE in c.strategies else range(0)
        return [BlockChoice(start, e, PIPELINE, d.name) for e in whole for d in devices] + splits
    splits = [b for b in splits if pricer.tiles(b) is not None]
    if not splits and c.fixed_fusion is not None:  # the longest block that can be split
        for end in range(min(start + c.fixed_fusion, n) - 1, start, -1):
            allowed = model.tileable(start, end)
            splits = [BlockChoice(start, end, s) for s in tiled if s in allowed]
            splits = [b for b in splits if pricer.tiles(b) is not None]
            if splits:
                break
    if splits:
        return splits
    return [BlockChoice(start, start + 1, PIPELINE, d.name) for d in devices]


def _insert(front: list[_Label], new: _Label, cap: int) -> bool:
    """Add ``new`` to a Pareto front unless dominated; False when the cap dropped labels."""

    def dominates(a: _Label, b: _Label) -> bool:
        return _no_slower((a.latency, a.tiled), (b.latency, b.tiled)) and all(
            x <= y for x, y in zip(a.memory, b.memory, strict=True)
        )

    if any(dominates(old, new) for old in front):
        return True
    front[:] = [old for old in front if not dominates(new, old)]
    front.append(new)
    if len(front) <= cap:
        return True
    front.sort(key=lambda label: label.latency)
    del front[cap:]
    return False


class _Steps:
    """Cost and memory of one block after a given layout (received bytes cached)."""

    def __init__(self, pricer: Pricer, devices: Sequence[TileDevice]) -> None:
        self.pricer = pricer
        self.index = {d.name: i for i, d in enumerate(devices)}
        self.k = len(devices)
        self._recv: dict[tuple[int, tuple[str, str | None], str, tuple], int] = {}

    def pieces(self, boundary: int, layout: tuple[str, str | None]) -> list[Piece]:
        if layout == _CLIENT:
            return [(None, WHOLE)]
        return self.pricer.layout(boundary, *layout)

    def cost(
        self, choice: BlockChoice, layout: tuple[str, str | None], pieces: list[Piece]
    ) -> tuple[float, tuple[int, ...]] | None:
        tiles = self.pricer.tiles(choice)
        if tiles is None:
            return None
        seconds, memory = 0.0, [0] * self.k
        for device, _, in_box, flops, params in tiles:
            key = (choice.start, layout, device, in_box)
            if key not in self._recv:
                got = self.pricer.received(choice.start, pieces, device, in_box)
                self._recv[key] = sum(got.values())
            seconds = max(seconds, self.pricer.tile_seconds(device, flops, self._recv[key]))
            memory[self.index[device]] += params
        return seconds, tuple(memory)


def _check(devices: Sequence[TileDevice], c: Constraints) -> None:
    names = [d.name for d in devices]
    if not names or len(set(names)) != len(names):
        raise PlanningError(f"a tiled plan needs distinct devices, got {names}")
    if any(d.speed <= 0 for d in devices):
        raise PlanningError("device speeds must be positive (tile shares follow them)")
    unknown = set(c.strategies) - {PIPELINE, *TILED}
    if c.forced and not set(c.strategies) & set(TILED):
        raise PlanningError("forced splits need a tiled strategy to force")
    if unknown or not c.strategies:
        raise PlanningError(f"unknown strategies {sorted(unknown)}; use {PIPELINE!r} or {TILED}")
    if c.max_fusion < 1 or (c.fixed_fusion is not None and c.fixed_fusion < 1):
        raise PlanningError("blocks are at least one segment long")


def plan_tiled(
    model: BlockCosts,
    devices: Sequence[TileDevice],
    compute: ComputeFn,
    transfer: TransferFn,
    constraints: Constraints = Constraints(),
) -> IntraPlan:
    """The least-latency plan under ``constraints`` (see the module docstring).

    Raises :class:`PlanningError` when no plan fits the devices' memory or the
    constraints leave a part of the model that no allowed block can run.
    """
    _check(devices, constraints)
    n, k = model.n_segments, len(devices)
    pricer = Pricer(model, devices, compute, transfer)
    steps = _Steps(pricer, devices)
    limits = [d.memory_bytes for d in devices]
    track = any(model.param_bytes(0, n, WHOLE) > limit for limit in limits)
    states: list[dict[tuple[str, str | None], list[_Label]]] = [{} for _ in range(n + 1)]
    states[0][_CLIENT] = [_Label(0.0, (0,) * k if track else (), None, None)]
    exact = True
    for start in range(n):
        choices = _choices(model, devices, constraints, start, pricer)
        for layout, labels in states[start].items():
            pieces = steps.pieces(start, layout)
            for choice in choices:
                step = steps.cost(choice, layout, pieces)
                if step is None:
                    continue
                seconds, used = step
                after = (choice.strategy, choice.device)
                front = states[choice.end].setdefault(after, [])
                for label in labels:
                    memory = (
                        tuple(a + b for a, b in zip(label.memory, used, strict=True))
                        if track
                        else ()
                    )
                    if track and any(m > limit for m, limit in zip(memory, limits, strict=True)):
                        continue
                    tiled = label.tiled + (choice.strategy != PIPELINE)
                    new = _Label(label.latency + seconds, memory, label, choice, tiled)
                    exact = _insert(front, new, constraints.max_labels) and exact
    finals = [
        (label.latency + pricer.gather(steps.pieces(n, layout))[0], label)
        for layout, labels in states[n].items()
        for label in labels
    ]
    if not finals:
        raise PlanningError(
            f"no tiled plan of {n} segments fits: check device memory ({limits} bytes) and "
            f"the constraints {constraints}"
        )
    best = finals[0][1]
    best_key = (finals[0][0], best.tiled)
    for latency, label in finals[1:]:
        if _better((latency, label.tiled), best_key):
            best, best_key = label, (latency, label.tiled)
    chosen: list[BlockChoice] = []
    node: _Label | None = best
    while node is not None and node.choice is not None:
        chosen.append(node.choice)
        node = node.parent
    plan = evaluate(model, devices, chosen[::-1], compute, transfer, exact=exact, pricer=pricer)
    merged = _merge_runs(plan.choices)
    if len(merged) < len(plan.blocks):  # equal-cost ties split runs on one device
        joined = evaluate(model, devices, merged, compute, transfer, exact=exact, pricer=pricer)
        if joined.latency_s <= plan.latency_s * (1 + 1e-9):
            return joined
    return plan


def _merge_runs(choices: Sequence[BlockChoice]) -> list[BlockChoice]:
    """Consecutive pipeline blocks on one device as one block."""
    out: list[BlockChoice] = []
    for c in choices:
        last = out[-1] if out else None
        if last and c.strategy == last.strategy == PIPELINE and c.device == last.device:
            out[-1] = BlockChoice(last.start, c.end, PIPELINE, c.device)
        else:
            out.append(c)
    return out


def _key(plan: IntraPlan) -> tuple[float, int]:
    return plan.latency_s, sum(b.strategy != PIPELINE for b in plan.blocks)


def _partitions(n: int) -> Iterator[list[tuple[int, int]]]:
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), n]
        yield list(itertools.pairwise(bounds))


def brute_force(
    model: BlockCosts,
    devices: Sequence[TileDevice],
    compute: ComputeFn,
    transfer: TransferFn,
    constraints: Constraints = Constraints(),
) -> IntraPlan:
    """Test oracle: every cut of the segments and every choice per block, priced by
    :func:`evaluate`. Exponential: only for a handful of segments and devices."""
    _check(devices, constraints)
    pricer = Pricer(model, devices, compute, transfer)
    best: IntraPlan | None = None
    for blocks in _partitions(model.n_segments):
        options = [
            [c for c in _choices(model, devices, constraints, a, pricer) if c.end == b]
            for a, b in blocks
        ]
        for plan in itertools.product(*options):
            try:
                priced = evaluate(model, devices, plan, compute, transfer, pricer=pricer)
            except PlanningError:  # a strategy too wide for the tensor
                continue
            if any(priced.memory_bytes[d.name] > d.memory_bytes for d in devices):
                continue
            if best is None or _better(_key(priced), _key(best)):
                best = priced
    if best is None:
        raise PlanningError("no plan fits")
    return best
