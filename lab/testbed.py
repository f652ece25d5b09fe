"""Emulated device fleets: a TOML fleet file -> broker + shaped links + cgroup-limited agents.

One description serves users (``edgeslice testbed up --fleet FILE`` / ``down``) and the
benchmarks (the :class:`Testbed` API). A fleet file::

    namespace = "bench"            # optional
    broker = "mqtt://host:1883"    # optional: default starts a local broker
    emulate_mode = "paced"         # optional: the default for every [[agents]] table

    [[agents]]
    profile = "rpi4-4gb"
    count = 4
    link = "profile"               # the profile's typical link (default), "none", or
                                   # { bandwidth_mbit = 20, latency_ms = 5, loss_pct = 0.1 }
    emulate = true                 # run at the profile's speed and memory (default)
    emulate_mode = "paced"         # "paced" (default): hold each stage for the device's
                                   # time (agent/pacing.py); "quota": a cgroup CPU quota

Every process (broker, one ``lab.linkem`` proxy per shaped agent, agents, a planner) is a
real process run by :class:`lab.supervisor.Supervised`, detached so it outlives ``testbed
up``. ``up`` rewrites a state file as soon as each process starts, so ``down`` finds even
a partial start from another shell; an error or interrupt during ``up`` stops and removes
everything started so far. ``down`` stops the processes, then removes the agents' cgroups,
waiting (bounded) for the kernel to empty them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeslice.agent.cgroupclean import remove_agent_cgroups
from edgeslice.agent.limits import group_name
from edgeslice.broker.protocol.errors import ConfigError, EdgesliceError
from edgeslice.broker.settings import DEFAULT_NAMESPACE
from edgeslice.firmware_profiles import load_profile, profile_to_dict
from edgeslice.lab.fleet import AgentSpec, LocalFleet
from edgeslice.lab.linkshape import LinkSpec, write_shape_file
from edgeslice.lab.server import free_port
from edgeslice.lab.supervisor import stop_groups

logger = logging.getLogger(__name__)

_ALLOWED = {"profile", "count", "link", "emulate", "emulate_mode", "id_prefix"}
DEFAULT_EMULATE_MODE = "paced"  # no quota bursts: stage times follow the profile (agent/pacing.py)


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
    emulate_mode: str = DEFAULT_EMULATE_MODE


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
        mode = entry.get("emulate_mode", data.get("emulate_mode", DEFAULT_EMULATE_MODE))
        if mode not in ("paced", "quota"):
            raise ConfigError(f'{where}: emulate_mode must be "paced" or "quota", got {mode!r}')
        prefix = str(entry.get("id_prefix", profile))
        for _ in range(count):
            agent_id = f"{prefix}-{len(agents) + 1}"
            agents.append(TestbedAgent(agent_id, profile, link, emulate, mode))
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


@dataclass
class Testbed:
    """A running emulated fleet (see the module docstring)."""

    spec: FleetSpec
    workdir: str
    state_file: str | None = None
    detached: bool = False  # True: processes outlive this one (`testbed up`)
    fleet: LocalFleet | None = None
    broker_url: str = ""
    agents: list[str] = field(default_factory=list)

    def up(self) -> Testbed:
        """Start broker, links and agents; on any error or interrupt, undo it all and re-raise."""
        port = None if self.spec.broker_url else free_port()
        self.broker_url = self.spec.broker_url or f"mqtt://127.0.0.1:{port}"
        self.fleet = LocalFleet(
            self.broker_url,
            self.spec.namespace,
            self.workdir,
            detached=self.detached,
            on_start=lambda _name, _child: self.record(),
        )
        try:
            self.fleet.ensure_key()
            self.share_host_rate()
            self.record()
            if port is not None:
                args = ["broker", "--port", str(port)]
                self.fleet.spawn("broker", args, ready=("127.0.0.1", port), timeout=30)
            for agent in self.spec.agents:
                self.add_agent(agent)
        except BaseException:
            self.abort()
            raise
        return self

    def share_host_rate(self) -> None:
        """Measure this host's core once, before any agent starts, and give every emulated
        agent that figure (``EDGESLICE_HOST_CORE_GFLOPS``): agents that calibrate it
        themselves while the others start see different caches and so different pace
        factors -- equal profiles would run at unequal speeds."""
        assert self.fleet is not None
        if not any(a.emulate for a in self.spec.agents):
            return
        from edgeslice.agent.quota import HOST_RATE_ENV, host_core_gflops

        rate = host_core_gflops(seconds=1.0, rounds=5)  # the env's figure when one is set
        self.fleet.extra_env[HOST_RATE_ENV] = f"{rate:.3f}"

    def add_agent(self, agent: TestbedAgent) -> None:
        """Start one agent (behind its own shaped link when it has one)."""
        assert self.fleet is not None
        target = self.broker_url.removeprefix("mqtt://")
        extra: list[str] = ["--calibrate-seconds", "0.5"]
        if agent.emulate:
            extra += ["--emulate", "--emulate-mode", agent.emulate_mode]
        if agent.link is not None:
            port = free_port()
            shape = ["--shape-file", str(Path(self.workdir) / f"link-{agent.agent_id}.json")]
            self.fleet.spawn_module(
                f"link-{agent.agent_id}",
                "edgeslice.lab.linkem",
                ["--listen-port", str(port), "--target", target, *agent.link.args(), *shape],
                ready=("127.0.0.1", port),
                timeout=30,
            )
            extra += ["--broker", f"mqtt://127.0.0.1:{port}"]
        self.agents.append(agent.agent_id)  # before it starts: down removes its cgroup
        self.fleet.start_agent(AgentSpec(agent.agent_id, agent.profile, tuple(extra)))

    def set_link(self, agent_id: str, link: LinkShape) -> None:
        """Change a running agent's link: its proxy re-reads its shape file on SIGHUP."""
        assert self.fleet is not None
        spec = LinkSpec.from_mbit(link.bandwidth_mbit, link.latency_ms, link.loss_pct)
        write_shape_file(Path(self.workdir) / f"link-{agent_id}.json", spec)
        self.fleet.signal(f"link-{agent_id}", signal.SIGHUP)

    def state(self) -> dict[str, Any]:
        assert self.fleet is not None
        running = {n: c.pid for n, c in self.fleet.procs.items() if c.is_running()}
        return {
            "namespace": self.spec.namespace,
            "broker": self.broker_url,
            "workdir": self.workdir,
            "fleet_key_file": self.fleet.fleet_key_file,
            "agents": self.agents,
            "processes": running,
        }

    def record(self) -> None:
        """Write :meth:`state` to the state file (if any), atomically."""
        if self.state_file is None:
            return
        path = Path(self.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2), encoding="utf-8")
        tmp.replace(path)

    def down(self) -> list[str]:
        """Stop every process, remove the agents' cgroups and the state file; what is left."""
        if self.fleet is not None:
            self.fleet.close()
        left = remove_cgroups(self.spec.namespace, self.agents)
        if self.state_file is not None:
            Path(self.state_file).unlink(missing_ok=True)
        return left

    def abort(self) -> None:
        """:meth:`down` after a failed or interrupted start; a second Ctrl-C cannot cut it short."""
        main = threading.current_thread() is threading.main_thread()
        stops = (signal.SIGINT, signal.SIGTERM) if main else ()
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
        try:
            for problem in self.down():
                logger.warning("testbed: left behind: %s", problem)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def remove_cgroups(namespace: str, agent_ids: list[str], wait: float = 15.0) -> list[str]:
    """Remove these agents' cgroups (``namespace@agent``: agent/limits.py:group_name); what
    could not be removed. Other fleets' are left alone, even with the same agent ids.

    A stopped agent's cgroup can still list it for a moment (the kernel empties the group
    after the process is gone; slower on a loaded machine), so this retries for ``wait`` s.
    """
    deadline = time.monotonic() + wait
    while True:
        left = [
            problem
            for agent_id in agent_ids
            for problem in remove_agent_cgroups(group_name(namespace, agent_id))
        ]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def down_from_state(path: str, timeout: float = 15.0) -> list[str]:
    """Stop what ``up`` recorded in ``path``; leftovers (pids, cgroups) that survived."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no testbed state at {path!r}: is a testbed up?") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"testbed state {path!r} is not valid JSON ({exc}); stop its processes by hand "
            "(their logs are in the testbed workdir), then delete the file"
        ) from None
    processes = {str(name): int(pid) for name, pid in state.get("processes", {}).items()}
    broker = [pid for name, pid in processes.items() if name == "broker"]
    links = [pid for name, pid in processes.items() if name.startswith("link-")]
    others = [pid for pid in processes.values() if pid not in broker + links]
    left: list[str] = []
    for tier in (others, links, broker):  # agents first, so they can say goodbye
        left += [f"process group {pgid}" for pgid in stop_groups(tier, timeout)]
    namespace = str(state.get("namespace", DEFAULT_NAMESPACE))
    left += remove_cgroups(namespace, [str(a) for a in state.get("agents", [])])
    Path(path).unlink(missing_ok=True)
    return left


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
