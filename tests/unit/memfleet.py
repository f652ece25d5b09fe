"""Helpers for the service tests: a tiny model, configs, services run on a MemoryBroker, and
stand-ins for queued jobs.

Not a test module (no ``test_`` prefix); the service tests import it by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeslice.agent.config import AgentConfig
from edgeslice.broker.fleetkey import public_path_for, write_key
from edgeslice.broker.settings import BrokerSettings

SETTINGS = BrokerSettings(host="memory", port=0, namespace="unit")
MLP_SPEC = f"{Path(__file__).resolve()}:build_mlp"


def build_mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A 3-layer MLP: cheap to profile, cut, export and run."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()
    return model, (torch.randn(1, 16),)


def key_file(tmp_path: Path) -> str:
    """The planner's private key file (its fleet.pub is written next to it)."""
    path = tmp_path / "fleet.key"
    if not path.exists():
        write_key(path)
    return str(path)


def public_key_file(tmp_path: Path) -> str:
    """What agents get: the public half of :func:`key_file`."""
    return str(public_path_for(key_file(tmp_path)))


def agent_config(agent_id: str, tmp_path: Path, **changes: object) -> AgentConfig:
    """An agent that calibrates and tests its link quickly and reports often."""
    values: dict[str, object] = {
        "agent_id": agent_id,
        "profile": "x86-laptop",
        "broker": SETTINGS,
        "telemetry_interval": 0.2,
        "cache_dir": str(tmp_path / agent_id),
        "fleet_key_file": public_key_file(tmp_path),
        "calibrate_seconds": 0.05,
        "link_test_bytes": 16 * 1024,
        "drain_timeout_s": 0.5,  # no planner moves requests away in most tests: stop soon
    }
    values.update(changes)
    return AgentConfig(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    run: Callable[[asyncio.Event], Awaitable[None]],
) -> AsyncIterator[asyncio.Task[None]]:
    """Run a service's ``run(stop)`` as a task; on exit set ``stop`` (SIGTERM) and await it."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)


async def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


# -- stand-ins for the data plane's jobs, as agent/batching.py's queue reads them --------
@dataclasses.dataclass
class FakeHeader:
    meta: dict[str, Any]
    stage: int = 0
    plan_id: str = "p"
    plan_version: int = 1
    deadline: float = 0.0


@dataclasses.dataclass
class FakeJob:
    header: Any
    received_at: float = 100.0
    name: str = ""
