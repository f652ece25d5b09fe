"""Owns what each ``--intra-layer`` mode plans: its DP constraints, the DP call, its predictions.

Every mode but ``auto`` is the DP of :mod:`planner.intradp` (:func:`plan_tiled`) priced
by this cost model's compute and transfer times (compute from the planner's timed segment
costs, as the pipeline planner prices them), restricted by :func:`constraints_for`:

* ``dp``: per block, whole on one agent or any split over all agents, fusing up to
  ``max_fusion`` segments (edgeslice's combined plan);
* ``outc``, ``inh``, ``inw``, ``grid``: FlexPie's single-strategy baselines -- every
  segment the strategy can split is split over all agents (one segment per block: an
  exchange after each), the others run whole on the agent the DP prices cheapest;
* ``fixed``: fixed fusion -- every block ``inh`` over all agents and ``L`` segments long
  (shorter only where a longer block cannot be split), ``L`` the best of 2..``max_fusion``
  by the same prices (the strongest fixed-length baseline);
* ``auto``: :func:`planner.intraplan.simple_description` (no DP; rough predictions).

A DP-made plan publishes the DP's own prices (:func:`prediction`): its latency, and per
block the critical tile's compute and input transfer, with every tile's predicted compute
in ``replica_period_s`` (tile order), so the predicted time of each fused block can be
set beside the stage timings its tiles report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.broker.protocol.pieces import WHOLE
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import (
    CostParams,
    Device,
    ModelCost,
    seconds_per_flop,
    transfer_s,
)
from edgeslice.planner.intradp import PIPELINE, Constraints, IntraPlan, TileDevice, plan_tiled
from edgeslice.planner.intraplan import AUTO, DP, TiledBlock, check_description
from edgeslice.planner.plans import Plan, StagePlan
from edgeslice.planner.profile import ModelProfile
from edgeslice.planner.tileboxes import STRATEGIES

FIXED = "fixed"
FIXED_STRATEGY = "inh"  # FlexPie's fixed-fusion baseline: row tiles of fused layers
MODES = (DP, AUTO, *STRATEGIES, FIXED)


def constraints_for(mode: str, max_fusion: int) -> list[Constraints]:
    """The DP searches a mode runs (the least latency of them wins); [] for ``auto``."""
    if mode == DP:
        return [Constraints(max_fusion=max_fusion)]
    if mode in STRATEGIES:
        return [Constraints(strategies=frozenset({mode}), max_fusion=1, forced=True)]
    if mode == FIXED:
        strategies = frozenset({FIXED_STRATEGY})
        return [
            Constraints(strategies=strategies, fixed_fusion=length, forced=True)
            for length in range(2, max(2, max_fusion) + 1)
        ]
    if mode == AUTO:
        return []
    raise PlanningError(f"--intra-layer {mode!r} is unknown; use one of {', '.join(MODES)}")


class Prices:
    """This cost model's compute and transfer times, as the DP asks for them."""

    def __init__(self, devices: Sequence[Device], params: CostParams) -> None:
        self.by_id = {d.agent_id: d for d in devices}
        self.params = params

    def compute(self, name: str, flops: float) -> float:
        return flops * seconds_per_flop(self.by_id[name], self.params) + self.params.min_compute_s

    def transfer(self, nbytes: int, name: str | None) -> float:
        return transfer_s(nbytes, None, self.by_id[name] if name else None, self.params)


def ranked(devices: Sequence[Device]) -> list[Device]:
    """Fastest first (tile order, and the DP's first choice on a tie)."""
    if not devices:
        raise PlanningError("a tiled plan needs at least one agent")
    return sorted(devices, key=lambda d: (-d.gflops, d.agent_id))


