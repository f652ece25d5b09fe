"""Owns the production mosquitto set-up: mosquitto.conf, the ACL and its README, as pure text.

``edgeslice broker config`` writes these files; everything here returns
strings so the rules can be unit-tested without a broker or a disk.

Who may do what (every account authenticates with a password; the agent's
username is its agent id):

* an **agent** publishes only its own ``status``, ``info``, ``telemetry``,
  ``assignment/reported`` and ``cmd-res/+``; on the data path it publishes to
  any agent's ``inbox/+`` (forwarding keeps the client's segment), any client's
  ``results`` and asks for artifacts (``artifacts/+/get``). It reads its own
  ``assignment/desired``, ``cmd/+`` and ``inbox/+``, artifact chunks, plans and
  the planner status.
* the **planner** (also the operator account) reads and writes the namespace.
* the **monitor** reads the namespace and ``$SYS``; it publishes nothing.
* a **client** sends requests only to ``agents/+/inbox/<its username>`` and
  reads plans, the planner status and agents' status (to re-send requests off an agent
  whose last will arrives), info and telemetry; results come back on
  ``clients/<username>/results``, granted by a ``pattern ... %u`` rule. An agent
  replies to the client named by the inbox topic, never to an id in the payload,
  so a client cannot have results delivered to another client: its client id
  must equal its MQTT username.

Why per-agent ``user`` blocks instead of ``pattern .../agents/%u/...``:
mosquitto applies pattern rules to *every* account, so such a pattern would let
the monitor or a client publish ``agents/<its own name>/status`` and pose as an
agent. Patterns are used only where that is harmless (a client's own results). For the
same reason a client's right to send requests is a ``topic write
agents/+/inbox/<client>`` line in its own block, not ``pattern write
agents/+/inbox/%u``: the pattern would also let the read-only monitor send requests.
The price: adding a device means re-running ``edgeslice broker config`` with
the new ``--agents`` list and sending mosquitto a SIGHUP (it reloads the ACL).
Every filter is derived from :class:`broker.protocol.topics.Topics`, so the ACL
matches exactly the topics the rest of edgeslice builds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from edgeslice.broker.protocol.errors import ConfigError, TopicError
from edgeslice.broker.protocol.topics import Topics, check_id
from edgeslice.broker.settings import DEFAULT_NAMESPACE, parse_broker_url

Access = Literal["read", "write", "readwrite"]


@dataclass(frozen=True)
class MosquittoSetup:
    """Everything the generated files depend on; paths are where the files live on the broker."""

    namespace: str = DEFAULT_NAMESPACE
    hostname: str = "broker.local"
    port: int = 8883
    bind: str | None = None  # None: every interface
    tls: bool = True
    local_port: int | None = 1883  # extra plain listener on 127.0.0.1; None: none
    agents: tuple[str, ...] = ()
    clients: tuple[str, ...] = ("client",)
    planner_user: str = "planner"
    monitor_user: str = "monitor"
    install_dir: str = "/etc/mosquitto/edgeslice"
    data_dir: str | None = "/var/lib/mosquitto/"  # None: no persistence
    max_packet_mib: int = 64
    require_client_cert: bool = False
    run_as_user: str | None = None  # None: mosquitto's default (drop root to "mosquitto")
    topics: Topics = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            parse_broker_url("127.0.0.1", self.namespace)
        except ConfigError as exc:
            raise ConfigError(f"--namespace: {exc}") from None
        object.__setattr__(self, "topics", Topics(self.namespace))
        for option, names in (
            ("--agents", self.agents),
            ("--clients", self.clients),
            ("--planner-user", (self.planner_user,)),
            ("--monitor-user", (self.monitor_user,)),
        ):
            for name in names:
                try:
                    check_id(name, f"{option} name")
                except TopicError as exc:
                    raise ConfigError(str(exc)) from None
        everyone = [*self.agents, *self.clients, self.planner_user, self.monitor_user]
        dupes = sorted({name for name in everyone if everyone.count(name) > 1})
        if dupes:
            raise ConfigError(
                f"account name(s) {', '.join(dupes)} used twice: agents, clients, planner and "
                "monitor need distinct usernames (the ACL grants rights per username)"
            )
        for option, port in (("--port", self.port), ("--local-port", self.local_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ConfigError(f"{option} {port}: must be 1-65535")
        if self.local_port is not None and self.local_port == self.port:
            raise ConfigError(f"--local-port {self.local_port} is the same as --port; pick another")
        if not 1 <= self.max_packet_mib <= 256:
            raise ConfigError(f"--max-packet-mib {self.max_packet_mib}: must be 1-256 (MQTT max)")

    @property
    def password_file(self) -> str:
        return f"{self.install_dir}/passwd"

    @property
    def acl_file(self) -> str:
        return f"{self.install_dir}/acl"

    def cert_path(self, name: str) -> str:
        return f"{self.install_dir}/certs/{name}"


@dataclass(frozen=True)
class AclRule:
    """One ACL line: ``user`` None means a ``pattern`` rule that applies to every account."""

    user: str | None
    access: Access
    topic: str
    why: str = ""

    def render(self) -> str:
        keyword = "pattern" if self.user is None else "topic"
        return f"{keyword} {self.access} {self.topic}"


def agent_rules(setup: MosquittoSetup, agent: str) -> list[AclRule]:
    """What one agent account may publish and read."""
    t = setup.topics
    agent_root = f"{t.root}/agents/{agent}"
    return [
        AclRule(agent, "write", t.status(agent), "own status (also its LWT)"),
        AclRule(agent, "write", t.info(agent), "own birth info"),
        AclRule(agent, "write", t.telemetry(agent), "own telemetry"),
        AclRule(agent, "write", t.assignment_reported(agent), "stages it runs now"),
        AclRule(agent, "write", f"{agent_root}/cmd-res/+", "replies to its commands"),
        AclRule(agent, "write", t.all_inboxes(), "data path: next stage's inbox, any client"),
        AclRule(agent, "write", f"{t.root}/clients/+/results", "last stage: results to clients"),
        AclRule(agent, "write", t.all_artifact_gets(), "ask the planner for an artifact"),
        AclRule(agent, "read", t.assignment_desired(agent), "what the planner wants it to run"),
        AclRule(agent, "read", t.agent_commands(agent), "commands for it"),
        AclRule(agent, "read", t.agent_inbox(agent), "chunks for it, from every client"),
        AclRule(agent, "readwrite", t.probe(agent), "its own link self-test (to itself)"),
        AclRule(agent, "read", f"{t.root}/artifacts/+/data", "artifact chunks"),
        AclRule(agent, "read", t.all_plans(), "current plans"),
        AclRule(agent, "read", t.planner_status(), "planner online/offline"),
    ]


def acl_rules(setup: MosquittoSetup) -> list[AclRule]:
    """Every rule of the ACL, grouped by account, patterns last."""
    t = setup.topics
    rules = [
        AclRule(setup.planner_user, "readwrite", t.all_topics(), "planner/operator: everything"),
        AclRule(setup.monitor_user, "read", t.all_topics(), "monitor: read-only"),
        AclRule(setup.monitor_user, "read", "$SYS/#", "broker statistics"),
    ]
    for agent in setup.agents:
        rules.extend(agent_rules(setup, agent))
    for client in setup.clients:
        rules += [
            AclRule(client, "write", t.all_inboxes(client), "requests, under its own id only"),
            AclRule(client, "read", t.all_plans(), "where to send requests"),
            AclRule(client, "read", t.planner_status(), "is the fleet up"),
            AclRule(client, "read", t.all_agents("telemetry"), "load, for replica scoring"),
            AclRule(client, "read", t.all_agents("info"), "link latency, for replica scoring"),
            AclRule(client, "read", t.all_agents("status"), "last wills: re-send requests at once"),
        ]
    rules.append(
        AclRule(None, "read", f"{t.root}/clients/%u/results", "each account: its own results")
    )
    return rules


def render_acl(setup: MosquittoSetup) -> str:
    """The ``acl`` file: a comment header, then one block per account, then the patterns."""
    lines = [
        "# edgeslice ACL for mosquitto (generated by `edgeslice broker config`; edit the",
        "# command line, not this file). Anonymous clients get nothing: no rules before",
        "# the first `user` line. Reload after changes: kill -HUP <mosquitto pid>.",
        f"# namespace: {setup.topics.root}",
        "",
    ]
    current: str | None = ""
    for rule in acl_rules(setup):
        if rule.user != current:
            current = rule.user
            lines.append("")
            lines.append(
                "# every account (%u = its username)" if current is None else f"user {current}"
            )
        if rule.why:  # mosquitto reads '#' as a comment only at the start of a line
            lines.append(f"# {rule.why}")
        lines.append(rule.render())
    return "\n".join(lines).strip() + "\n"


def render_mosquitto_conf(setup: MosquittoSetup) -> str:
    """The ``mosquitto.conf``: authenticated TLS listener, ACL, persistence and queue limits."""
    bind = f" {setup.bind}" if setup.bind else ""
    out = [
        "# edgeslice production broker (generated by `edgeslice broker config`).",
        "# See README-broker.md next to this file for certificates, users and start-up.",
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {setup.password_file}",
        f"acl_file {setup.acl_file}",
    ]
    if setup.run_as_user:
        out.append(f"user {setup.run_as_user}")
    out += ["", "# Sessions and retained messages (status, plans, assignments) survive restarts."]
    if setup.data_dir:
        out += [
            "persistence true",
            f"persistence_location {setup.data_dir}",
            "autosave_interval 60",
        ]
    else:
        out.append("persistence false")
    out += [
        "",
        "# Activations travel as chunks (256 KiB by default); keep chunk_size below the cap.",
        f"max_packet_size {setup.max_packet_mib * 1024 * 1024}",
        "max_inflight_messages 100",
        "max_queued_messages 10000",
        f"max_queued_bytes {256 * 1024 * 1024}",
        "set_tcp_nodelay true",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "log_timestamp true",
        "",
    ]
    if setup.tls:
        out += [
            f"# MQTT over TLS for the fleet; clients verify the server as {setup.hostname}.",
            f"listener {setup.port}{bind}",
            "protocol mqtt",
            f"cafile {setup.cert_path('ca.crt')}",
            f"certfile {setup.cert_path('server.crt')}",
            f"keyfile {setup.cert_path('server.key')}",
            f"require_certificate {'true' if setup.require_client_cert else 'false'}",
        ]
    else:
        out += [
            "# Plain MQTT, no TLS: only for tests or a network you fully trust.",
            f"listener {setup.port}{bind}",
            "protocol mqtt",
        ]
    if setup.local_port is not None:
        out += [
            "",
            "# Plain listener for processes on the broker host itself (still password + ACL).",
            f"listener {setup.local_port} 127.0.0.1",
            "protocol mqtt",
        ]
    return "\n".join(out) + "\n"


def render_readme(setup: MosquittoSetup) -> str:
    """``README-broker.md``: CA and certificates, users, start-up, adding devices."""
    d = setup.install_dir
    host = setup.hostname
    users = [setup.planner_user, setup.monitor_user, *setup.clients, *setup.agents]
    agent = setup.agents[0] if setup.agents else "pi-1"
    scheme = "mqtts" if setup.tls else "mqtt"
    tls_flag = " --tls-ca ca.crt" if setup.tls else ""
    cafile = f" --cafile {setup.cert_path('ca.crt')}" if setup.tls else ""
    users_cmds = "\n".join(
        f"sudo mosquitto_passwd -b {d}/passwd {u} <password-for-{u}>" for u in users
    )
    return f"""# edgeslice production broker (mosquitto)

