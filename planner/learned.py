"""Owns the learned compute estimator: layer + device features, the boosted trees, holdout.

FlexPie prices layers with gradient-boosted trees trained offline; here the training data
is a calibration sweep the agents ran on their own execution path (agent/sweep.py, via
``edgeslice calibrate``) plus, while serving, the stage timings they report
(planner/learnedcost.py). This module is pure except for scikit-learn, which is optional
(the ``ml`` extra): :func:`available` says whether it is installed, and without it the
planner keeps the analytic model.

**Features** of a (layer, device) pair (:func:`features`): the layer's kind and op
(categorical), log FLOPs (as the profile counts them), log work (elements touched for ops
without counted FLOPs), log bytes in / out / parameters, kernel, stride, log groups, log
input and output spatial size, log channels in and out; the device's log calibrated
GFLOP/s and log memory budget.

**Target**: log seconds, learnt as a residual over a roofline-like base,
``log(seconds) - log(base)``, ``base = work / rate`` (:func:`base_s`). Trees cannot
extrapolate, and a device faster or a layer larger than any in the sweep would get the
sweep's largest time; against the base, they predict a *ratio*, which carries over.

**Analytic baseline** per layer (:func:`analytic_s`): the cost model's compute, counted
FLOPs over the device's calibrated rate (:func:`~planner.costmodel.seconds_per_flop`).
**Timed baseline** (:func:`timed_s`), when the sweep layer was also timed on the
calibrating host: that time in calibration-equivalent FLOPs over the device's rate,
which is how the planner actually prices segments (planner/timing.py). Per-layer
comparisons leave out the cost model's per-stage overhead (``min_compute_s``): a sweep
times a bare layer.

**Holdout** (:func:`holdout`): the learned model is scored only on layers it was not
trained on, whole groups at a time: a sweep group is one kind of layer in one band of
channel widths (so e.g. wide depthwise convolutions are predicted by a model that saw no
wide depthwise convolution); a model's layers (``model:<name>``) are one group, predicted
by a model trained on the sweep alone. :func:`choose` then picks, per kind, the learned
model where both its median and 90th-percentile error beat the baseline's.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeslice.broker.layerspec import (
    KINDS,
    OPS,
    LayerSpec,
    counted_flops,
    kind,
    layer_bytes,
    work,
)

MIN_KIND_SAMPLES = 5  # fewer held-out samples of a kind: no evidence, keep the baseline
_OP_CODES = {op: i for i, op in enumerate(sorted(OPS))}
_KIND_CODES = {k: i for i, k in enumerate(KINDS)}


def available() -> bool:
    """Whether scikit-learn (the ``ml`` extra) is installed."""
    try:
        import sklearn.ensemble  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class DeviceFeatures:
    """What the estimator knows of a device: its calibrated rate and memory budget."""

    gflops: float
    memory_bytes: int


@dataclass(frozen=True)
class LayerSample:
    """One measured layer: ``seconds`` for ``spec`` on a device, and where it came from."""

    spec: LayerSpec
    device: DeviceFeatures
    seconds: float
    agent: str = ""
    group: str = ""  # holdout group (:func:`sweep_group` or ``model:<name>``)
    source: str = "sweep"  # "sweep" or "serving"
    weight: float = 1.0
    host_s: float | None = None  # the same layer on the calibrating host (timed baseline)


def sweep_group(spec: LayerSpec) -> str:
    """The holdout group of a sweep layer: its kind and a band of channel widths."""
    band = "narrow" if spec.cin <= 32 else "mid" if spec.cin <= 160 else "wide"
    return f"{kind(spec)}/{band}"


def features(spec: LayerSpec, device: DeviceFeatures) -> list[float]:
    """The feature row of ``spec`` on ``device`` (module docstring; two categoricals first)."""
    b_in, b_out, b_par = layer_bytes(spec)
    oh, ow = spec.out_hw
    return [
        float(_KIND_CODES[kind(spec)]),
        float(_OP_CODES[spec.op]),
        math.log1p(counted_flops(spec)),
        math.log1p(work(spec)),
        math.log1p(b_in),
        math.log1p(b_out),
        math.log1p(b_par),
        float(spec.k),
        float(spec.stride),
        math.log2(spec.groups),
        math.log1p(spec.h * spec.w),
        math.log1p(oh * ow),
        math.log2(spec.cin),
        math.log2(max(1, spec.channels_out)),
        math.log(max(device.gflops, 1e-3)),
        math.log(max(device.memory_bytes, 1)),
    ]


def base_s(spec: LayerSpec, device: DeviceFeatures) -> float:
    """The roofline-like base the trees learn a log-ratio over: work over the rate."""
    return max(work(spec), 1.0) / (max(device.gflops, 1e-3) * 1e9)


def analytic_s(spec: LayerSpec, device: DeviceFeatures) -> float:
    """The analytic cost model's time for the bare layer: counted FLOPs over the rate."""
    return counted_flops(spec) / (max(device.gflops, 1e-3) * 1e9)


