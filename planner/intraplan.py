"""Turns a tiled (intra-layer) plan description into signed tile artifacts, assignments, a plan.

A *description* is a list of :class:`TiledBlock` s covering the profile's segments in
order: each a run of segments ``[start, end)`` either split by a strategy of
:mod:`planner.tiling` (``outc``, ``inh``, ``inw``, ``grid``) into one output box per agent,
or run whole by one agent (strategy ``""``, its box :data:`WHOLE`). The planner gets it
from planner/intramodes.py: the DP of planner/intradp.py, free (``--intra-layer dp``: per
block, pipeline on one agent or a split over all, least latency by this cost model) or
restricted to a baseline (one strategy, fixed fusion), or :func:`simple_description`
(``auto``: every splittable segment split over all agents with shares by calibrated
speed) -- and this module makes it servable:

* :func:`build_tiled` exports one artifact per tile with :func:`planner.tiling.tile_module`
  (its input is the block input cropped to :func:`planner.tiling.input_box`, halo
  included), checked against the whole model's activation on the tile's output box and
  signed by :func:`planner.stages.build_module_artifact`; whole blocks are
  :func:`planner.stages.build_stages` stages. Tiles are cached on the traced graph, so a
  re-plan with the same boxes only looks them up.
* :func:`tiled_stages` and :func:`tiled_assignments` give the wire: a :class:`PlanStage`
  per block carrying its :class:`Tile` s (a whole block is one tile with empty boxes; a
  tiled stage's ``artifact`` is a digest of its tiles, so a re-plan that moves a box is a
  new layout) and per agent a :class:`StageAssignment` per tile it runs.
* :func:`propose_tiled` is what planner/planning.py calls under ``--intra-layer``: a
  :class:`~planner.planning.Proposal` whose ``assignments`` and ``input_specs`` are set.

A plan the DP made publishes the DP's prices (planner/intramodes.py); ``auto``'s are rough
on purpose (:func:`predict`: a tile's share of the block's FLOPs on its agent, its input
box over the agent's link).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from edgeslice.broker.protocol.artifacts import PrivateKey, TensorSpec
from edgeslice.broker.protocol.boxes import Box, box_to_wire, crop, full_box, volume
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.broker.protocol.messages import PlanStage, StageAssignment, Tile
from edgeslice.broker.protocol.pieces import WHOLE
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import (
    CostParams,
    Device,
    ModelCost,
    compute_s,
    stage_in_bytes,
    transfer_s,
)
from edgeslice.planner.partition import Plan, StagePlan
from edgeslice.planner.planning import Proposal
from edgeslice.planner.profile import ModelProfile
from edgeslice.planner.stages import StageArtifact, build_module_artifact, build_stages
from edgeslice.planner.tracing import reference_run

AUTO = "auto"
DP = "dp"
PREFERENCE = ("inh", "inw", "outc", "grid")  # on a tie, the simpler split
SPATIAL = frozenset({"inh", "inw", "grid"})
FUSE_HALO = 1.5  # fuse a spatial run while its tiles read at most this much more input


@dataclass(frozen=True)
class TiledBlock:
    """Segments ``[start, end)``: split by ``strategy`` into ``tiles`` (agent, output box),
    or (strategy ``""``) run whole by the one agent of ``tiles`` (its box WHOLE)."""

    start: int
    end: int
    strategy: str
    tiles: tuple[tuple[str, Box], ...]

    @property
    def agents(self) -> list[str]:
        return [a for a, _box in self.tiles]


def check_description(profile: ModelProfile, blocks: Sequence[TiledBlock]) -> None:
    """PlanningError unless ``blocks`` cover the segments in order, each tiled block names
    a strategy its segments allow and each agent at most once, and a whole block one agent."""
    from edgeslice.planner.tiling import tileable

    n, at = len(profile.segments), 0
    for i, b in enumerate(blocks):
        where = f"tiled plan block {i} [{b.start}, {b.end})"
        if b.start != at or b.end <= b.start:
            raise PlanningError(f"{where} does not continue at segment {at}")
        at = b.end
        agents = b.agents
        if not agents or len(set(agents)) != len(agents):
            raise PlanningError(f"{where} needs distinct agents, got {agents}")
        if not b.strategy:
            if len(b.tiles) != 1 or b.tiles[0][1] != WHOLE:
                raise PlanningError(f"{where} is whole: one agent and an empty box")
        elif b.strategy not in tileable(profile, b.start, b.end):
            raise PlanningError(f"{where} cannot be split by {b.strategy!r}")
    if at != n:
        raise PlanningError(f"tiled plan covers segments up to {at} of {n}")


def _in_bytes(profile: ModelProfile, start: int, box: Box) -> int:
    """Bytes of the part ``box`` of the tensor entering segment ``start``."""
    (info,) = profile.crossing(start)
    return info.nbytes * volume(box) // max(1, volume(full_box(info.shape)))


def simple_description(
    profile: ModelProfile, devices: Sequence[Device], strategy: str = AUTO
) -> list[TiledBlock]:
    """Every segment that can be split by ``strategy`` is split over all ``devices`` with
    shares by calibrated speed; runs of the others go whole to the fastest device.

    ``auto`` picks, per segment, the strategy whose largest tile needs the fewest bytes of
    input plus weights: spatial splits where activations are large (early layers, halo
    rows recomputed), ``outc`` where weights dominate (late layers: each device holds a
    slice of them) -- the trade FlexPie's planner makes with measured costs. Consecutive
    segments split the same spatial way are fused into one block (each tile recomputes
    the grown halo instead of exchanging pieces) while the halo stays small (:func:`_fuse`).
    """
    from edgeslice.planner.tiling import block as tiling_block
    from edgeslice.planner.tiling import input_box, tile_boxes, tile_param_bytes, tileable

    ranked = sorted(devices, key=lambda d: (-d.gflops, d.agent_id))
    if not ranked:
        raise PlanningError("a tiled plan needs at least one agent")
    ids, shares = [d.agent_id for d in ranked], [max(d.gflops, 1e-3) for d in ranked]
    out: list[TiledBlock] = []
    for k in range(len(profile.segments)):
        options = tileable(profile, k, k + 1) if len(ranked) > 1 else frozenset()
        wanted = [s for s in PREFERENCE if s in options and strategy in (AUTO, s)]
        best: tuple[int, str, list[Box]] | None = None
        for name in wanted:
            try:
                boxes = tile_boxes(tiling_block(profile, k, k + 1).out_shape, name, shares)
            except ValueError:  # fewer rows (channels) than devices
                continue
            need = max(
                _in_bytes(profile, k, input_box(profile, k, k + 1, box))
                + tile_param_bytes(profile, k, k + 1, box)
                for box in boxes
            )
            if best is None or need < best[0]:
                best = (need, name, boxes)
        if best is None and out and not out[-1].strategy:  # extend the whole run
            out[-1] = TiledBlock(out[-1].start, k + 1, "", out[-1].tiles)
        elif best is None:
            out.append(TiledBlock(k, k + 1, "", ((ids[0], WHOLE),)))
        elif not (out and _fuse(profile, out, k, best[1], ids, shares)):
            out.append(TiledBlock(k, k + 1, best[1], tuple(zip(ids, best[2], strict=True))))
    return out


def _fuse(
    profile: ModelProfile,
    out: list[TiledBlock],
    k: int,
    strategy: str,
    ids: Sequence[str],
    shares: Sequence[float],
) -> bool:
    """Fold segment ``k`` into the last block when both are split the same spatial way and
    the fused tiles' input (halo grown by every layer) stays within :data:`FUSE_HALO` of
    the last block's: one exchange through the broker less, a few halo rows recomputed."""
    from edgeslice.planner.tiling import block as tiling_block
    from edgeslice.planner.tiling import input_box, tile_boxes, tileable

    last = out[-1]
    if strategy not in SPATIAL or last.strategy != strategy:
        return False
    if strategy not in tileable(profile, last.start, k + 1):
        return False
    try:
        boxes = tile_boxes(tiling_block(profile, last.start, k + 1).out_shape, strategy, shares)
    except ValueError:
        return False
    fused = [volume(input_box(profile, last.start, k + 1, box)) for box in boxes]
    alone = [volume(input_box(profile, last.start, last.end, box)) for _a, box in last.tiles]
    if max(fused) > FUSE_HALO * max(alone):
        return False
    out[-1] = TiledBlock(last.start, k + 1, strategy, tuple(zip(ids, boxes, strict=True)))
    return True