Generated by `edgeslice broker config` for namespace `{setup.namespace}`, broker
host `{host}`, port {setup.port}. Files: `mosquitto.conf`, `acl`, this README.
Copy them to `{d}/` on the broker host.

## 1. Certificates (once)

```sh
sudo mkdir -p {d}/certs && cd {d}/certs
# a private CA for the fleet; keep ca.key offline
openssl req -x509 -new -nodes -newkey rsa:3072 -sha256 -days 3650 \\
    -keyout ca.key -out ca.crt -subj "/CN=edgeslice fleet CA"
# the broker's key and certificate, valid for the name devices connect to
openssl req -new -nodes -newkey rsa:3072 -keyout server.key -out server.csr \\
    -subj "/CN={host}"
printf "subjectAltName=DNS:{host}\\n" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \\
    -out server.crt -days 825 -sha256 -extfile server.ext
sudo chown mosquitto: server.key && sudo chmod 600 server.key
```

Give every device a copy of `ca.crt` (not `ca.key`). Add `IP:<address>` to
`subjectAltName` if devices connect by IP address.

## 2. Users (one password per account)

The ACL gives rights by username: each agent's username is its agent id.

```sh
sudo touch {d}/passwd && sudo chmod 640 {d}/passwd && sudo chown root:mosquitto {d}/passwd
{users_cmds}
```

