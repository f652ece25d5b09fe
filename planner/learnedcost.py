"""Owns pricing a model with the learned estimator: graph nodes as layers, segment costs,
and the serving samples that keep the estimator current.

The planner prices a segment in calibration-equivalent FLOPs (planner/timing.py: its time
on the planner's host, times the host's calibration rate); a device's time is those over
its own rate. :class:`LearnedPricing` replaces, node by node, the timed part of layers of
the kinds its :class:`~planner.learned.Choice` names (those whose holdout error beat the
timed baseline's) with the estimator's prediction on each device, converted the same way
(seconds x device rate). The cost model keeps one FLOP figure per segment for all devices
(its DPs group devices by rate), so a segment's figure is the median over the fleet's
devices; how far devices disagree is logged (``spread``). Nodes that map to no layer kind
(views, dropout, attention, ...) keep their timed price.

**While serving** (:meth:`LearnedPricing.observe`): each stage an agent reports (mean
``compute_s`` over ``count`` >= 3 requests) becomes samples: the stage's measured time,
less the cost model's per-stage overhead, is shared among its layers in proportion to
their current prediction (the timed price for the other nodes), and each layer's share is
a sample on that agent. The latest report per (agent, stage artifact) replaces the one
before, at most :data:`MAX_SERVING` samples are kept (oldest stages dropped first), and
:meth:`refit` retrains when they changed, at most once per ``refit_interval_s`` (the
planner calls it off the event loop). The per-kind choice stays the calibration file's:
serving samples are not held out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgeslice.broker.layerspec import LayerSpec, kind
from edgeslice.planner.costmodel import DEFAULT_PARAMS, Device, ModelCost
from edgeslice.planner.learned import (
    Choice,
    DeviceFeatures,
    LayerSample,
    LearnedEstimator,
    device_features,
)

log = logging.getLogger(__name__)

MAX_SERVING = 3000  # serving samples kept (a stage contributes one per layer)
MIN_COUNT = 3  # requests behind a reported stage mean before it becomes samples
OBSERVE_EVERY_S = 5.0  # how often telemetry's stage timings are folded in


def _shape(value: Any) -> tuple[int, ...] | None:
    val = getattr(value, "meta", {}).get("val") if value is not None else None
    shape = getattr(val, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _first(value: Any, default: int) -> int:
    if isinstance(value, list | tuple):
        return int(value[0]) if value else default
    return int(value) if value is not None else default


def _arg(node: Any, index: int, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else default


def node_spec(node: Any) -> LayerSpec | None:
    """The :class:`LayerSpec` an ATen graph node computes (batch 1), or None (not modelled)."""
    target = str(node.target)
    x = _shape(_arg(node, 0))
    if x is None or not x or x[0] != 1:
        return None
    name = target.removeprefix("aten.").split(".")[0].rstrip("_")
    try:
        if name == "conv2d" and len(x) == 4:
            w = _shape(_arg(node, 1))
            dilation = _arg(node, 5, 1)
            if w is None or w[2] != w[3] or _first(dilation, 1) != 1:
                return None
            groups = int(_arg(node, 6, 1))
            stride, pad = _first(_arg(node, 3, 1), 1), _first(_arg(node, 4, 0), 0)
            return LayerSpec("conv2d", x[1], x[2], x[3], w[0], w[2], stride, pad, groups)
        if name == "linear":
            w = _shape(_arg(node, 1))
            rows = math.prod(x[:-1])
            return None if w is None else LayerSpec("linear", x[-1], rows, 1, w[0])
        if name in ("max_pool2d", "avg_pool2d") and len(x) == 4:
            k = _first(_arg(node, 1), 1)
            stride = _first(_arg(node, 2, None) or k, k)
            op = "maxpool2d" if name == "max_pool2d" else "avgpool2d"
            return LayerSpec(op, x[1], x[2], x[3], 0, k, stride, _first(_arg(node, 3, 0), 0))
        if name == "adaptive_avg_pool2d" and len(x) == 4 and list(_arg(node, 1, [])) == [1, 1]:
            return LayerSpec("gavgpool", x[1], x[2], x[3])
        if name in ("batch_norm", "_native_batch_norm_legit_no_training") and len(x) == 4:
            return LayerSpec("batchnorm", x[1], x[2], x[3])
        if name == "layer_norm":
            return LayerSpec("layernorm", x[-1], math.prod(x[:-1]))
        if name not in ("relu", "hardtanh", "gelu", "add"):
            return None
        op = name
        if op == "add" and _shape(_arg(node, 1)) != x:
            return None
        if len(x) == 4:
            return LayerSpec(op, x[1], x[2], x[3])
        return LayerSpec(op, x[-1], math.prod(x[:-1]))
    except (ValueError, TypeError, IndexError):
        return None


def segment_layers(profile: Any) -> list[list[tuple[str, LayerSpec | None]]]:
    """Per segment of a :class:`~planner.profile.ModelProfile`: (node name, layer or None)."""
    order = profile.graph.order
    return [
        [(order[i].name, node_spec(order[i])) for i in range(seg.first, seg.last + 1)]
        for seg in profile.segments
    ]


def model_layers(profile: Any) -> list[LayerSpec]:
    """The distinct layers of a profiled model, in graph order (for a calibration sweep)."""
    seen: dict[LayerSpec, None] = {}
    for layers in segment_layers(profile):
        seen.update((spec, None) for _, spec in layers if spec is not None)
    return list(seen)


@dataclass(frozen=True)
class Priced:
    """A model priced for a fleet: its cost, and how much of it the learned model set."""

    cost: ModelCost
    learned_share: float  # of the total equivalent FLOPs (median device)
    spread: float  # largest max/min ratio over devices of one segment's figure


class LearnedPricing:
    """The estimator, its samples and choice, bound to one profiled model (module doc)."""

    def __init__(
        self,
        samples: Sequence[LayerSample],
        choice: Choice,
        profile: Any,
        node_s: Mapping[str, float],
        reference_gflops: float,
        refit_interval_s: float = 60.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.sweep = [s for s in samples if s.source == "sweep"]
        self.choice = choice
        self.layers = segment_layers(profile)
        self.node_s = dict(node_s)
        self.reference = reference_gflops
        self.refit_interval_s = refit_interval_s
        self.clock = clock
        self.serving: dict[tuple[str, str], tuple[float, list[LayerSample]]] = {}
        self.estimator = LearnedEstimator().fit(self.sweep)
        self._dirty = False
        self._fitted_at = clock()
        self._observed_at = -math.inf
        self._refitting: asyncio.Task[None] | None = None
        self.refits = 0

    def _timed_s(self, name: str, dev: DeviceFeatures) -> float:
        return self.node_s.get(name, 0.0) * self.reference / max(dev.gflops, 1e-3)

    def _learned(self, spec: LayerSpec | None) -> bool:
        return spec is not None and self.choice.uses(kind(spec))

    def price(self, cost: ModelCost, devices: Sequence[Device]) -> Priced:
        """``cost`` with the chosen kinds' share of each segment priced by the learned model.

        A segment keeps its timed FLOPs for the nodes of other kinds (in proportion of
        their timed share) and adds the learned layers' equivalent FLOPs, the median over
        ``devices``; with no kind chosen, ``cost`` comes back unchanged.
        """
        if not self.choice.learned or not devices:
            return Priced(cost, 0.0, 1.0)
        feats = [device_features(d) for d in devices]
        chosen = [[s for _, s in seg if s is not None and self._learned(s)] for seg in self.layers]
        pairs = [(spec, f) for f in feats for specs in chosen for spec in specs]
        predicted = iter(self.estimator.predict_s(pairs))
        per_device = [
            [sum(next(predicted) for _ in specs) * f.gflops * 1e9 for specs in chosen]
            for f in feats
        ]
        segments, learned_total, total, spread = [], 0.0, 0.0, 1.0
        for s, seg in enumerate(cost.segments):
            timed = [self.node_s.get(name, 0.0) for name, _ in self.layers[s]]
            kept = [
                t
                for t, (_, spec) in zip(timed, self.layers[s], strict=True)
                if not self._learned(spec)
            ]
            base = seg.flops * (sum(kept) / sum(timed) if sum(timed) > 0 else 1.0)
            eq = [per_device[d][s] for d in range(len(feats))]
            learned = statistics.median(eq)
            if min(eq) > 0:
                spread = max(spread, max(eq) / min(eq))
            learned_total += learned
            total += base + learned
            segments.append(replace(seg, flops=max(base + learned, 1.0)))
        share = learned_total / total if total > 0 else 0.0
        return Priced(replace(cost, segments=tuple(segments)), share, spread)

    # -- serving samples ---------------------------------------------------------------------
    def observe(
        self,
        timings: Mapping[str, Mapping[str, Mapping[str, float]]],
        ranges: Mapping[str, tuple[int, int]],
        devices: Mapping[str, Device],
    ) -> int:
        """Turn reported stage timings into samples (module doc); returns how many stages."""
        used = 0
        for agent_id, stages in timings.items():
            device = devices.get(agent_id)
            for sha, t in stages.items():
                count, mean = float(t.get("count", 0)), float(t.get("compute_s", 0.0))
                if device is None or sha not in ranges or count < MIN_COUNT or mean <= 0:
                    continue
                key = (agent_id, sha)
                if key in self.serving and self.serving[key][0] == count:
                    continue  # nothing new since the last look
                made = self._stage_samples(
                    agent_id, device_features(device), ranges[sha], mean, count
                )
                if made:
                    self.serving.pop(key, None)
                    self.serving[key] = (count, made)
                    self._dirty, used = True, used + 1
        while sum(len(v) for _, v in self.serving.values()) > MAX_SERVING:
            self.serving.pop(next(iter(self.serving)))
        return used

    def _stage_samples(
        self, agent_id: str, dev: DeviceFeatures, span: tuple[int, int], mean: float, count: float
    ) -> list[LayerSample]:
        start, end = span
        layers = [x for seg in self.layers[start:end] for x in seg]
        specs = [spec for _, spec in layers if spec is not None]
        if not specs:
            return []
        predicted = self.estimator.predict_s([(spec, dev) for spec in specs])
        other = sum(self._timed_s(name, dev) for name, spec in layers if spec is None)
        body = max(mean - DEFAULT_PARAMS.min_compute_s, 1e-6)
        scale = min(10.0, max(0.1, body / max(other + sum(predicted), 1e-9)))
        weight = min(count, 50.0) / 50.0
        return [
            LayerSample(spec, dev, p * scale, agent_id, "serving", "serving", weight)
            for spec, p in zip(specs, predicted, strict=True)
        ]

    def due(self) -> bool:
        """New serving samples, and the refit interval has passed since the last fit."""
        return self._dirty and self.clock() - self._fitted_at >= self.refit_interval_s

    def refit(self) -> None:
        """Retrain on the sweep plus the serving samples (blocking: call it in a thread)."""
        serving = [s for _, v in self.serving.values() for s in v]
        self._dirty = False
        self.estimator = LearnedEstimator().fit([*self.sweep, *serving])
        self._fitted_at = self.clock()
        self.refits += 1
        log.info(
            "learned cost model refitted on %d sweep + %d serving samples (%d stages)",
            len(self.sweep),
            len(serving),
            len(self.serving),
        )

    # -- the planner service's hooks ---------------------------------------------------------
    def cost_for(self, cost: ModelCost, devices: Sequence[Device]) -> ModelCost:
        """:meth:`price` for the planner, logging what the learned model priced (nothing to
        log when it prices no kind: the planner said so when it loaded the file)."""
        if not self.choice.learned:
            return cost
        priced = self.price(cost, devices)
        log.info(
            "plan priced with the learned model for %s (%.0f%% of the model's compute; "
            "devices disagree up to x%.2f on a segment), the %s model for the rest",
            ", ".join(sorted(self.choice.learned)) or "nothing",
            100 * priced.learned_share,
            priced.spread,
            self.choice.baseline,
        )
        return priced.cost

    def learn(self, registry: Any, plan: Any, now: float) -> None:
        """On telemetry: fold the served plan's reported stage timings in (at most every
        few seconds) and start a refit in a worker thread when one is :meth:`due`. Nothing
        when the learned model prices no kind: a refit would change no plan."""
        if not self.choice.learned or plan is None or not plan.stages:
            return
        if self.clock() - self._observed_at < OBSERVE_EVERY_S:
            return
        self._observed_at = self.clock()
        ranges = {s.artifact: (s.start_segment, s.end_segment) for s in plan.stages}
        devices = {d.agent_id: d for d in registry.devices(now)}
        self.observe(registry.stage_timings(), ranges, devices)
        if self.due() and self._refitting is None:
            self._refitting = asyncio.create_task(asyncio.to_thread(self.refit))
            self._refitting.add_done_callback(self._refit_done)

    def _refit_done(self, task: asyncio.Task[None]) -> None:
        self._refitting = None
        if not task.cancelled() and task.exception() is not None:
            log.error("learned cost model refit failed: %s", task.exception())
