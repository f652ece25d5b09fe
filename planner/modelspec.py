"""Turns a ``--model`` spec string into a loaded torch module plus its example inputs.

A spec is one of:

* a built-in name (``mobilenetv2``, ``resnet18``, ``transformer``);
* ``path/to/file.py:callable`` — the file is imported under a private module name;
* ``package.module:callable`` — imported from ``sys.path``.

The callable takes no arguments and returns either ``(module, example_input)``
(a tensor or a tuple of tensors) or an ``nn.Module`` that carries an
``example_input`` method or attribute. The example input fixes the shapes the
planner profiles and exports with, so it must look like a real request.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.planner.models import BUILTIN_MODELS

log = logging.getLogger(__name__)

_SPEC_HELP = (
    "use a built-in name ({builtins}), 'path/to/file.py:callable' or 'package.module:callable'"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to profile: topic-safe ``name``, module in eval mode, example inputs."""

    name: str
    module: nn.Module
    example_inputs: tuple[Tensor, ...]


def sanitize_name(raw: str) -> str:
    """A topic-safe model id: lowercase letters, digits, ``-`` and ``_`` only."""
    name = re.sub(r"[^a-z0-9_-]+", "-", raw.lower()).strip("-_")
    return name or "model"


def _help() -> str:
    return _SPEC_HELP.format(builtins=", ".join(sorted(BUILTIN_MODELS)))


def _import_target(spec: str) -> Any:
    """Resolve ``file.py:attr`` or ``pkg.mod:attr`` to the object it names."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"model spec {spec!r} is not a built-in model name; {_help()}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"model spec {spec!r}: file {str(path)!r} does not exist")
        module_name = "_edgeslice_user_" + sanitize_name(path.stem).replace("-", "_")
        file_spec = importlib.util.spec_from_file_location(module_name, path)
        if file_spec is None or file_spec.loader is None:
            raise ConfigError(f"model spec {spec!r}: cannot import {str(path)!r} as Python")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise ConfigError(
                f"model spec {spec!r}: importing {str(path)!r} failed: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(
                f"model spec {spec!r}: cannot import module {target!r} ({exc}); "
                "check the spelling and that it is installed or on PYTHONPATH"
            ) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"model spec {spec!r}: {target!r} has no attribute {attr!r}") from None


def _as_inputs(spec: str, example: Any) -> tuple[Tensor, ...]:
    if isinstance(example, Tensor):
        return (example,)
    is_seq = isinstance(example, list | tuple) and len(example) > 0
    if is_seq and all(isinstance(t, Tensor) for t in example):
        return tuple(example)
    raise ConfigError(
        f"model spec {spec!r}: the example input must be a tensor or a tuple of tensors, "
        f"got {type(example).__name__}"
    )


def _unpack(spec: str, result: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Accept ``(module, example)`` or a module with ``example_input``."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result[0], _as_inputs(spec, result[1])
    if isinstance(result, nn.Module):
        example = getattr(result, "example_input", None)
        if example is None:
            raise ConfigError(
                f"model spec {spec!r} returned an nn.Module without an example input; "
                "return a (module, example_input) tuple, or give the module an "
                "example_input() method or attribute"
            )
        if callable(example) and not isinstance(example, Tensor):
            example = example()
        return result, _as_inputs(spec, example)
    raise ConfigError(
        f"model spec {spec!r} returned {type(result).__name__}; expected an nn.Module or a "
        "(module, example_input) tuple"
    )


def load_model(spec: str) -> LoadedModel:
    """Load a model spec (see module docstring); errors are :class:`ConfigError`."""
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"empty model spec; {_help()}")
    if spec in BUILTIN_MODELS:
        module, inputs = BUILTIN_MODELS[spec]()
        return LoadedModel(spec, module.eval(), tuple(inputs))
    factory = _import_target(spec)
    if not callable(factory):
        raise ConfigError(f"model spec {spec!r} names {type(factory).__name__}, not a callable")
    try:
        result = factory()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"model spec {spec!r}: calling it raised {type(exc).__name__}: {exc}"
        ) from exc
    module, inputs = _unpack(spec, result)
    name = sanitize_name(getattr(factory, "__name__", spec.rpartition(":")[2]))
    log.info("loaded model spec=%s name=%s inputs=%s", spec, name, [tuple(t.shape) for t in inputs])
    return LoadedModel(name, module.eval(), inputs)