`openssl rand -base64 18` makes a good password; each device needs its own.
Without `-b`, `mosquitto_passwd {d}/passwd <user>` prompts instead (the password
stays out of the shell history).
`mosquitto_passwd -D {d}/passwd <user>` removes an account.

## 3. Start mosquitto

```sh
sudo mosquitto -c {d}/mosquitto.conf        # in the foreground, to try it
```

As a service (Debian/Ubuntu package): this file is a complete configuration, so
point the service at it rather than dropping it into `conf.d/` (the packaged
`mosquitto.conf` already sets `persistence_location`, and mosquitto refuses
duplicates). `sudo systemctl edit mosquitto`, then add:

```ini
[Service]
ExecStart=
ExecStart=/usr/sbin/mosquitto -c {d}/mosquitto.conf
```

and `sudo systemctl restart mosquitto`.

Check it (prints every message of the namespace):

```sh
mosquitto_sub -h {host} -p {setup.port}{cafile} -u {setup.monitor_user} -P <password> \\
    -t '{setup.topics.all_topics()}' -v
```

## 4. Devices and services

```sh
# on the device, with its copy of ca.crt and the planner's fleet.pub
export EDGESLICE_PASSWORD=<the agent's password>
edgeslice agent --broker {scheme}://{host}:{setup.port}{tls_flag} --username {agent}
```

