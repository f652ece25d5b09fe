"""Owns the agent's ``sweep`` command: time a list of layers on this device's stage path.

``edgeslice calibrate`` (planner/calibrate.py) sends ``cmd/sweep`` with the layer
configurations to time (:class:`~broker.layerspec.LayerSpec` maps; none: the default
:func:`~broker.layerspec.sweep_set`), how many timed repeats each gets and a time budget.
The agent times them one by one on its stage worker thread, between requests, like a
stage, and through the installed pacer when it emulates a board (agent/pacing.py), so an
emulated rpi4 is timed as the rpi4 it pretends to be, not as this host. Each layer is its
median of ``repeats`` runs after a warm-up; the sweep stops when the budget is spent and
says how far it got. The reply carries ``[index, seconds]`` pairs against the request's
list, plus what the model needs to know about the device that ran them.

A sweep holds the stage worker for up to ``budget_s``: requests queue meanwhile. It is a
calibration step, meant for a fleet that is not serving yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

from edgeslice.agent import pacing
from edgeslice.broker.layerrun import time_layer
from edgeslice.broker.layerspec import LayerSpec, sweep_set
from edgeslice.broker.protocol.errors import EdgesliceError

log = logging.getLogger(__name__)

MAX_LAYERS = 2000
MAX_BUDGET_S = 600.0
DEFAULT_BUDGET_S = 30.0
DEFAULT_REPEATS = 3


def parse_args(args: Mapping[str, Any]) -> tuple[list[LayerSpec], int, float]:
    """(layers, repeats, budget seconds) from a ``sweep`` command's args; EdgesliceError."""
    try:
        raw = args.get("layers")
        if raw is None:
            layers = sweep_set(int(args.get("seed", 0)))
        elif isinstance(raw, list) and len(raw) <= MAX_LAYERS:
            layers = [LayerSpec.from_wire(x) for x in raw]
        else:
            raise ValueError(f"layers must be a list of at most {MAX_LAYERS} layer specs")
        repeats = int(args.get("repeats", DEFAULT_REPEATS))
        budget = float(args.get("budget_s", DEFAULT_BUDGET_S))
    except (TypeError, ValueError) as exc:
        raise EdgesliceError(f"sweep: {exc}") from exc
    if not 1 <= repeats <= 20 or not 0 < budget <= MAX_BUDGET_S:
        raise EdgesliceError(
            f"sweep: repeats must be 1..20 and budget_s in (0, {MAX_BUDGET_S:.0f}]"
        )
    return layers, repeats, budget


def run_sweep(
    layers: Sequence[LayerSpec],
    repeats: int,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[list[float]], float]:
    """Time ``layers`` in order until the budget is spent (blocking: the stage thread).

    Returns ``([[index, seconds], ...], elapsed)``; a layer that fails to run is skipped
    (logged), so one odd configuration does not void the sweep.
    """
    pacer = pacing.current()
    runner = pacer.run if pacer is not None else None
    started = clock()
    done: list[list[float]] = []
    for index, spec in enumerate(layers):
        if clock() - started >= budget_s:
            break
        try:
            done.append([index, time_layer(spec, repeats, runner)])
        except Exception as exc:  # an unbuildable layer: skip it, say so
            log.warning("sweep layer %d (%s) failed: %s", index, spec, exc)
    return done, clock() - started


async def sweep_command(
    agent_id: str, args: Mapping[str, Any], executor: Executor, device: Mapping[str, Any]
) -> dict[str, Any]:
    """Run a sweep on ``executor`` (the stage worker) and build the command's result."""
    layers, repeats, budget = parse_args(args)
    log.info(
        "agent=%s sweep: %d layers x %d repeats, budget %.0f s",
        agent_id,
        len(layers),
        repeats,
        budget,
    )
    loop = asyncio.get_running_loop()
    done, elapsed = await loop.run_in_executor(executor, run_sweep, layers, repeats, budget)
    log.info(
        "agent=%s sweep: timed %d/%d layers in %.1f s", agent_id, len(done), len(layers), elapsed
    )
    pacer = pacing.current()
    return {
        "samples": done,
        "layers": len(layers),
        "repeats": repeats,
        "elapsed_s": elapsed,
        "paced": pacer is not None,
        **device,
    }