def dp_description(
    profile: ModelProfile, devices: Sequence[Device], params: CostParams
) -> list[TiledBlock]:
    """The least-latency mix of pipeline and tiled blocks (``--intra-layer dp``), as the
    DP of planner/intradp.py finds it with this cost model (planner/intramodes.py)."""
    from edgeslice.planner.intradp import Constraints
    from edgeslice.planner.intramodes import blocks_of, constraints_for, dp_plan

    searches = constraints_for(DP, Constraints().max_fusion)
    return blocks_of(dp_plan(profile, devices, params, searches)[0])


def build_tiled(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    profile: ModelProfile,
    blocks: Sequence[TiledBlock],
    key: PrivateKey,
    compression: str | None = None,
) -> list[list[StageArtifact]]:
    """Per block, one signed artifact per tile in tile order (module docstring). Runs torch:
    call it off the event loop."""
    from edgeslice.planner.tiling import boundary_nodes, input_box, tile_module

    check_description(profile, blocks)
    bounds = [b.start for b in blocks] + [len(profile.segments)]
    whole = {i for i, b in enumerate(blocks) if not b.strategy}
    built: dict[int, list[StageArtifact]] = {}
    if whole:
        for art in build_stages(
            module, example_inputs, profile, bounds, key, compression, batch=False, only=whole
        ):
            built[art.index] = [art]
    tiled = [(i, b) for i, b in enumerate(blocks) if b.strategy]
    if not tiled:
        return [built[i] for i in range(len(blocks))]
    cache: dict[Any, StageArtifact] = profile.graph.cache.setdefault("intraplan", {})
    ends = {b.start for _i, b in tiled} | {b.end for _i, b in tiled}
    nodes = {b: boundary_nodes(profile, b)[0] for b in ends}
    values: dict[Any, Tensor] = {}
    for i, b in tiled:
        arts = []
        for _agent, out_box in b.tiles:
            in_box = input_box(profile, b.start, b.end, out_box)
            cache_key = (i, b.start, b.end, out_box, compression)
            if cache_key not in cache:
                if not values:
                    graph = profile.graph
                    values = dict(zip(graph.placeholders, example_inputs, strict=True))
                    values.update(
                        reference_run(
                            graph, example_inputs, keep=set(nodes.values()), count_flops=False
                        ).values
                    )
                src, dst = values[nodes[b.start]], values[nodes[b.end]]
                x = crop(src, full_box(src.shape), in_box).contiguous()
                want = crop(dst, full_box(dst.shape), out_box).contiguous()
                cache[cache_key] = build_module_artifact(
                    tile_module(profile, b.start, b.end, out_box),
                    [x],
                    [want],
                    model=profile.name,
                    index=i,
                    start_segment=b.start,
                    end_segment=b.end,
                    key=key,
                    compression=compression,
                    extra_meta={
                        "tile": {
                            "strategy": b.strategy,
                            "in_box": box_to_wire(in_box),
                            "out_box": box_to_wire(out_box),
                        }
                    },
                )
            arts.append(cache[cache_key])
        built[i] = arts
    return [built[i] for i in range(len(blocks))]