The planner uses `--username {setup.planner_user}`, `edgeslice monitor` uses
`--username {setup.monitor_user}`, clients use their own username as client id.

Stage artifacts are signed apart from TLS: `edgeslice keygen` on the planner machine
writes `fleet.key` (the private key: it never leaves that machine) and `fleet.pub`.
Every agent gets only `fleet.pub`, in `~/.config/edgeslice/` (or `--fleet-key-file`),
so a captured device cannot sign an artifact the other agents would load.

## 5. Adding a device

Re-run `edgeslice broker config` with the longer `--agents` list, copy the new
`acl`, add the password with `mosquitto_passwd -b`, then reload without a
restart: `sudo kill -HUP $(pidof mosquitto)`.
"""


def render_all(setup: MosquittoSetup) -> dict[str, str]:
    """File name -> contents for everything ``edgeslice broker config`` writes."""
    return {
        "mosquitto.conf": render_mosquitto_conf(setup),
        "acl": render_acl(setup),
        "README-broker.md": render_readme(setup),
    }


def split_names(values: Iterable[str]) -> tuple[str, ...]:
    """``["pi-1,pi-2", "pi-3"]`` -> ``("pi-1", "pi-2", "pi-3")``: for repeatable comma options."""
    names: list[str] = []
    for value in values:
        names.extend(part.strip() for part in value.split(",") if part.strip())
    return tuple(names)
