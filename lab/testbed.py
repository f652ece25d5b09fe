"""Emulated device fleets: a TOML fleet file -> broker + shaped links + cgroup-limited agents.

One description serves users (``edgeslice testbed up --fleet FILE`` / ``down``) and the
benchmarks (the :class:`Testbed` API). A fleet file::

    namespace = "bench"            # optional
    broker = "mqtt://host:1883"    # optional: default starts a local broker

    [[agents]]
    profile = "rpi4-4gb"
    count = 4
    link = "profile"               # the profile's typical link (default), "none", or
                                   # { bandwidth_mbit = 20, latency_ms = 5, loss_pct = 0.1 }
    emulate = true                 # cgroup CPU/memory limits from the profile (default)

Every process (broker, one ``broker.linkem`` proxy per shaped agent, agents, a planner)
is a real process in its own process group; ``up`` writes their pids to a state file so
``down`` can stop them from another shell, then removes the agents' cgroups.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslice.agent.limits import remove_agent_cgroups
from edgeslice.broker.protocol.errors import ConfigError, EdgesliceError
from edgeslice.firmware_profiles import load_profile, profile_to_dict
from edgeslice.lab.fleet import AgentSpec, LocalFleet

_ALLOWED = {"profile", "count", "link", "emulate", "id_prefix"}


@dataclass(frozen=True)
class LinkShape:
    """A link to emulate between one agent and the broker (one-way latency)."""

    bandwidth_mbit: float
    latency_ms: float
    loss_pct: float = 0.0

    def args(self) -> list[str]:
        return [
            "--bandwidth-mbit",
            str(self.bandwidth_mbit),
            "--latency-ms",
            str(self.latency_ms),
            "--loss-pct",
            str(self.loss_pct),
        ]


@dataclass(frozen=True)
class TestbedAgent:
    agent_id: str
    profile: str
    link: LinkShape | None
    emulate: bool


@dataclass(frozen=True)
class FleetSpec:
    agents: tuple[TestbedAgent, ...]
    namespace: str = "testbed"
    broker_url: str | None = None
    source: str = "<dict>"


def _link(value: Any, profile: str, where: str) -> LinkShape | None:
    if value in (None, "profile"):
        link = profile_to_dict(load_profile(profile))["link"]
        return LinkShape(
            float(link["bandwidth_mbit"]),
            float(link["latency_ms"]),
            float(link.get("loss_pct", 0.0)),
        )
    if value == "none":
        return None
    if isinstance(value, dict):
        try:
            return LinkShape(
                float(value["bandwidth_mbit"]),
                float(value.get("latency_ms", 0.0)),
                float(value.get("loss_pct", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{where}: link needs bandwidth_mbit (and optionally latency_ms, loss_pct): {exc}"
            ) from None
    raise ConfigError(f'{where}: link must be "profile", "none" or a table, got {value!r}')


def parse_fleet(data: dict[str, Any], source: str = "<dict>") -> FleetSpec:
    """Validate a fleet description; ConfigError names the file and the entry."""
    entries = data.get("agents")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: needs at least one [[agents]] table")
    agents: list[TestbedAgent] = []
    for i, entry in enumerate(entries):
        where = f"{source}: agents[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(entry) - _ALLOWED
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {sorted(unknown)}; known {sorted(_ALLOWED)}"
            )
        profile = entry.get("profile")
        if not isinstance(profile, str):
            raise ConfigError(f"{where}: profile (a firmware profile name) is required")
        try:
            load_profile(profile)
        except EdgesliceError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        count = entry.get("count", 1)
        if not isinstance(count, int) or not 1 <= count <= 64:
            raise ConfigError(f"{where}: count must be an integer 1..64, got {count!r}")
        link = _link(entry.get("link"), profile, where)
        emulate = entry.get("emulate", True)
        if not isinstance(emulate, bool):
            raise ConfigError(f"{where}: emulate must be true or false")
        prefix = str(entry.get("id_prefix", profile))
        for _ in range(count):
            agents.append(TestbedAgent(f"{prefix}-{len(agents) + 1}", profile, link, emulate))
    namespace = data.get("namespace", "testbed")
    broker = data.get("broker")
    if broker is not None and not isinstance(broker, str):
        raise ConfigError(f"{source}: broker must be a URL string")
    return FleetSpec(tuple(agents), str(namespace), broker, source)


def load_fleet_file(path: str) -> FleetSpec:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"fleet file {path!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"fleet file {path!r} is not valid TOML: {exc}") from None
    return parse_fleet(data, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise EdgesliceError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@dataclass
class Testbed:
    """A running emulated fleet (see the module docstring)."""

    spec: FleetSpec
    workdir: str
    fleet: LocalFleet | None = None
    broker_url: str = ""
    agents: list[str] = field(default_factory=list)

    def up(self) -> Testbed:
        url = self.spec.broker_url
        if url is None:
            port = _free_port()
            self.fleet = LocalFleet(f"mqtt://127.0.0.1:{port}", self.spec.namespace, self.workdir)
            self.fleet.spawn("broker", ["broker", "--port", str(port)])
            _wait_port(port, 15, "the testbed broker")
            url = f"mqtt://127.0.0.1:{port}"
        else:
            self.fleet = LocalFleet(url, self.spec.namespace, self.workdir)
        self.broker_url = url
        self.fleet.ensure_key()
        for agent in self.spec.agents:
            self.add_agent(agent)
        return self

    def add_agent(self, agent: TestbedAgent) -> None:
        """Start one agent (behind its own shaped link when it has one)."""
        assert self.fleet is not None
        target = self.broker_url.removeprefix("mqtt://")
        extra: list[str] = ["--calibrate-seconds", "0.5"]
        if agent.emulate:
            extra.append("--emulate")
        if agent.link is not None:
            port = _free_port()
            self.fleet.spawn_module(
                f"link-{agent.agent_id}",
                "edgeslice.lab.linkem",
                ["--listen-port", str(port), "--target", target, *agent.link.args()],
            )
            _wait_port(port, 15, f"the link proxy of {agent.agent_id}")
            extra += ["--broker", f"mqtt://127.0.0.1:{port}"]
        self.fleet.start_agent(AgentSpec(agent.agent_id, agent.profile, tuple(extra)))
        self.agents.append(agent.agent_id)

    def state(self) -> dict[str, Any]:
        assert self.fleet is not None
        return {
            "namespace": self.spec.namespace,
            "broker": self.broker_url,
            "workdir": self.workdir,
            "fleet_key_file": self.fleet.fleet_key_file,
            "agents": self.agents,
            "processes": {n: p.pid for n, p in self.fleet.procs.items() if p.poll() is None},
        }

    def down(self) -> list[str]:
        """Stop every process and remove the agents' cgroups; what could not be removed."""
        if self.fleet is not None:
            self.fleet.close()
        return remove_cgroups(self.agents)


