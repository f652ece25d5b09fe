"""The agent's frozen configuration: CLI flags > EDGESLICE_* env vars > config file > defaults.

Click applies the first two; ``--config FILE`` (TOML, keys named like the
long options with ``_`` for ``-``) fills click's ``default_map`` so a file sits
below both. The result is one :class:`AgentConfig` the service takes whole.
"""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.protocol.topics import check_id, sanitize_id
from edgeslice.broker.settings import BrokerSettings


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edgeslice")


def default_agent_id() -> str:
    return sanitize_id(socket.gethostname())


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs to run; built by agent/cli.py or by tests directly."""

    agent_id: str
    profile: str
    broker: BrokerSettings
    telemetry_interval: float = 2.0
    cache_dir: str = ""
    fleet_key_file: str | None = None
    threads: int | None = None  # torch intra-op threads; None = torch's default
    calibrate_seconds: float = 0.5
    memory_budget_mb: int | None = None  # overrides the profile's budget
    max_queue: int = 64  # requests waiting for compute before new ones are refused
    # dynamic batching (agent/batching.py): requests of one stage run together, at most
    # max_batch, waiting at most max_batch_wait_ms for more (0: only what is queued)
    max_batch: int = 8
    max_batch_wait_ms: float = 2.0
    emulate: bool = False
    emulate_mode: str = "paced"  # with emulate: "paced" (agent/pacing.py) or "quota"
    link_test_bytes: int = 256 * 1024
    # test the link again when received transfers slow down for a while (agent/linkwatch.py):
    # the window in seconds that receive rates are taken over (0: only start-up/calibrate)
    link_watch_s: float = 5.0
    # on SIGTERM/SIGINT: keep serving at most this long for the planner to publish a plan
    # without this agent, then refuse new requests and finish the ones held (agent/drain.py)
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        try:
            check_id(self.agent_id)
        except Exception as exc:
            raise ConfigError(f"--id: {exc}") from None
        if self.telemetry_interval <= 0:
            raise ConfigError("--telemetry-interval must be > 0 seconds")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be >= 1")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise ConfigError("--memory-mb must be > 0")
        if self.max_queue < 1:
            raise ConfigError("--max-queue must be >= 1")
        if self.max_batch < 1:
            raise ConfigError("--max-batch must be >= 1 (1 turns batching off)")
        if self.max_batch_wait_ms < 0:
            raise ConfigError("--max-batch-wait-ms must be >= 0")
        if self.emulate_mode not in ("paced", "quota"):
            raise ConfigError(f"--emulate-mode must be paced or quota, got {self.emulate_mode!r}")
        if self.link_watch_s < 0:
            raise ConfigError("--link-watch must be >= 0 seconds (0 turns it off)")
        if self.drain_timeout_s < 0:
            raise ConfigError("--drain-timeout must be >= 0 seconds")

    @property
    def artifact_dir(self) -> str:
        return os.path.join(self.cache_dir or default_cache_dir(), "artifacts")


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML agent config file into click's ``default_map`` form."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path!r}: not valid TOML ({exc})") from None
    section = data.get("agent", data)
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path!r}: [agent] must be a table")
    return {str(k).replace("-", "_"): v for k, v in section.items()}
