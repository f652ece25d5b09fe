"""The learned cost estimator on a real (small) sweep run here: features, training, holdout,
the per-kind choice and its fallback, pricing a model, serving samples, the file."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from edgeslice.agent import pacing
from edgeslice.agent.sweep import parse_args, run_sweep
from edgeslice.broker.calibration import measure_gflops
from edgeslice.broker.layerrun import build
from edgeslice.broker.layerspec import LayerSpec, counted_flops, kind, sweep_set
from edgeslice.broker.protocol.errors import ConfigError, EdgesliceError
from edgeslice.planner import learned
from edgeslice.planner.calibrate import Calibration, SweepLayer, load, load_pricing, sweep_layers
from edgeslice.planner.costmodel import Device
from edgeslice.planner.learned import (
    Choice,
    DeviceFeatures,
    ErrorStats,
    Holdout,
    HoldoutRow,
    LayerSample,
    LearnedEstimator,
    choose,
    holdout,
    rel_error,
)
from edgeslice.planner.learnedcost import LearnedPricing, model_layers, segment_layers
from edgeslice.planner.profile import profile_model
from edgeslice.planner.timing import node_seconds, timed_cost
from edgeslice.planner.tracing import count_flops

pytest.importorskip("sklearn")


class Tiny(nn.Module):
    """Every kind of layer the estimator models, plus one it does not (flatten)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.Conv2d(16, 32, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


INPUT = (torch.randn(1, 3, 32, 32),)


@pytest.fixture(scope="module")
def tiny_profile():  # type: ignore[no-untyped-def]
    return profile_model(Tiny().eval(), INPUT, None, "tiny")


def _sweep(specs: list[SweepLayer], device: DeviceFeatures, agent: str) -> list[LayerSample]:
    done, _ = run_sweep([x.spec for x in specs], 2, 120.0)
    return [
        LayerSample(specs[int(i)].spec, device, s, agent, specs[int(i)].group, host_s=s)
        for i, s in done
    ]


@pytest.fixture(scope="module")
def swept(tiny_profile):  # type: ignore[no-untyped-def]
    """A real sweep on this host, unpaced and paced as a device three times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layers = sweep_layers(sweep_set(seed=1, scale=0.3), {"tiny": model_layers(tiny_profile)})
        rate = measure_gflops(0.2, threads=1)
        host = _sweep(layers, DeviceFeatures(rate, 2 << 30), "host")
        plan = pacing.PacePlan(rate / 3, rate, 1, 1 << 30)
        pacer = pacing.Pacer(plan)
        pacing.install(pacer)
        try:
            slow_rate = pacer.measure_gflops(0.2)
            slow = _sweep(layers, DeviceFeatures(slow_rate, 1 << 30), "slow")
        finally:
            pacing.install(None)
    finally:
        torch.set_num_threads(previous)
    # the timed baseline of a layer is its time on the host (scaled by the rates)
    on_host = {s.spec: s.seconds for s in host}
    slow = [dataclasses.replace(s, host_s=on_host.get(s.spec)) for s in slow]
    return rate, host + [s for s in slow if s.host_s is not None]


# -- features ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        LayerSpec("conv2d", 16, 14, 14, 32, 3, 1, 1),
        LayerSpec("conv2d", 32, 15, 15, 32, 3, 2, 1, 32),  # depthwise, strided
        LayerSpec("conv2d", 24, 7, 7, 48, 1),
        LayerSpec("linear", 64, 16, 1, 128),
        LayerSpec("batchnorm", 8, 10, 10),
        LayerSpec("add", 8, 10, 10),
    ],
)
def test_counted_flops_are_the_profiles_count(spec: LayerSpec) -> None:
    fn, args = build(spec)

    class Layer(nn.Module):
        def forward(self, *xs: Tensor) -> Tensor:
            return fn(*xs)

    assert counted_flops(spec) == count_flops(Layer(), args)


def test_graph_nodes_become_the_layers_they_compute(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    nodes = [x for seg in segment_layers(tiny_profile) for x in seg]
    specs = [spec for _, spec in nodes]
    assert specs == [
        LayerSpec("conv2d", 3, 32, 32, 16, 3, 2, 1),
        LayerSpec("batchnorm", 16, 16, 16),
        LayerSpec("hardtanh", 16, 16, 16),
        LayerSpec("conv2d", 16, 16, 16, 16, 3, 1, 1, 16),
        LayerSpec("conv2d", 16, 16, 16, 32, 1),
        LayerSpec("relu", 32, 16, 16),
        LayerSpec("maxpool2d", 32, 16, 16, 0, 2, 2),
        LayerSpec("gavgpool", 32, 8, 8),
        None,  # flatten: not modelled, keeps its timed price
        LayerSpec("linear", 32, 1, 1, 10),
    ]
    assert [kind(s) for s in specs if s is not None][:5] == [
        "conv", "norm", "eltwise", "depthwise", "pointwise"
    ]  # fmt: skip
    counted = sum(counted_flops(s) for s in specs if s is not None)
    assert counted == tiny_profile.total_flops


def test_the_default_sweep_is_seeded_and_covers_every_kind() -> None:
    first, again = sweep_set(0), sweep_set(0)
    assert first == again and first != sweep_set(1)
    assert {kind(s) for s in first} == set(learned.KINDS)
    assert any(max(s.h, s.w) <= 10 for s in first)  # tile-sized inputs too


# -- training and holdout --------------------------------------------------------------------
def test_trained_trees_fit_the_sweep_better_than_flops_over_the_rate(swept) -> None:  # type: ignore[no-untyped-def]
    _, samples = swept
    est = LearnedEstimator().fit(samples)
    pred = est.predict_s([(s.spec, s.device) for s in samples])
    learned_err = sorted(rel_error(p, s.seconds) for p, s in zip(pred, samples, strict=True))
    analytic_err = sorted(
        rel_error(learned.analytic_s(s.spec, s.device), s.seconds) for s in samples
    )
    assert learned_err[len(samples) // 2] < analytic_err[len(samples) // 2]
    # the DP's callable: a block of layers on a cost-model device, summed
    first = samples[0]
    dev = Device("x", first.device.gflops, first.device.memory_bytes, 1e8, 1e-3)
    block = [first.spec, LayerSpec("relu", 8, 4, 4)]
    each = est.predict_s([(spec, first.device) for spec in block])
    assert est.compute_s(block, dev) == pytest.approx(sum(each))
    assert est.compute_s(first.spec, dev) == pytest.approx(pred[0])


def test_the_holdout_scores_each_sample_with_trees_that_never_saw_its_group(swept) -> None:  # type: ignore[no-untyped-def]
    reference, samples = swept
    # poison one group: its layers 1000x slower than they ran. Trees trained on it would
    # predict it closely; held out, they predict what the other groups taught them
    target = samples[0].group
    poisoned = [
        dataclasses.replace(s, seconds=s.seconds * 1000) if s.group == target else s
        for s in samples
    ]
    result = holdout(poisoned, reference)
    assert result.overall.learned.n == len(samples)  # every sample scored once
    scored = [p for p in result.predictions if p.sample.group == target]
    assert scored and all(rel_error(p.learned, p.sample.seconds) > 0.9 for p in scored)
    assert [r.name for r in result.models] == ["model:tiny"]


def test_the_choice_takes_learned_only_where_it_beat_the_baseline(swept) -> None:  # type: ignore[no-untyped-def]
    reference, samples = swept
    result = holdout(samples, reference)
    rows = {row.name: row for row in result.kinds}
    # FLOPs / rate prices norms and elementwise ops at zero (100 % error); the trees do better
    for name in ("norm", "eltwise"):
        assert rows[name].analytic.p50 == 1.0 and rows[name].learned.p50 < 1.0
    for baseline in ("analytic", "timed"):
        choice = choose(result, baseline)
        assert choice.baseline == baseline
        for row in result.kinds:
            base = row.timed if baseline == "timed" else row.analytic
            assert base is not None
            beat = row.learned.p50 < base.p50 and row.learned.p90 <= base.p90
            assert choice.uses(row.name) == (beat and row.learned.n >= 5)
            assert choice.reasons[row.name].startswith("learned" if beat else baseline)


def _row(name: str, learned_p50: float, base_p50: float, timed: bool = True) -> HoldoutRow:
    def st(p50: float) -> ErrorStats:
        return ErrorStats(20, p50, 2 * p50)

    return HoldoutRow(name, st(learned_p50), st(base_p50), st(base_p50) if timed else None)


def test_the_choice_falls_back_to_analytic_without_timed_figures() -> None:
    rows = [_row("conv", 0.1, 0.3, timed=False), _row("norm", 0.5, 0.2, timed=False)]
    choice = choose(Holdout(rows, [], rows[0], 5))
    assert choice.baseline == "analytic"
    assert choice.learned == frozenset({"conv"})
    assert choice.reasons["pool"].startswith("analytic: no held-out layer")


# -- pricing a model ---------------------------------------------------------------------------
def _pricing(samples: list[LayerSample], profile, reference: float, kinds: set[str], clock=None):  # type: ignore[no-untyped-def]
    choice = Choice(frozenset(kinds), "timed", {})
    node_s = node_seconds(profile, INPUT)
    return LearnedPricing(samples, choice, profile, node_s, reference, 60.0, clock or (lambda: 0.0))


def test_pricing_changes_only_segments_with_chosen_kinds(swept, tiny_profile) -> None:  # type: ignore[no-untyped-def]
    reference, samples = swept
    cost, _ = timed_cost(tiny_profile, INPUT)
    devices = [Device("host", samples[0].device.gflops, 2 << 30, 1e8, 1e-3)]
    unchanged = _pricing(samples, tiny_profile, reference, set()).price(cost, devices)
    assert unchanged.cost == cost and unchanged.learned_share == 0.0
    priced = _pricing(samples, tiny_profile, reference, {"pointwise"}).price(cost, devices)
    layers = segment_layers(tiny_profile)
    for seg, before, after in zip(layers, cost.segments, priced.cost.segments, strict=True):
        has = any(s is not None and kind(s) == "pointwise" for _, s in seg)
        assert (before.flops != after.flops) == has
    assert 0 < priced.learned_share < 1


def test_serving_timings_become_samples_and_a_refit_follows_them(swept, tiny_profile) -> None:  # type: ignore[no-untyped-def]
    reference, samples = swept
    now = [0.0]
    pricing = _pricing(samples, tiny_profile, reference, {"conv"}, clock=lambda: now[0])
    dev = Device("host", samples[0].device.gflops, 2 << 30, 1e8, 1e-3)
    n = len(tiny_profile.segments)
    specs = [s for seg in segment_layers(tiny_profile) for _, s in seg if s is not None]
    before = pricing.estimator.compute_s(specs, dev)
    timings = {"host": {"sha-a": {"stage": 0, "count": 40, "compute_s": 4 * before}}}
    assert pricing.observe(timings, {"sha-a": (0, n)}, {"host": dev}) == 1
    assert pricing.observe(timings, {"sha-a": (0, n)}, {"host": dev}) == 0  # nothing new
    made = pricing.serving[("host", "sha-a")][1]
    assert len(made) == len(specs)
    assert not pricing.due()  # the refit interval has not passed
    now[0] = 61.0
    assert pricing.due()
    pricing.refit()
    assert not pricing.due() and pricing.refits == 1
    assert pricing.estimator.compute_s(specs, dev) > before


# -- the calibration file and the fallback without scikit-learn -----------------------------
def test_the_calibration_file_round_trips_and_refuses_garbage(swept, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reference, samples = swept
    layers = sorted({s.spec for s in samples}, key=repr)
    index = {spec: i for i, spec in enumerate(layers)}
    cal = Calibration(
        [SweepLayer(spec, "g", 0.001) for spec in layers],
        {a: {"gflops": 10.0, "memory_budget_bytes": 1 << 30} for a in ("host", "slow")},
        [(index[s.spec], s.agent, s.seconds) for s in samples],
        reference,
    )
    path = tmp_path / "cal.json"
    cal.save(path)
    again = load(path)
    assert again.samples() == cal.samples()
    data = json.loads(path.read_text())
    data["samples"][0][0] = 10**6  # names no layer
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="malformed"):
        load(path)
    path.write_text("{}")
    with pytest.raises(ConfigError, match="not an edgeslice calibration file"):
        load(path)


def test_without_scikit_learn_the_planner_keeps_the_analytic_model(
    swept, tiny_profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    reference, samples = swept
    layers = sorted({s.spec for s in samples}, key=repr)
    cal = Calibration(
        [SweepLayer(spec, "g") for spec in layers],
        {"host": {"gflops": 10.0, "memory_budget_bytes": 1 << 30}},
        [(i, "host", 0.001) for i in range(len(layers))],
        reference,
    )
    cal.save(tmp_path / "cal.json")
    monkeypatch.setattr(learned, "available", lambda: False)  # as if the extra were missing
    assert load_pricing(tmp_path / "cal.json", tiny_profile, INPUT) is None


# -- the agent's sweep command -------------------------------------------------------------------
def test_sweep_arguments_are_checked() -> None:
    layers, repeats, budget = parse_args({})
    assert layers == sweep_set(0) and repeats == 3 and budget == 30.0
    for bad in ({"repeats": 0}, {"budget_s": -1}, {"layers": [{"op": "warp"}]}, {"layers": 3}):
        with pytest.raises(EdgesliceError):
            parse_args(bad)


def test_a_sweep_stops_when_its_budget_is_spent() -> None:
    ticks = iter(range(1000))
    layers = [LayerSpec("relu", 8, 4, 4)] * 10
    done, elapsed = run_sweep(layers, 1, 3.0, clock=lambda: float(next(ticks)))
    # one second per clock read: started at 0, checks at 1 and 2 run a layer, 3 stops it
    assert [int(i) for i, _ in done] == [0, 1] and elapsed == 4.0
    assert all(s > 0 and math.isfinite(s) for _, s in done)