def remove_cgroups(agent_ids: list[str]) -> list[str]:
    """Remove these agents' cgroups; what could not be removed. Other fleets' cgroups are
    left alone."""
    return [left for agent_id in agent_ids for left in remove_agent_cgroups(agent_id)]


def down_from_state(path: str, timeout: float = 15.0) -> list[str]:
    """Stop what ``up`` recorded in ``path``; leftovers (pids, cgroups) that survived."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no testbed state at {path!r}: is a testbed up?") from None
    pids = [int(pid) for name, pid in state.get("processes", {}).items() if name != "broker"]
    broker = state.get("processes", {}).get("broker")
    left: list[str] = []
    for group in (pids, [int(broker)] if broker else []):  # the broker goes last
        for pid in group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in group):
            time.sleep(0.1)
        for pid in group:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
    time.sleep(0.2)
    left += [f"pid {p}" for p in [*pids, *([int(broker)] if broker else [])] if _alive(p)]
    left += remove_cgroups([str(a) for a in state.get("agents", [])])
    Path(path).unlink(missing_ok=True)
    return left


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    return True


async def wait_for_agents(
    url: str, namespace: str, agent_ids: list[str], timeout: float = 120.0
) -> dict[str, Any]:
    """Each agent's retained ``info`` once all have announced themselves (current session)."""

    from edgeslice.broker.client import MqttClient
    from edgeslice.broker.fleetstate import FleetState
    from edgeslice.broker.protocol.messages import Info
    from edgeslice.broker.protocol.topics import Topics
    from edgeslice.broker.settings import parse_broker_url

    settings = parse_broker_url(url, namespace)
    topics = Topics(namespace)
    client = MqttClient(settings, client_id=f"testbed-{os.getpid()}")
    await client.connect()
    fleet = FleetState(topics)
    try:
        await client.subscribe(topics.all_agents("status"))
        await client.subscribe(topics.all_agents("info"))
        deadline = time.monotonic() + timeout
        while not all(a in fleet.agents and fleet.agents[a].usable for a in agent_ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [a for a in agent_ids if a not in fleet.usable_ids()]
                raise EdgesliceError(
                    f"agents {missing} did not announce themselves within "
                    f"{timeout:.0f}s; see the logs in the testbed workdir"
                )
            msg = await client.next_message(timeout=min(remaining, 1.0))
            if msg is not None:
                fleet.apply(msg.topic, msg.payload, time.time())
        infos: dict[str, Info] = {}
        for agent_id in agent_ids:
            info = fleet.agents[agent_id].info
            assert info is not None  # usable implies an info
            infos[agent_id] = info
        return infos
    finally:
        await client.close()
