"""Stage artifacts: a model cut into signed stages and chained gives the model's answer."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslice.agent.runtime import StageRuntime
from edgeslice.broker.fleetkey import generate_key
from edgeslice.broker.protocol.artifacts import open_sealed
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.models.mobilenetv2 import build_mobilenetv2
from edgeslice.planner.models.resnet import build_resnet18
from edgeslice.planner.models.transformer import build_transformer
from edgeslice.planner.modelspec import load_model
from edgeslice.planner.profile import profile_model
from edgeslice.planner.stages import build_stages

KEY = generate_key()
PUBLIC = KEY.public_key()
BRANCHY = Path(__file__).resolve().parents[2] / "examples" / "branchy_model.py"


def _branchy() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    loaded = load_model(f"{BRANCHY}:build")
    return loaded.module, loaded.example_inputs


def _chain(artifacts, inputs) -> list[torch.Tensor]:
    runtime = StageRuntime()
    values = list(inputs)
    for artifact in artifacts:
        values = runtime.load(artifact.data, PUBLIC).run(values)
    return values


@pytest.mark.parametrize(
    ("build", "stages"),
    [
        (lambda: build_mobilenetv2(64), 3),
        (lambda: build_resnet18(64), 4),
        (lambda: build_transformer(32), 2),
        (_branchy, 4),
    ],
    ids=["mobilenetv2", "resnet18", "transformer", "branchy"],
)
def test_chained_stages_equal_the_whole_model(build, stages: int) -> None:
    model, inputs = build()
    profile = profile_model(model, inputs, max_segments=16)
    n = len(profile.segments)
    bounds = sorted({0, n} | {round(n * k / stages) for k in range(1, stages)})
    artifacts = build_stages(model, inputs, profile, bounds, KEY)
    assert len(artifacts) == stages
    assert all(a.batchable for a in artifacts)  # dynamic dim 0 (tests/unit/test_batching.py)
    with torch.no_grad():
        expected = model(*inputs)
    (got,) = _chain(artifacts, inputs)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    # What one stage emits is exactly what the next one expects.
    for a, b in itertools.pairwise(artifacts):
        assert a.output_specs == b.input_specs
        assert a.end_segment == b.start_segment
    assert [s.shape for s in artifacts[0].input_specs] == [tuple(t.shape) for t in inputs]
    assert artifacts[-1].output_specs[0].shape == tuple(expected.shape)
    assert sum(a.param_bytes for a in artifacts) >= sum(p.numel() * 4 for p in model.parameters())


@pytest.fixture(scope="module")
def branchy_profile():
    model, inputs = _branchy()
    return model, inputs, profile_model(model, inputs, name="branchy")


def test_two_model_inputs_and_several_crossing_tensors(branchy_profile) -> None:
    model, inputs, profile = branchy_profile
    n = len(profile.segments)
    # Cut where the metadata input is still waiting: the second stage takes two tensors.
    cut = next(s.index + 1 for s in profile.segments if len(s.outputs) == 2)
    artifacts = build_stages(model, inputs, profile, [0, cut, n], KEY)
    assert [s.name for s in artifacts[0].input_specs] == ["image", "meta"]
    assert len(artifacts[1].input_specs) == 2
    with torch.no_grad():
        assert torch.allclose(_chain(artifacts, inputs)[0], model(*inputs))


def test_artifacts_are_signed_and_describe_themselves(branchy_profile) -> None:
    model, inputs, profile = branchy_profile
    n = len(profile.segments)
    (artifact,) = build_stages(model, inputs, profile, [0, n], KEY)
    meta, body = open_sealed(artifact.data, PUBLIC)
    assert meta["model"] == "branchy" and meta["index"] == 0
    assert (meta["start_segment"], meta["end_segment"]) == (0, n)
    assert meta["batchable"] is True
    assert body[:2] == b"PK"  # a torch.export.save zip archive
    assert artifact.size == len(artifact.data)


def test_zlib_compression_is_smaller_and_still_loads(branchy_profile) -> None:
    model, inputs, profile = branchy_profile
    n = len(profile.segments)
    plain = build_stages(model, inputs, profile, [0, n // 2, n], KEY)
    packed = build_stages(model, inputs, profile, [0, n // 2, n], KEY, compression="zlib")
    assert sum(a.size for a in packed) < sum(a.size for a in plain)
    with torch.no_grad():
        assert torch.allclose(_chain(packed, inputs)[0], model(*inputs))


def test_rebuilding_the_same_cut_gives_the_same_artifact(branchy_profile) -> None:
    model, inputs, profile = branchy_profile
    n = len(profile.segments)
    first = build_stages(model, inputs, profile, [0, 3, n], KEY)
    second = build_stages(model, inputs, profile, [0, 3, n], KEY)
    assert [a.sha256 for a in first] == [a.sha256 for a in second]


@pytest.mark.parametrize("bounds", [[0], [1, 5], [0, 3, 3, -1], [0, 4, 2, -1], [0, 999]])
def test_bad_boundaries_are_refused(branchy_profile, bounds: list[int]) -> None:
    model, inputs, profile = branchy_profile
    n = len(profile.segments)
    bounds = [n if b == -1 else b for b in bounds]
    with pytest.raises(PlanningError, match="boundaries"):
        build_stages(model, inputs, profile, bounds, KEY)


def test_unknown_compression_is_refused(branchy_profile) -> None:
    model, inputs, profile = branchy_profile
    with pytest.raises(PlanningError, match="compression"):
        build_stages(model, inputs, profile, [0, len(profile.segments)], KEY, compression="lz9")
