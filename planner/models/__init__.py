"""Built-in models (random weights from a fixed seed) used by the demo, tests and benchmarks.

Each entry builds ``(module_in_eval_mode, example_inputs)``; the module files
import torch, this registry does not until a builder is called, so listing the
names (``edgeslice profile --help``) stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor, nn

ModelBuilder = Callable[[], "tuple[nn.Module, tuple[Tensor, ...]]"]


def _lazy(module: str, attr: str) -> ModelBuilder:
    """A builder that imports its model module (and torch) only when called."""

    def build() -> tuple[nn.Module, tuple[Tensor, ...]]:
        builder = getattr(importlib.import_module(f".{module}", __package__), attr)
        result: tuple[nn.Module, tuple[Tensor, ...]] = builder()
        return result

    build.__name__ = attr
    build.__doc__ = f"Build the built-in model via edgeslice.planner.models.{module}.{attr}()."
    return build


BUILTIN_MODELS: dict[str, ModelBuilder] = {
    "mobilenetv2": _lazy("mobilenetv2", "build_mobilenetv2"),
    "resnet18": _lazy("resnet", "build_resnet18"),
    "transformer": _lazy("transformer", "build_transformer"),
    "vgg": _lazy("vgg", "build_vgg"),
}
