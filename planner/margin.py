"""Owns the decision margin: when a plan predicted better is better *enough* to be chosen.

The cost model is off by some relative error (measured: the residuals of the fitted
correction against the stage timings agents report). A candidate whose predicted gain
is smaller than that error may well be worse in reality -- the scaling run's third
device chose a 3-stage pipeline predicted 2.1x faster than a replica that measured
faster -- and switching plans has a cost of its own (new assignments, artifacts to
fetch, requests retried). So a candidate must beat a *simpler* plan (fewer stages) or
the *current* plan by more than the margin; the same rule is the hysteresis that stops
plans flapping between near-equal alternatives.

Pure functions on plain numbers; :func:`planner.partition.plan_partition` applies
them inside the search and against a baseline plan, and a re-planning service can
call :func:`worth_switching` directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from edgeslice.planner.costmodel import Sample, correction_samples

DEFAULT_MARGIN = 0.10  # nothing measured yet: the target accuracy for predictions
# Below this the measured error is not trusted: fitted residuals are in-sample (they
# flatter), and measured throughput itself varies by ~5 % run to run on a shared host
# (benchmarks/scaling.py allows 5 % noise for the same reason).
MIN_MARGIN = 0.05
MAX_MARGIN = 0.50  # a model that wrong should not freeze the plan either


def prediction_error(samples: Iterable[Sample], correction: Mapping[str, float]) -> float | None:
    """Request-weighted mean relative error of the corrected predictions, or None.

    ``samples`` are ``(agent_id, predicted_s, measured_s[, count])`` with
    ``predicted_s`` *uncorrected* (what :func:`~planner.costmodel.fit_correction`
    is fitted on) and ``correction`` the fitted multipliers; each sample's residual
    is ``|measured / (predicted * correction[agent]) - 1|``. None when no valid
    sample exists.
    """
    total, weighted = 0.0, 0.0
    for agent_id, values in correction_samples(samples).items():
        factor = correction.get(agent_id, 1.0)
        for ratio, weight in values:
            total += weight
            weighted += weight * abs(ratio / factor - 1.0)
    return weighted / total if total > 0 else None


def decision_margin(
    samples: Iterable[Sample] = (),
    correction: Mapping[str, float] | None = None,
    default: float = DEFAULT_MARGIN,
) -> float:
    """The relative gain a plan must show to be preferred: measured error, bounded.

    ``default`` when nothing is measured; otherwise :func:`prediction_error` clamped
    to [``MIN_MARGIN``, ``MAX_MARGIN``].
    """
    error = prediction_error(samples, correction or {})
    if error is None or not math.isfinite(error):
        return default
    return min(MAX_MARGIN, max(MIN_MARGIN, error))


def gain(candidate_s: float, baseline_s: float) -> float:
    """Relative improvement of ``candidate_s`` over ``baseline_s`` (0.2 = 20 % less time)."""
    if baseline_s <= 0 or not math.isfinite(baseline_s):
        return 0.0 if candidate_s >= baseline_s else math.inf
    return (baseline_s - candidate_s) / baseline_s


def worth_switching(candidate_s: float, baseline_s: float, margin: float) -> bool:
    """Whether a plan predicted to take ``candidate_s`` should replace one taking ``baseline_s``.

    True only when the predicted gain exceeds ``margin`` (strictly): times are a
    period (throughput) or a latency, the smaller the better. Use it against the
    current plan (hysteresis) and against a simpler plan (fewer stages).
    """
    return gain(candidate_s, baseline_s) > margin


def prefer(
    candidate_s: float, candidate_stages: int, best_s: float, best_stages: int, margin: float
) -> bool:
    """Whether a search candidate replaces the best so far.

    A deeper pipeline (more stages: more hops, more to go wrong, more prediction
    error) must win by more than ``margin``; one no deeper only has to be better
    (beyond float noise).
    """
    if candidate_stages > best_stages:
        return worth_switching(candidate_s, best_s, margin)
    return candidate_s < best_s * (1 - 1e-9)
