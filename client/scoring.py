"""Owns per-request replica choice: AMP4EC's scoring and edgeslice's earliest expected finish.

:func:`pick_replica` is the one policy, called by the inference client for real requests
and by the simulator (``lab/simulate.py``) for simulated ones, on plain values.

When a stage has replicas, each request goes to one of them. AMP4EC's scheduler
skips nodes that are overloaded (load above ``max_load``) or too far away
(link latency above ``max_latency_s``) and scores the rest::

    score = 0.2·S_R + 0.2·S_L + 0.1·S_P + 0.5·S_B
    S_R = resource fit (0..1)        S_L = 1 − load
    S_P = 1 / (1 + mean recent task time in s)
    S_B = 1 / (1 + 2 · tasks in flight)

Balance weighs most because in-flight counts react within one request, while
load and timings arrive with telemetry delay. If nothing is eligible the least
loaded replica still gets the request: refusing it would lose the request,
which is worse than a slow answer. Ties go to the smallest ``agent_id`` so two
planners (or a test) with the same view make the same choice.

Plans of every other strategy (edgeslice's) take the replica that should finish soonest,
``(in flight + 1) x its stage time`` (measured by the caller, else the planner's
predicted replica period), among replicas within AMP4EC's link-latency threshold. The
score's balance term spreads requests evenly, which starves a fast replica beside a slow
one, while the planner sized the replicas assuming each serves in proportion to its speed.
There is no load filter here: at saturation every fast replica is busier than
``max_load`` *because of this caller's own requests*, and the finish estimate already
counts those; filtering on load would hand everything to the idle slow ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from edgeslice.broker.protocol.errors import ConfigError, PlanningError


@dataclass(frozen=True)
class Weights:
    """Score weights and eligibility thresholds (AMP4EC's published values by default)."""

    resource: float = 0.2
    load: float = 0.2
    performance: float = 0.1
    balance: float = 0.5
    max_load: float = 0.8
    max_latency_s: float = 0.5


@dataclass(frozen=True)
class Candidate:
    """What the scheduler knows of one replica right now."""

    agent_id: str
    resource_fit: float  # 0..1: how comfortably the stage fits the agent's free resources
    load: float  # 0..1 CPU load from telemetry
    recent_task_s: float  # mean of the agent's recent task times for this stage
    in_flight: int  # requests sent to it and not answered yet
    latency_s: float  # measured link latency to the agent
    compute_s: float = 0.0  # the caller's measured stage time on it (EWMA); 0 = none yet
    predicted_period_s: float = 1.0  # the plan's predicted busy seconds per request on it


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))


def eligible(c: Candidate, w: Weights = Weights()) -> bool:
    """AMP4EC's filter: not overloaded and not too far away."""
    return c.load <= w.max_load and c.latency_s <= w.max_latency_s


def score(c: Candidate, w: Weights = Weights()) -> float:
    """Weighted sum of the four sub-scores, each in 0..1 (higher is better)."""
    s_r = _unit(c.resource_fit)
    s_l = 1.0 - _unit(c.load)
    s_p = 1.0 / (1.0 + max(0.0, c.recent_task_s))
    s_b = 1.0 / (1.0 + 2.0 * max(0, c.in_flight))
    return w.resource * s_r + w.load * s_l + w.performance * s_p + w.balance * s_b


def rank(cands: Sequence[Candidate], w: Weights = Weights()) -> list[Candidate]:
    """All candidates, best first: eligible by score, then the rest by load.

    The order is what a retry walks: if the first choice fails, the next one is
    the best remaining replica.
    """
    ok = sorted((c for c in cands if eligible(c, w)), key=lambda c: (-score(c, w), c.agent_id))
    rest = sorted(
        (c for c in cands if not eligible(c, w)), key=lambda c: (c.load, c.latency_s, c.agent_id)
    )
    return ok + rest


def choose(cands: Sequence[Candidate], w: Weights = Weights()) -> Candidate:
    """The replica for the next request; the least loaded one if none is eligible."""
    if not cands:
        raise PlanningError("no replica to choose from: the stage has no live agent; re-plan")
    return rank(cands, w)[0]


def finish_s(c: Candidate) -> float:
    """When a request sent now would finish on ``c``: its queue plus itself, at its rate."""
    return (max(0, c.in_flight) + 1) * (c.compute_s or c.predicted_period_s)


def pick_replica(cands: Sequence[Candidate], strategy: str, w: Weights = Weights()) -> str:
    """The agent id that gets the next request of a stage (see the module docstring).

    ``strategy`` is the plan's: ``"amp4ec"`` takes AMP4EC's :func:`choose`, any other
    the earliest expected finish among replicas within ``w.max_latency_s`` (all of them
    when none is that near). Raises :class:`PlanningError` when there is no candidate.
    """
    if strategy == "amp4ec" or len(cands) <= 1:
        return choose(cands, w).agent_id
    pool = [c for c in cands if c.latency_s <= w.max_latency_s] or list(cands)
    return min(pool, key=lambda c: (finish_s(c), c.agent_id)).agent_id


_KEYS = {f.name for f in fields(Weights)}


def parse_weights(text: str) -> Weights:
    """Parse ``"resource=0.2,load=0.2,...,max_load=0.8"``; unnamed keys keep their defaults.

    Raises :class:`ConfigError` naming the offending key: unknown or repeated
    keys, values that are not finite numbers >= 0, thresholds out of range.
    """
    weights, seen = Weights(), set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = (x.strip() for x in item.partition("="))
        if not sep or key not in _KEYS:
            raise ConfigError(
                f"scoring weights: {item!r} is not key=value with a key from "
                f"{', '.join(sorted(_KEYS))}"
            )
        if key in seen:
            raise ConfigError(f"scoring weights: key {key!r} is given twice")
        seen.add(key)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"scoring weights: {key}={raw!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"scoring weights: {key}={raw} must be a finite number >= 0")
        if key == "max_load" and value > 1:
            raise ConfigError(f"scoring weights: max_load={raw} must be between 0 and 1")
        weights = replace(weights, **{key: value})
    if weights.resource + weights.load + weights.performance + weights.balance <= 0:
        raise ConfigError("scoring weights: resource, load, performance and balance are all 0")
    return weights