def dp_plan(
    profile: ModelProfile,
    devices: Sequence[Device],
    params: CostParams,
    constraints: Sequence[Constraints],
    priced: ModelCost | None = None,
    inputs: tuple[Any, ...] | None = None,
) -> tuple[IntraPlan, Constraints]:
    """The least-latency plan over ``constraints`` (each one DP search) and which won;
    with ``priced`` (the planner's timed segment costs) blocks cost what the pipeline
    planner says they do, and with the model's example ``inputs`` tiles their measured
    tile factor more (:class:`planner.tiling.ProfileBlocks`, :mod:`planner.tilecost`)."""
    from edgeslice.planner.tilecost import tile_factors
    from edgeslice.planner.tiling import ProfileBlocks

    order = ranked(devices)
    prices = Prices(order, params)
    used = sorted({s for c in constraints for s in c.strategies if s in STRATEGIES})
    factors = None
    if inputs is not None and len(order) > 1 and used:
        factors = tile_factors(profile, inputs, len(order), used)
    blocks = ProfileBlocks(profile, priced, factors)
    tiles = [TileDevice(d.agent_id, max(d.gflops, 1e-3), d.memory_bytes) for d in order]
    best: tuple[IntraPlan, Constraints] | None = None
    errors = []
    for rules in constraints:
        try:
            found = plan_tiled(blocks, tiles, prices.compute, prices.transfer, rules)
        except PlanningError as exc:
            errors.append(str(exc))
            continue
        if best is None or found.latency_s < best[0].latency_s:
            best = (found, rules)
    if best is None:
        raise PlanningError(f"no tiled plan fits: {'; '.join(errors)}")
    return best


def blocks_of(plan: IntraPlan) -> list[TiledBlock]:
    """A DP plan as a description (a pipeline block is a whole block on its device)."""
    return [
        TiledBlock(b.start, b.end, "", ((b.tiles[0].device, WHOLE),))
        if b.strategy == PIPELINE
        else TiledBlock(b.start, b.end, b.strategy, tuple((t.device, t.out_box) for t in b.tiles))
        for b in plan.blocks
    ]


@dataclass(frozen=True)
class Described:
    """The tiled plan a mode serves, with the DP's pricing when the DP made it."""

    blocks: list[TiledBlock]
    priced: IntraPlan | None = None  # None: auto's simple description
    constraints: Constraints | None = None


def describe(
    config: PlannerConfig,
    profile: ModelProfile,
    devices: Sequence[Device],
    params: CostParams,
    priced: ModelCost | None = None,
    inputs: tuple[Any, ...] | None = None,
) -> Described:
    """The tiled plan ``config.intra_layer`` asks for on ``devices`` (module docstring)."""
    from edgeslice.planner.intraplan import simple_description

    searches = constraints_for(config.intra_layer or AUTO, config.max_fusion)
    if not searches:
        described = Described(simple_description(profile, devices, AUTO))
    else:
        found, rules = dp_plan(profile, devices, params, searches, priced, inputs)
        described = Described(blocks_of(found), found, rules)
    check_description(profile, described.blocks)
    return described


def prediction(
    plan: IntraPlan, model: str, objective: str, devices: Sequence[Device], params: CostParams
) -> tuple[Plan, list[list[float]]]:
    """The DP's prices as a :class:`Plan` (module docstring) and every tile's compute."""
    prices = Prices(devices, params)
    stages, tile_compute = [], []
    busy = dict.fromkeys(prices.by_id, 0.0)
    for i, b in enumerate(plan.blocks):
        computes = [prices.compute(t.device, t.flops) for t in b.tiles]
        for t, seconds in zip(b.tiles, computes, strict=True):
            busy[t.device] += seconds
        critical = max(range(len(b.tiles)), key=lambda j: b.tiles[j].seconds)
        comp = computes[critical]
        agents = tuple(t.device for t in b.tiles)
        memory = max(t.param_bytes for t in b.tiles)
        stages.append(
            StagePlan(i, b.start, b.end, agents, comp, b.seconds - comp, memory, max(computes))
        )
        tile_compute.append(computes)
    period = max(busy.values()) or 1e-9
    priced = Plan(
        model, objective, "intra-layer", tuple(stages), plan.latency_s, period, 1 / period,
        exact=plan.exact,
    )  # fmt: skip
    return priced, tile_compute
