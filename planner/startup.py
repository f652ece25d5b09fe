"""The planner's start-up: load and price the model, then adopt or replace a retained plan.

:func:`load_and_price` loads, profiles and times the model (torch: call it in a thread).
Adopting: a restarted planner must not pull the plan from under a fleet that is serving it. The
pure checks (same model, strategy, objective and compression; every agent online and reporting
that plan version ready) are :func:`planner.replan.adopt_problem`; this module adds the
one that needs torch: rebuilding the plan's cut must reproduce the artifacts' sha256
(artifacts are content-addressed and Ed25519 signing is deterministic, so the same model,
cut and key give the same bytes). A different model file, profile (``--max-segments``) or
key gives other shas, and the plan is replaced instead of adopted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import PlanMessage
from edgeslice.planner.replan import adopt_problem

log = logging.getLogger(__name__)

# how long start-up waits for the retained view (a broker sends retained messages at once)
ADOPT_WAIT_S = 2.0


async def retained_plan(
    fleet: FleetState,
    model: str,
    strategy: str,
    compression: str,
    timeout: float = ADOPT_WAIT_S,
    objective: str | None = None,
    max_latency_s: float | None = None,
) -> tuple[PlanMessage | None, str | None]:
    """The retained plan of ``model`` (None: none) and why it cannot be adopted (None: it can).

    Waits up to ``timeout`` for the retained messages to arrive, less when the plan and
    its agents' reports are in and say it can be adopted. With ``max_latency_s``
    (``--max-latency-ms``) a plan predicted slower than the bound is not adopted.
    """
    deadline = time.monotonic() + timeout
    while True:
        plan = fleet.plans.get(model)
        problem = (
            "none seen"
            if plan is None
            else adopt_problem(plan, model, strategy, compression, fleet.agents, objective)
            or latency_problem(plan, max_latency_s)
        )
        if problem is None or time.monotonic() >= deadline:
            return plan, problem
        await asyncio.sleep(0.05)


def latency_problem(plan: PlanMessage, max_latency_s: float | None) -> str | None:
    """Why ``plan`` breaks a ``--max-latency-ms`` bound (None: no bound, or within it)."""
    if max_latency_s is None or plan.predicted_latency_s <= max_latency_s * (1 + 1e-9):
        return None
    return (
        f"its predicted latency {plan.predicted_latency_s * 1e3:.1f} ms is over "
        f"--max-latency-ms {max_latency_s * 1e3:g}"
    )


def rebuild_problem(
    plan: PlanMessage, loaded: Any, profile: Any, key: Any
) -> tuple[str | None, list[Any]]:
    """Rebuild ``plan``'s cut (worker thread: torch): why it differs (None: same), artifacts."""
    from edgeslice.planner.stages import build_stages

    boundaries = [s.start_segment for s in plan.stages] + [plan.stages[-1].end_segment]
    if boundaries[-1] != len(profile.segments):
        return (
            f"its cut ends at segment {boundaries[-1]}, the model has {len(profile.segments)}",
            [],
        )
    try:
        artifacts = build_stages(loaded.module, loaded.example_inputs, profile, boundaries, key)
    except Exception as exc:  # a cut this profile cannot make
        return f"its cut cannot be rebuilt: {exc}", []
    for stage, art in zip(plan.stages, artifacts, strict=True):
        if stage.artifact != art.sha256:
            return (
                f"stage {stage.stage} rebuilds as artifact {art.sha256[:12]}, the plan names "
                f"{stage.artifact[:12]} (another model file, --max-segments or fleet key?)",
                [],
            )
    return None, list(artifacts)


def load_and_price(model_spec: str, max_segments: int) -> tuple[Any, Any, Any]:
    """(loaded model, profile, ModelCost priced by measured segment times); torch, blocking."""
    from edgeslice.planner.modelspec import load_model
    from edgeslice.planner.profile import profile_model
    from edgeslice.planner.timing import timed_cost

    started = time.perf_counter()
    loaded = load_model(model_spec)
    profile = profile_model(loaded.module, loaded.example_inputs, max_segments, loaded.name)
    # price segments by their measured time, not raw FLOPs (see planner/timing.py)
    cost, reference = timed_cost(profile, loaded.example_inputs, module=loaded.module)
    log.info(
        "planner model=%s segments=%d profiled and timed in %.1fs (%.2f GFLOP "
        "calibration-equivalent at %.1f GFLOP/s here; %.2f GFLOP counted)",
        loaded.name,
        len(profile.segments),
        time.perf_counter() - started,
        sum(seg.flops for seg in cost.segments) / 1e9,
        reference,
        profile.total_flops / 1e9,
    )
    return loaded, profile, cost


@dataclass
class Adoption:
    """What start-up found retained: the plan (None: none), why not to adopt it (None: adopt),
    and, when adopting, its rebuilt artifacts and its agents' desired assignments."""

    plan: PlanMessage | None
    problem: str | None
    artifacts: list[Any] = field(default_factory=list)
    desired: dict[str, bytes] = field(default_factory=dict)


async def examine_retained(
    fleet: FleetState,
    model: str,
    strategy: str,
    compression: str,
    loaded: Any,
    profile: Any,
    key: Any,
    objective: str | None = None,
    max_latency_s: float | None = None,
) -> Adoption:
    """Wait for the retained view, check the plan, rebuild its cut (in a thread)."""
    plan, problem = await retained_plan(
        fleet, model, strategy, compression, objective=objective, max_latency_s=max_latency_s
    )
    if plan is None or problem is not None:
        return Adoption(plan, problem)
    problem, artifacts = await asyncio.to_thread(rebuild_problem, plan, loaded, profile, key)
    if problem is not None:
        return Adoption(plan, problem)
    desired = {
        agent_id: codec.encode(view.desired)
        for agent_id, view in fleet.agents.items()
        if view.desired is not None
        and (view.desired.plan_id, view.desired.plan_version) == (plan.plan_id, plan.plan_version)
    }
    return Adoption(plan, None, artifacts, desired)