def _boxes(profile: ModelProfile, block: TiledBlock, out_box: Box) -> tuple[Box, Box]:
    from edgeslice.planner.tiling import input_box

    if not block.strategy:
        return WHOLE, WHOLE
    return input_box(profile, block.start, block.end, out_box), out_box


def tiled_stages(
    profile: ModelProfile,
    blocks: Sequence[TiledBlock],
    built: Sequence[Sequence[StageArtifact]],
    predicted: Sequence[StagePlan] = (),
    tile_compute: Sequence[Sequence[float]] = (),
) -> list[PlanStage]:
    """The plan's stages: one per block with its tiles (module docstring); a tiled stage's
    ``replica_period_s`` is each tile's predicted compute, when ``tile_compute`` has it."""
    stages = []
    for i, (block, arts) in enumerate(zip(blocks, built, strict=True)):
        tiles = []
        for (agent, out_box), art in zip(block.tiles, arts, strict=True):
            in_box, out = _boxes(profile, block, out_box)
            tiles.append(Tile(agent, art.sha256, box_to_wire(in_box), box_to_wire(out)))
        if block.strategy:
            digest = hashlib.sha256(repr([tuple(t) for t in tiles]).encode()).hexdigest()
        else:
            digest = arts[0].sha256
        p = predicted[i] if i < len(predicted) else None
        stages.append(
            PlanStage(
                stage=i,
                start_segment=block.start,
                end_segment=block.end,
                agents=block.agents,
                artifact=digest,
                predicted_compute_s=p.compute_s if p else 0.0,
                predicted_transfer_s=p.in_transfer_s if p else 0.0,
                out_bytes=profile.segments[block.end - 1].out_bytes,
                param_bytes=sum(a.param_bytes for a in arts),
                replica_period_s=list(tile_compute[i]) if i < len(tile_compute) else [],
                tiles=tiles,
                tiling=block.strategy,
            )
        )
    return stages


