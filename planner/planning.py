"""Deciding one plan: the planning loop's timing, and partition + cut + price for the fleet.

The planner service (planner/service.py) owns the state and publishes; this module holds
the steps in between. :func:`planning_loop` waits as planner/replan.py's schedule says (a
leave plans at once, a join after a quiet period that a new change may shorten or
extend) and calls the service back. :func:`propose` turns the usable devices into a
:class:`Proposal`: the partitioner picks stages and agents -- for ``edgeslice``, keeping
the served layout unless another beats it by more than the cost model's measured error
(planner/margin.py); with a latency bound, the highest-throughput point of the Pareto
front within it (planner/pareto.py) -- and :func:`planner.stages.build_stages` cuts and
signs the artifacts off the event loop. :func:`plan_message` is the ``plans/{model}`` message of a
proposal (pure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.broker.protocol.messages import PlanMessage, PlanStage, StageAssignment
from edgeslice.planner import retained
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.costmodel import CostParams, Device, ModelCost, fit_correction
from edgeslice.planner.margin import decision_margin
from edgeslice.planner.pareto import plan_under_latency
from edgeslice.planner.partition import STRATEGIES, Objective, Plan, plan_partition
from edgeslice.planner.replan import ReplanSchedule

log = logging.getLogger(__name__)


async def planning_loop(
    schedule: ReplanSchedule,
    wake: asyncio.Event,
    make_plan: Callable[[], Awaitable[None]],
    withdraw: Callable[[str], Awaitable[None]],
    model: str,
) -> None:
    """Plan whenever ``schedule`` says so (``wake`` is set on every change); forever.

    A :class:`PlanningError` withdraws the plan saying why; any other failure is logged
    and planning goes on at the next change.
    """
    while True:
        wake.clear()
        wait = schedule.wait_s(time.monotonic())
        if wait is None:
            await wake.wait()
            continue
        if wait > 0:  # a join's quiet period: a new change may shorten or extend it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)
            continue
        schedule.take(time.monotonic())
        try:
            await make_plan()
        except PlanningError as exc:
            log.error("planning model=%s failed: %s", model, exc)
            await withdraw(f"no plan fits the usable agents: {exc}")
        except Exception:
            log.exception("planning model=%s crashed; will retry on the next change", model)


@dataclass(frozen=True)
class Proposal:
    """A partition of the model over the devices, with its built artifacts and wire stages.

    A tiled plan (planner/intraplan.py) has more artifacts than stages (one per tile), so
    it brings its own ``assignments`` (agent -> StageAssignment list) and ``input_specs``.
    """

    plan: Plan
    artifacts: list[Any]  # planner.stages.StageArtifact, in stage order
    stages: list[PlanStage]
    assignments: dict[str, list[StageAssignment]] | None = None  # None: from plan + artifacts
    input_specs: list[dict[str, Any]] | None = None  # None: the first artifact's inputs


async def propose(
    config: PlannerConfig,
    cost: ModelCost,
    loaded: Any,
    profile: Any,
    key: Any,
    devices: Sequence[Device],
    samples: Sequence[tuple[str, float, float, int]],
    previous: Sequence[PlanStage],
) -> Proposal:
    """The plan ``config``'s strategy makes for ``devices`` (raises PlanningError if none).

    ``samples`` are the measured stage timings (Registry.timing_samples) that correct the
    cost model; ``previous`` the stages served now, kept unless beaten beyond its error.
    """
    from edgeslice.planner.stages import build_stages

    params = CostParams(correction=fit_correction(samples))
    if config.intra_layer:  # a tiled (intra-layer) plan: planner/intraplan.py
        from edgeslice.planner.intraplan import propose_tiled

        return await propose_tiled(config, cost, loaded, profile, key, devices, params)
    baseline = [(s.start_segment, s.end_segment, s.agents) for s in previous]
    if config.max_latency_s is not None:  # a point of the latency/throughput Pareto front
        plan, met = plan_under_latency(
            cost,
            devices,
            config.max_latency_s,
            params,
            max_stages=config.max_stages,
            margin=decision_margin(samples, params.correction),
            baseline=baseline,
        )
        if not met:
            log.warning(
                "no plan of model=%s meets --max-latency-ms %g on %d agents: serving the "
                "fastest for one request (predicted %.1f ms)",
                cost.name,
                config.max_latency_s * 1e3,
                len(devices),
                plan.latency_s * 1e3,
            )
    elif config.strategy == "edgeslice":
        plan = plan_partition(  # keep the served plan unless beaten beyond the model's error
            cost,
            devices,
            cast(Objective, config.objective),
            params,
            max_stages=config.max_stages,
            margin=decision_margin(samples, params.correction),
            baseline=baseline,
        )
    else:  # a baseline, priced by the same cost model so predictions stay comparable
        plan = STRATEGIES[config.strategy](cost, devices, params)
    boundaries = [s.start for s in plan.stages] + [len(cost.segments)]
    artifacts = await asyncio.to_thread(
        build_stages, loaded.module, loaded.example_inputs, profile, boundaries, key
    )
    stages = retained.plan_stages(plan, artifacts, cost, devices, params)
    return Proposal(plan, list(artifacts), stages)


def plan_message(
    model: str, plan_id: str, version: int, proposal: Proposal, config: PlannerConfig
) -> PlanMessage:
    """The ``plans/{model}`` message of a new plan version, not ready yet (pure)."""
    plan = proposal.plan
    return PlanMessage(
        model=model,
        plan_id=plan_id,
        plan_version=version,
        objective=plan.objective,
        strategy=plan.strategy,
        stages=proposal.stages,
        input_specs=proposal.input_specs
        if proposal.input_specs is not None
        else [s.to_wire() for s in proposal.artifacts[0].input_specs],
        predicted_latency_s=plan.latency_s,
        predicted_period_s=plan.period_s,
        predicted_saturated_period_s=plan.saturated_period_s,
        compression=config.compression or "",
        ready=False,
        ts=time.time(),
    )
