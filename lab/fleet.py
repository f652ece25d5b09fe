"""Starts local fleets as real processes through the CLI: for the demo, tests and benchmarks.

Every process is ``python -m edgeslice.lab.cli ...`` exactly as a user would start it, run
by :class:`lab.supervisor.Supervised` (own process group, log file in the fleet's workdir,
SIGTERM then SIGKILL); :class:`LocalFleet` names them and stops them all on ``close()`` so
nothing is left behind. ``detached=True`` fleets (``edgeslice testbed up``) outlive the
process that started them and are stopped later, by the pids ``testbed up`` recorded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeslice.agent.cgroupclean import remove_agent_cgroups
from edgeslice.agent.limits import group_name
from edgeslice.broker.protocol.errors import EdgesliceError
from edgeslice.lab.supervisor import Ready, Supervised, stop_all


@dataclass(frozen=True)
class AgentSpec:
    """One agent to start: its id, firmware profile and any extra CLI flags."""

    agent_id: str
    profile: str = "x86-laptop"
    extra: tuple[str, ...] = ()


class LocalFleet:
    """Processes of one local fleet sharing a broker URL, namespace, fleet key and log dir."""

    def __init__(
        self,
        broker_url: str,
        namespace: str = "edgeslice",
        workdir: str | None = None,
        fleet_key_file: str | None = None,
        threads_per_agent: int | None = 1,
        detached: bool = False,
        on_start: Callable[[str, Supervised], None] | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.namespace = namespace
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgeslice-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fleet_key_file = fleet_key_file or str(self.workdir / "fleet.key")
        self.threads_per_agent = threads_per_agent
        self.detached = detached
        self.on_start = on_start  # called as soon as a process is started (testbed state)
        self.procs: dict[str, Supervised] = {}
        self.agent_ids: list[str] = []  # every agent started, for the cgroup clean-up
        self.extra_env: dict[str, str] = {}  # set for every process started after it is set

    @property
    def public_key_file(self) -> str:
        """The public half of the fleet key (what agents get): ``fleet.pub`` next to it."""
        from edgeslice.broker.fleetkey import public_path_for

        return str(public_path_for(self.fleet_key_file))

    def ensure_key(self) -> str:
        """Create the fleet key pair (private key file and .pub) if it does not exist yet."""
        if not os.path.exists(self.fleet_key_file):
            from edgeslice.broker.fleetkey import write_key

            write_key(self.fleet_key_file)
        return self.fleet_key_file

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["EDGESLICE_BROKER"] = self.broker_url
        env["EDGESLICE_NAMESPACE"] = self.namespace
        env["EDGESLICE_FLEET_KEY_FILE"] = self.public_key_file  # the planner gets its flag
        env.pop("EDGESLICE_FLEET_KEY", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        verbose: bool = True,
        ready: Ready = None,
        timeout: float = 15.0,
    ) -> Supervised:
        """Start ``edgeslice <args>`` as process ``name`` (a name may be reused after stop)."""
        args = [*(["-v"] if verbose else []), *args]
        return self.spawn_module(name, "edgeslice.lab.cli", args, ready, timeout)

    def spawn_module(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        ready: Ready = None,
        timeout: float = 15.0,
    ) -> Supervised:
        """Start ``python -m module args`` as process ``name``; wait for ``ready`` if given."""
        if self.alive(name):
            raise EdgesliceError(f"fleet process {name!r} is already running")
        cmd = [sys.executable, "-m", module, *args]
        child = Supervised(name, cmd, self.log_path(name), env=self.env(), detached=self.detached)
        self.procs[name] = child
        child.spawn()
        if self.on_start is not None:
            self.on_start(name, child)
        child.wait_ready(ready, timeout)
        return child

    def start_agent(self, spec: AgentSpec) -> Supervised:
        args = [
            "agent",
            "--id",
            spec.agent_id,
            "--profile",
            spec.profile,
            "--cache-dir",
            str(self.workdir / "cache" / spec.agent_id),
            "--telemetry-interval",
            "1",
        ]
        if self.threads_per_agent:
            args += ["--threads", str(self.threads_per_agent)]
        if spec.agent_id not in self.agent_ids:
            self.agent_ids.append(spec.agent_id)
        return self.spawn(spec.agent_id, [*args, *spec.extra])

    def start_planner(self, model: str, extra: Sequence[str] = ()) -> Supervised:
        self.ensure_key()
        args = ["planner", "--fleet-key-file", self.fleet_key_file, "--model", model]
        return self.spawn("planner", [*args, *extra])

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to process ``name``'s whole process group."""
        self.procs[name].signal(sig)

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGTERM ``name`` and wait; SIGKILL if it does not exit. Its exit code."""
        child = self.procs.get(name)
        return child.stop(grace=timeout) if child is not None else None

    def alive(self, name: str) -> bool:
        child = self.procs.get(name)
        return child is not None and child.is_running()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop every process in tiers: planner and agents, then link proxies, then the
        broker, so agents can still publish their offline status on the way out."""

        def tier(name: str) -> int:
            return 2 if name == "broker" else 1 if name.startswith("link-") else 0

        for level in (0, 1, 2):
            stop_all([c for n, c in self.procs.items() if tier(n) == level], grace=15.0)
        # an agent that was killed (kill -9 in a fault test, or SIGKILL after the grace)
        # could not remove its emulation cgroups itself; empty ones go now
        for agent_id in self.agent_ids:
            remove_agent_cgroups(group_name(self.namespace, agent_id))

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