def tiled_assignments(
    stages: Sequence[PlanStage], built: Sequence[Sequence[StageArtifact]]
) -> dict[str, list[StageAssignment]]:
    """Agent -> one assignment per tile it runs (stage index = block index)."""
    wanted: dict[str, list[StageAssignment]] = {}
    for stage, arts in zip(stages, built, strict=True):
        for tile, art in zip(stage.tiles, arts, strict=True):
            wanted.setdefault(tile.agent_id, []).append(
                StageAssignment(
                    stage=stage.stage,
                    artifact=art.sha256,
                    size=art.size,
                    start_segment=stage.start_segment,
                    end_segment=stage.end_segment,
                    input_specs=[s.to_wire() for s in art.input_specs],
                    output_specs=[s.to_wire() for s in art.output_specs],
                    in_box=tile.in_box,
                    out_box=tile.out_box,
                )
            )
    return wanted


def predict(
    cost: ModelCost,
    profile: ModelProfile,
    blocks: Sequence[TiledBlock],
    devices: Sequence[Device],
    objective: str,
    params: CostParams,
) -> Plan:
    """Rough predictions (module docstring): per block, the slowest tile's input transfer
    plus compute; the period is the busiest agent's compute per request."""
    from edgeslice.planner.tiling import tile_flops

    by_id = {d.agent_id: d for d in devices}
    stages, latency, busy = [], 0.0, dict.fromkeys(by_id, 0.0)
    for i, b in enumerate(blocks):
        block_flops = sum(s.flops for s in cost.segments[b.start : b.end]) or 1.0
        worst = (0.0, 0.0)
        for agent, out_box in b.tiles:
            d = by_id[agent]
            comp = compute_s(cost, b.start, b.end, d, params)
            nbytes = stage_in_bytes(cost, b.start)
            if b.strategy:
                comp *= tile_flops(profile, b.start, b.end, out_box) / block_flops
                nbytes = _in_bytes(profile, b.start, _boxes(profile, b, out_box)[0])
            busy[agent] += comp
            worst = max(worst, (transfer_s(nbytes, None, d, params), comp), key=sum)
        hop, comp = worst
        stages.append(StagePlan(i, b.start, b.end, tuple(b.agents), comp, hop, 0, comp))
        latency += hop + comp
    latency += transfer_s(cost.output_bytes, None, None, params)
    period = max(busy.values()) or 1e-9
    return Plan(cost.name, objective, "intra-layer", tuple(stages), latency, period, 1.0 / period)


async def propose_tiled(
    config: PlannerConfig,
    cost: ModelCost,
    loaded: Any,
    profile: ModelProfile,
    key: PrivateKey,
    devices: Sequence[Device],
    params: CostParams,
) -> Proposal:
    """The tiled plan for ``devices``, built and signed off the event loop (module doc)."""
    from edgeslice.planner.intramodes import describe, prediction

    described = await asyncio.to_thread(
        describe, config, profile, devices, params, cost, tuple(loaded.example_inputs)
    )
    blocks = described.blocks
    built = await asyncio.to_thread(
        build_tiled,
        loaded.module,
        loaded.example_inputs,
        profile,
        blocks,
        key,
        None,
    )
    tile_compute: list[list[float]] = []
    if described.priced is not None:
        plan, tile_compute = prediction(
            described.priced, cost.name, config.objective, devices, params
        )
    else:
        plan = await asyncio.to_thread(
            predict, cost, profile, blocks, devices, config.objective, params
        )
    stages = tiled_stages(profile, blocks, built, plan.stages, tile_compute)
    inputs = [TensorSpec(t.shape, t.dtype, t.name).to_wire() for t in profile.inputs]
    artifacts = [a for arts in built for a in arts]
    return Proposal(plan, artifacts, stages, tiled_assignments(stages, built), inputs)