def timed_s(sample: LayerSample, reference_gflops: float) -> float | None:
    """The planner's timed pricing of the layer: host seconds x host rate / device rate."""
    if sample.host_s is None or reference_gflops <= 0:
        return None
    return sample.host_s * reference_gflops / max(sample.device.gflops, 1e-3)


class LearnedEstimator:
    """Gradient-boosted trees (HistGradientBoostingRegressor) over :func:`features`.

    ``fit`` trains on samples; ``predict_s`` gives seconds for layers on devices;
    :meth:`compute_s` is the callable the planner's DPs take (a layer or a block of them
    on a cost-model :class:`~planner.costmodel.Device` or :class:`DeviceFeatures`).
    """

    def __init__(self, seed: int = 0, max_iter: int = 300) -> None:
        self.seed = seed
        self.max_iter = max_iter
        self._model: Any = None
        self.trained_on = 0

    def fit(self, samples: Sequence[LayerSample]) -> LearnedEstimator:
        from sklearn.ensemble import HistGradientBoostingRegressor

        good = [s for s in samples if s.seconds > 0 and math.isfinite(s.seconds)]
        if len(good) < 10:
            raise ValueError(f"the learned estimator needs at least 10 samples, got {len(good)}")
        x = [features(s.spec, s.device) for s in good]
        y = [math.log(s.seconds / base_s(s.spec, s.device)) for s in good]
        model = HistGradientBoostingRegressor(
            max_iter=self.max_iter,
            learning_rate=0.06,
            max_leaf_nodes=15,
            min_samples_leaf=4,
            l2_regularization=1.0,
            categorical_features=[0, 1],
            random_state=self.seed,
        )
        with _one_thread():
            model.fit(
                np.asarray(x), np.asarray(y), sample_weight=np.asarray([s.weight for s in good])
            )
        self._model, self.trained_on = model, len(good)
        return self

    @property
    def fitted(self) -> bool:
        return self._model is not None

    def predict_s(self, pairs: Sequence[tuple[LayerSpec, DeviceFeatures]]) -> list[float]:
        """Predicted seconds of each (layer, device) pair."""
        if self._model is None:
            raise RuntimeError("LearnedEstimator.predict_s before fit")
        if not pairs:
            return []
        with _one_thread():
            logs = self._model.predict(np.asarray([features(spec, dev) for spec, dev in pairs]))
        return [base_s(spec, dev) * math.exp(v) for (spec, dev), v in zip(pairs, logs, strict=True)]

    def compute_s(self, layers: LayerSpec | Iterable[LayerSpec], device: Any) -> float:
        """Seconds ``layers`` (one, or a block run back to back) take on ``device``.

        ``device`` is a :class:`DeviceFeatures` or anything with ``gflops`` and
        ``memory_bytes`` (the cost model's ``Device``). No per-stage overhead is added.
        """
        dev = device_features(device)
        specs = [layers] if isinstance(layers, LayerSpec) else list(layers)
        return math.fsum(self.predict_s([(s, dev) for s in specs]))


