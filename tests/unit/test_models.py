"""Built-in models and model specs: what `--model` accepts and what it refuses."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.planner.models import BUILTIN_MODELS
from edgeslice.planner.models.mobilenetv2 import build_mobilenetv2
from edgeslice.planner.models.resnet import build_resnet18
from edgeslice.planner.models.transformer import build_transformer
from edgeslice.planner.modelspec import load_model, sanitize_name

REPO = Path(__file__).resolve().parents[2]
BRANCHY = REPO / "examples" / "branchy_model.py"


@pytest.mark.parametrize(
    ("build", "params", "out_shape"),
    [
        (lambda: build_mobilenetv2(64), 3_504_872, (1, 1000)),
        (lambda: build_resnet18(64), 11_689_512, (1, 1000)),
        (lambda: build_transformer(seq_len=32), 12_750_082, (1, 2)),
    ],
    ids=["mobilenetv2", "resnet18", "transformer"],
)
def test_builtin_models_are_standard_sized_and_deterministic(build, params, out_shape) -> None:
    model, inputs = build()
    again, inputs_again = build()
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == params
    with torch.no_grad():
        out = model(*inputs)
        assert out.shape == out_shape
        assert torch.equal(out, again(*inputs_again))


def test_registry_builds_the_documented_inputs() -> None:
    assert set(BUILTIN_MODELS) == {"mobilenetv2", "resnet18", "transformer", "vgg"}
    _, (ids,) = BUILTIN_MODELS["transformer"]()
    assert ids.dtype == torch.int64 and ids.shape == (1, 128)
    _, (image,) = BUILTIN_MODELS["mobilenetv2"]()
    assert image.shape == (1, 3, 224, 224)


def test_transformer_can_return_hidden_states() -> None:
    model, (ids,) = build_transformer(seq_len=16, pooled=False)
    with torch.no_grad():
        assert model(ids).shape == (1, 16, 256)


def test_builtin_name_loads() -> None:
    loaded = load_model("resnet18")
    assert loaded.name == "resnet18"
    assert loaded.example_inputs[0].shape == (1, 3, 224, 224)


def test_file_spec_loads_the_branchy_example() -> None:
    loaded = load_model(f"{BRANCHY}:build")
    assert loaded.name == "build"
    assert [t.shape for t in loaded.example_inputs] == [(1, 3, 64, 64), (1, 8)]
    with torch.no_grad():
        assert loaded.module(*loaded.example_inputs).shape == (1, 10)


def _write(tmp_path: Path, body: str, name: str = "usermodel.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_module_spec_with_example_input_method(tmp_path, monkeypatch) -> None:
    _write(
        tmp_path,
        """
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)
            def forward(self, x):
                return self.fc(x)
            def example_input(self):
                return torch.ones(1, 4)

        def My_Model():
            torch.manual_seed(0)
            return Tiny()
        """,
        name="es_user_pkg_model.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("es_user_pkg_model:My_Model")
    assert loaded.name == "my_model"
    assert loaded.example_inputs[0].shape == (1, 4)
    assert not loaded.module.training


def test_module_without_example_input_asks_for_a_tuple(tmp_path) -> None:
    path = _write(
        tmp_path,
        """
        from torch import nn
        def build():
            return nn.Linear(4, 2)
        """,
    )
    with pytest.raises(ConfigError, match=r"\(module, example_input\) tuple"):
        load_model(f"{path}:build")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty model spec"),
        ("nosuchmodel", "not a built-in model name"),
        ("/nonexistent/dir/model.py:build", "does not exist"),
        ("es_no_such_module_xyz:build", "cannot import module"),
        ("json:no_such_attr", "has no attribute 'no_such_attr'"),
        ("json:__doc__", "not a callable"),
    ],
)
def test_bad_specs_say_what_to_do(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_model(spec)
    assert repr(spec) in str(info.value) or spec == ""


def test_bad_return_values_are_config_errors(tmp_path) -> None:
    path = _write(
        tmp_path,
        """
        import torch
        from torch import nn
        def not_a_model():
            return 42
        def bad_input():
            return nn.Linear(4, 2), "not a tensor"
        def raises():
            raise RuntimeError("boom")
        """,
    )
    with pytest.raises(ConfigError, match=r"expected an nn\.Module"):
        load_model(f"{path}:not_a_model")
    with pytest.raises(ConfigError, match="tensor or a tuple of tensors"):
        load_model(f"{path}:bad_input")
    with pytest.raises(ConfigError, match="RuntimeError: boom"):
        load_model(f"{path}:raises")


def test_file_that_fails_to_import_is_a_config_error(tmp_path) -> None:
    path = _write(tmp_path, "this is not python\n")
    with pytest.raises(ConfigError, match="importing"):
        load_model(f"{path}:build")


def test_names_are_topic_safe() -> None:
    assert sanitize_name("My Model/v2+x") == "my-model-v2-x"
    assert sanitize_name("###") == "model"
