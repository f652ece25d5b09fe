"""Starts local fleets as real processes through the CLI: for the demo, tests and benchmarks.

Every process is ``python -m broker.cli ...`` exactly as a user would start it, in its own
process group, with its output in a log file; :class:`LocalFleet` remembers them all and
stops them (SIGTERM, then SIGKILL) on ``close()`` so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeslice.broker.protocol.errors import EdgesliceError


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
    ) -> None:
        self.broker_url = broker_url
        self.namespace = namespace
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgeslice-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fleet_key_file = fleet_key_file or str(self.workdir / "fleet.key")
        self.threads_per_agent = threads_per_agent
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def ensure_key(self) -> str:
        """Create the fleet key file if it does not exist yet."""
        if not os.path.exists(self.fleet_key_file):
            from edgeslice.broker.fleetkey import write_key

            write_key(self.fleet_key_file)
        return self.fleet_key_file

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["EDGESLICE_BROKER"] = self.broker_url
        env["EDGESLICE_NAMESPACE"] = self.namespace
        env["EDGESLICE_FLEET_KEY_FILE"] = self.fleet_key_file
        env.pop("EDGESLICE_FLEET_KEY", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def spawn(
        self, name: str, args: Sequence[str], verbose: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start ``edgeslice <args>`` as process ``name`` (a name may be reused after stop)."""
        return self.spawn_module(name, "edgeslice.lab.cli", [*(["-v"] if verbose else []), *args])

    def spawn_module(self, name: str, module: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start ``python -m module args`` (e.g. a ``broker.linkem`` proxy) as process ``name``."""
        if name in self.procs and self.procs[name].poll() is None:
            raise EdgesliceError(f"fleet process {name!r} is already running")
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def start_agent(self, spec: AgentSpec) -> subprocess.Popen[bytes]:
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
        return self.spawn(spec.agent_id, [*args, *spec.extra])

    def start_planner(self, model: str, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        self.ensure_key()
        return self.spawn("planner", ["planner", "--model", model, *extra])

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGTERM ``name`` and wait; SIGKILL if it does not exit. Its exit code."""
        proc = self.procs.get(name)
        if proc is None:
            return None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            self.signal(name, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                continue
        return proc.wait()

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

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
            names = [n for n in self.procs if tier(n) == level]
            deadline = time.monotonic() + 15.0
            for name in names:
                if self.alive(name):
                    self.signal(name, signal.SIGTERM)
            for name in names:
                proc = self.procs[name]
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.signal(name, signal.SIGKILL)
                    proc.wait()

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