def _one_thread() -> Any:
    """scikit-learn's OpenMP on one thread: a few hundred samples train in a fraction of a
    second on one core, while OpenMP's threads on a busy 2-core host (agents, the planner,
    torch's own pool) spin at every barrier: measured 19 s instead of 0.4 s for one fit."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


def device_features(device: Any) -> DeviceFeatures:
    if isinstance(device, DeviceFeatures):
        return device
    return DeviceFeatures(float(device.gflops), int(device.memory_bytes))


# -- holdout ---------------------------------------------------------------------------------
def rel_error(predicted: float, measured: float) -> float:
    """``|predicted / measured - 1|``."""
    return abs(predicted / measured - 1.0)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation (``statistics.quantiles``' inclusive)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class ErrorStats:
    """Median and 90th percentile of the absolute relative error over ``n`` layers."""

    n: int
    p50: float
    p90: float

    @classmethod
    def of(cls, errors: Sequence[float]) -> ErrorStats | None:
        return cls(len(errors), quantile(errors, 0.5), quantile(errors, 0.9)) if errors else None


@dataclass(frozen=True)
class HoldoutRow:
    """Errors on one slice of the held-out layers (a kind, a model's layers, or all)."""

    name: str
    learned: ErrorStats
    analytic: ErrorStats
    timed: ErrorStats | None = None


@dataclass(frozen=True)
class Holdout:
    """Per-kind rows, per-model rows and the overall row of a grouped holdout."""

    kinds: list[HoldoutRow]
    models: list[HoldoutRow]
    overall: HoldoutRow
    folds: int
    predictions: list[Predicted] = field(default_factory=list, repr=False)


def _folds(groups: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Sweep groups dealt into ``k`` folds (seeded), each model group a fold of its own."""
    sweep = sorted(g for g in set(groups) if not g.startswith("model:"))
    random.Random(seed).shuffle(sweep)
    folds = [sweep[i::k] for i in range(min(k, len(sweep)))]
    return [f for f in folds if f] + [[g] for g in sorted(set(groups)) if g.startswith("model:")]


@dataclass(frozen=True)
class Predicted:
    """One held-out sample with each estimator's prediction (seconds; timed may be absent)."""

    sample: LayerSample
    learned: float
    analytic: float
    timed: float | None


def corrected(
    train: Sequence[LayerSample], test: Sequence[LayerSample], predict: Any
) -> list[float | None]:
    """``predict(sample)`` on ``test`` times the per-agent correction the planner would fit
    (:func:`~planner.costmodel.fit_correction`) on ``train``'s measured / predicted."""
    from edgeslice.planner.costmodel import fit_correction

    fitted = []
    for s in train:
        p = predict(s)
        if p is not None and p > 0:
            fitted.append((s.agent, p, s.seconds))
    factor = fit_correction(fitted)
    out: list[float | None] = []
    for s in test:
        p = predict(s)
        out.append(None if p is None else p * factor.get(s.agent, 1.0))
    return out


def holdout(
    samples: Sequence[LayerSample], reference_gflops: float = 0.0, k: int = 5, seed: int = 0
) -> Holdout:
    """Score a learned model on groups it was not trained on (module docstring). The
    baselines get the per-agent correction the planner fits, fitted on the same folds."""
    sweep = [s for s in samples if s.source == "sweep" and s.seconds > 0]
    predicted: list[Predicted] = []
    folds = _folds([s.group for s in sweep], k, seed)
    for held in folds:
        out = set(held)
        modelfold = held[0].startswith("model:")
        train = [
            s
            for s in sweep
            if s.group not in out and not (modelfold and s.group.startswith("model:"))
        ]
        test = [s for s in sweep if s.group in out]
        if len(train) < 10 or not test:
            continue
        est = LearnedEstimator(seed).fit(train)
        learned = est.predict_s([(s.spec, s.device) for s in test])
        analytic = corrected(train, test, lambda s: analytic_s(s.spec, s.device))
        timed = corrected(train, test, lambda s: timed_s(s, reference_gflops))
        for s, la, an, ti in zip(test, learned, analytic, timed, strict=True):
            predicted.append(Predicted(s, la, an or 0.0, ti))
    if not predicted:
        raise ValueError("holdout: no group could be held out (too few samples)")
    by_kind: dict[str, list[Predicted]] = defaultdict(list)
    by_model: dict[str, list[Predicted]] = defaultdict(list)
    for p in predicted:
        group = p.sample.group
        (by_model[group] if group.startswith("model:") else by_kind[kind(p.sample.spec)]).append(p)
    kinds = [_row(kd, by_kind[kd]) for kd in KINDS if by_kind.get(kd)]
    models = [_row(m, by_model[m]) for m in sorted(by_model)]
    return Holdout(kinds, models, _row("all", predicted), len(folds), predicted)


def _row(name: str, rows: Sequence[Predicted]) -> HoldoutRow:
    def stats(values: Iterable[float | None]) -> ErrorStats | None:
        errors = [
            rel_error(v, p.sample.seconds)
            for v, p in zip(values, rows, strict=True)
            if v is not None
        ]
        return ErrorStats.of(errors) if len(errors) == len(rows) else None

    la, an = stats(p.learned for p in rows), stats(p.analytic for p in rows)
    assert la is not None and an is not None  # rows is never empty here
    return HoldoutRow(name, la, an, stats(p.timed for p in rows))


# -- the planner's choice --------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """Which kinds of layer the planner prices with the learned model, and why each."""

    learned: frozenset[str]
    baseline: str  # "timed" (the planner's segment timing) or "analytic" (FLOPs / rate)
    reasons: dict[str, str]

    def uses(self, layer_kind: str) -> bool:
        return layer_kind in self.learned


def choose(result: Holdout, baseline: str = "timed") -> Choice:
    """Per kind: learned where its median *and* p90 holdout error beat the baseline's.

    ``baseline`` is what the planner would otherwise use: ``timed`` when the holdout has
    timed errors (falls back to ``analytic`` when it does not).
    """
    if baseline == "timed" and any(row.timed is None for row in result.kinds):
        baseline = "analytic"
    learned: set[str] = set()
    reasons: dict[str, str] = {}
    for row in result.kinds:
        base = row.timed if baseline == "timed" else row.analytic
        assert base is not None
        la = row.learned
        fig = (
            f"learned p50 {la.p50:.0%} p90 {la.p90:.0%} vs {baseline} "
            f"p50 {base.p50:.0%} p90 {base.p90:.0%} on {la.n} held-out layers"
        )
        if la.n < MIN_KIND_SAMPLES:
            reasons[row.name] = f"{baseline}: too few held-out layers ({la.n})"
        elif la.p50 < base.p50 and la.p90 <= base.p90:
            learned.add(row.name)
            reasons[row.name] = f"learned: {fig}"
        else:
            reasons[row.name] = f"{baseline}: {fig}"
    for k in KINDS:
        reasons.setdefault(k, f"{baseline}: no held-out layer of this kind")
    return Choice(frozenset(learned), baseline, reasons)
