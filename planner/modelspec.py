"""Turns a ``--model`` spec string into a loaded torch module plus its example inputs.

A spec is one of:

* a built-in name (``mobilenetv2``, ``resnet18``, ``transformer``);
* ``path/to/file.py:callable`` — the file is imported under a private module name;
* ``package.module:callable`` — imported from ``sys.path``.

The callable takes no arguments and returns either ``(module, example_input)``
(a tensor or a tuple of tensors) or an ``nn.Module`` that carries an
``example_input`` method or attribute. The example input fixes the shapes the
planner profiles and exports with, so it must look like a real request.

The model is served under :func:`broker.modelname.model_name_for_spec` of the spec
(``path/net.py:build`` -> ``build``). A user's callable must build the same weights on
every call (seeded): :func:`load_model` builds twice and refuses it otherwise. Every
failure is one :class:`ConfigError` line naming the spec, the file, the exception and
what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgeslice.broker.modelname import model_name_for_spec, sanitize_model_name
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


sanitize_name = sanitize_model_name  # the naming lives in broker.modelname (client uses it too)


def _help() -> str:
    return _SPEC_HELP.format(builtins=", ".join(sorted(BUILTIN_MODELS)))


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` plus where in user code it was raised."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith("<") and Path(f.filename).resolve() != Path(__file__).resolve()
    ]
    if frames and not isinstance(exc, SyntaxError):  # a SyntaxError names file and line itself
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


def _import_target(spec: str) -> Any:
    """Resolve ``file.py:attr`` or ``pkg.mod:attr`` to the object it names."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        hint = f" (did you mean '{spec}:build'?)" if spec.endswith(".py") else ""
        raise ConfigError(f"model spec {spec!r} is not a built-in model name{hint}; {_help()}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise ConfigError(
                f"model spec {spec!r}: file {str(path)!r} does not exist{where}; "
                "check the path before ':'"
            )
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
                f"model spec {spec!r}: importing {str(path)!r} raised {_describe(exc)}; "
                f"fix the file (`python {path}` shows the full traceback) and try again"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(
                f"model spec {spec!r}: cannot import module {target!r} ({exc}); "
                "check the spelling and that it is installed or on PYTHONPATH"
            ) from exc
        except Exception as exc:
            raise ConfigError(
                f"model spec {spec!r}: importing module {target!r} raised {_describe(exc)}; "
                f"fix the module (`python -c 'import {target}'` shows the full traceback)"
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


def _build(spec: str, factory: Any) -> tuple[nn.Module, tuple[Tensor, ...]]:
    attr = spec.rpartition(":")[2]
    try:
        result = factory()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"model spec {spec!r}: calling {attr}() raised {_describe(exc)}; fix {attr}() "
            "(calling it in Python shows the full traceback) and try again"
        ) from exc
    return _unpack(spec, result)


def _first_difference(a: nn.Module, b: nn.Module) -> str | None:
    """The first state_dict entry (weight or buffer) that differs between two builds."""
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return "its parameter names"
    for key, value in sa.items():
        other = sb[key]
        if not isinstance(value, Tensor) or not isinstance(other, Tensor):
            continue
        if value.shape != other.shape or not torch.equal(value, other):
            return repr(key)
    return None


def load_model(spec: str) -> LoadedModel:
    """Load a model spec (see module docstring); errors are :class:`ConfigError`.

    A user's callable is called twice and the two models' weights compared: a build()
    with unseeded random weights would give the planner, a restarted planner and the
    demo's reference run different models, which shows up much later as wrong outputs.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError(f"empty model spec; {_help()}")
    if spec in BUILTIN_MODELS:  # built from a fixed seed (tests check it)
        module, inputs = BUILTIN_MODELS[spec]()
        return LoadedModel(spec, module.eval(), tuple(inputs))
    factory = _import_target(spec)
    if not callable(factory):
        raise ConfigError(f"model spec {spec!r} names {type(factory).__name__}, not a callable")
    module, inputs = _build(spec, factory)
    again, _ = _build(spec, factory)
    if again is not module:
        differs = _first_difference(module, again)
        if differs is not None:
            attr = spec.rpartition(":")[2]
            raise ConfigError(
                f"model spec {spec!r}: {attr}() returns different weights on each call "
                f"({differs} differs); seed it (torch.manual_seed(0) at the top of {attr}()) "
                "so the planner and the demo build the same model"
            )
    name = model_name_for_spec(spec)
    log.info("loaded model spec=%s name=%s inputs=%s", spec, name, [tuple(t.shape) for t in inputs])
    return LoadedModel(name, module.eval(), inputs)
