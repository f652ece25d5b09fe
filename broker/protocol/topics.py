"""The one topic table: every edgeslice topic is built and parsed here, nowhere else.

Layout (``{ns}`` is the namespace, default ``edgeslice``; ``v1`` the protocol major)::

    {ns}/v1/agents/{id}/status                 agent, retained, LWT offline
    {ns}/v1/agents/{id}/info                   agent, retained
    {ns}/v1/agents/{id}/telemetry              agent, QoS 0
    {ns}/v1/agents/{id}/assignment/desired     planner, retained
    {ns}/v1/agents/{id}/assignment/reported    agent, retained
    {ns}/v1/agents/{id}/inbox/{client}         data path: chunks for this agent of a request
                                               of client {client} (its MQTT username under
                                               the production ACL; results go only there)
    {ns}/v1/agents/{id}/probe                  the agent's own link test (to itself)
    {ns}/v1/agents/{id}/cmd/{name}             planner/operator -> agent
    {ns}/v1/agents/{id}/cmd-res/{name}         agent -> whoever asked
    {ns}/v1/artifacts/{sha256}/get             agent asks the planner for an artifact
    {ns}/v1/artifacts/{sha256}/data            planner serves its chunks
    {ns}/v1/planner/status                     planner, retained, LWT offline
    {ns}/v1/plans/{model}                      planner, retained
    {ns}/v1/clients/{id}/results               last stage -> client
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from edgeslice.broker.protocol.errors import TopicError

VERSION_SEGMENT = "v1"
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CMD_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class Kind(StrEnum):
    """What a topic carries; the value is the topic's path after the id."""

    STATUS = "status"
    INFO = "info"
    TELEMETRY = "telemetry"
    ASSIGNMENT_DESIRED = "assignment/desired"
    ASSIGNMENT_REPORTED = "assignment/reported"
    INBOX = "inbox"
    PROBE = "probe"
    CMD = "cmd"
    CMD_RESULT = "cmd-res"
    ARTIFACT_GET = "artifact/get"
    ARTIFACT_DATA = "artifact/data"
    PLANNER_STATUS = "planner/status"
    PLAN = "plan"
    CLIENT_RESULTS = "client/results"


_AGENT_KINDS = {
    "status": Kind.STATUS,
    "info": Kind.INFO,
    "telemetry": Kind.TELEMETRY,
    "assignment/desired": Kind.ASSIGNMENT_DESIRED,
    "assignment/reported": Kind.ASSIGNMENT_REPORTED,
    "probe": Kind.PROBE,
}


def check_id(value: str, what: str = "agent id") -> str:
    """Return ``value`` if it is usable inside a topic, else raise :class:`TopicError`."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise TopicError(
            f"{what} {value!r} cannot be used in a topic: use 1-64 letters, digits, "
            "'.', '_', ':' or '-' (no '/', '+', '#', spaces)"
        )
    return value


def sanitize_id(value: str) -> str:
    """Turn a hostname or free text into a valid id (used for the default ``--id``).

    ``.`` becomes ``-`` too (``pi.local`` -> ``pi-local``): NATS refuses topics with
    ``.`` and RabbitMQ maps it to ``/``, so a default id must not carry one."""
    cleaned = re.sub(r"[^A-Za-z0-9_:-]+", "-", value).strip("-")[:64]
    return cleaned or "agent"


@dataclass(frozen=True)
class ParsedTopic:
    """What a topic means: its kind and the ids inside it (empty string when not applicable);
    ``name`` is the command, artifact sha, model or (for an inbox) the sending client's id."""

    kind: Kind
    agent_id: str = ""
    name: str = ""


@dataclass(frozen=True)
class Topics:
    """Builds every topic of one namespace; also parses them back (:meth:`parse`)."""

    namespace: str = "edgeslice"

    @property
    def root(self) -> str:
        return f"{self.namespace}/{VERSION_SEGMENT}"

    # -- agents -------------------------------------------------------------
    def _agent(self, agent_id: str, suffix: str) -> str:
        return f"{self.root}/agents/{check_id(agent_id)}/{suffix}"

    def status(self, agent_id: str) -> str:
        return self._agent(agent_id, "status")

    def info(self, agent_id: str) -> str:
        return self._agent(agent_id, "info")

    def telemetry(self, agent_id: str) -> str:
        return self._agent(agent_id, "telemetry")

    def assignment_desired(self, agent_id: str) -> str:
        return self._agent(agent_id, "assignment/desired")

    def assignment_reported(self, agent_id: str) -> str:
        return self._agent(agent_id, "assignment/reported")

    def inbox(self, agent_id: str, client_id: str) -> str:
        """Where chunks of ``client_id``'s request go for agent ``agent_id``: the client id in
        the topic (not in the payload) is who the result goes back to, and what the broker's
        ACL checks (a client may write only ``inbox/<its username>``)."""
        return self._agent(agent_id, f"inbox/{check_id(client_id, 'client id')}")

    def agent_inbox(self, agent_id: str) -> str:
        """Filter: the inbox of one agent, from every client (what the agent subscribes to)."""
        return self._agent(agent_id, "inbox/+")

    def all_inboxes(self, client_id: str = "+") -> str:
        """Filter: every agent's inbox for one client (``+``: for every client)."""
        client = client_id if client_id in ("+", "%u") else check_id(client_id, "client id")
        return f"{self.root}/agents/+/inbox/{client}"

    def probe(self, agent_id: str) -> str:
        return self._agent(agent_id, "probe")

    def cmd(self, agent_id: str, name: str) -> str:
        return self._agent(agent_id, f"cmd/{_check_cmd(name)}")

    def cmd_result(self, agent_id: str, name: str) -> str:
        return self._agent(agent_id, f"cmd-res/{_check_cmd(name)}")

    # -- artifacts, planner, plans, clients ----------------------------------
    def artifact_get(self, sha256: str) -> str:
        return f"{self.root}/artifacts/{_check_sha(sha256)}/get"

    def artifact_data(self, sha256: str) -> str:
        return f"{self.root}/artifacts/{_check_sha(sha256)}/data"

    def planner_status(self) -> str:
        return f"{self.root}/planner/status"

    def plan(self, model: str) -> str:
        return f"{self.root}/plans/{check_id(model, 'model name')}"

    def client_results(self, client_id: str) -> str:
        return f"{self.root}/clients/{check_id(client_id, 'client id')}/results"

    # -- subscription filters -----------------------------------------------
    def all_topics(self) -> str:
        """Everything in this namespace and protocol version (monitor --raw)."""
        return f"{self.root}/#"

    def all_agents(self, suffix: str) -> str:
        """One kind of topic for every agent, e.g. ``all_agents("status")``."""
        if suffix not in _AGENT_KINDS:
            raise TopicError(f"unknown agent topic kind {suffix!r}; one of {sorted(_AGENT_KINDS)}")
        return f"{self.root}/agents/+/{suffix}"

    def agent_commands(self, agent_id: str) -> str:
        return self._agent(agent_id, "cmd/+")

    def all_artifact_gets(self) -> str:
        return f"{self.root}/artifacts/+/get"

    def all_plans(self) -> str:
        return f"{self.root}/plans/+"

    # -- parsing -------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Map a topic back to its kind and ids; :class:`TopicError` if it is not ours."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is outside namespace {self.root!r}")
        parts = topic[len(prefix) :].split("/")
        head = parts[0]
        if head == "agents" and len(parts) >= 3 and _ID_RE.match(parts[1]):
            rest = "/".join(parts[2:])
            if rest in _AGENT_KINDS:
                return ParsedTopic(_AGENT_KINDS[rest], agent_id=parts[1])
            if len(parts) == 4 and parts[2] == "inbox" and _ID_RE.match(parts[3]):
                return ParsedTopic(Kind.INBOX, agent_id=parts[1], name=parts[3])
            if len(parts) == 4 and parts[2] in ("cmd", "cmd-res") and _CMD_RE.match(parts[3]):
                kind = Kind.CMD if parts[2] == "cmd" else Kind.CMD_RESULT
                return ParsedTopic(kind, agent_id=parts[1], name=parts[3])
        elif head == "artifacts" and len(parts) == 3 and _SHA_RE.match(parts[1]):
            if parts[2] == "get":
                return ParsedTopic(Kind.ARTIFACT_GET, name=parts[1])
            if parts[2] == "data":
                return ParsedTopic(Kind.ARTIFACT_DATA, name=parts[1])
        elif head == "planner" and parts == ["planner", "status"]:
            return ParsedTopic(Kind.PLANNER_STATUS)
        elif head == "plans" and len(parts) == 2 and _ID_RE.match(parts[1]):
            return ParsedTopic(Kind.PLAN, name=parts[1])
        elif (
            head == "clients"
            and len(parts) == 3
            and parts[2] == "results"
            and _ID_RE.match(parts[1])
        ):
            return ParsedTopic(Kind.CLIENT_RESULTS, agent_id=parts[1])
        raise TopicError(f"topic {topic!r} is not in the edgeslice topic table")


def _check_cmd(name: str) -> str:
    if not _CMD_RE.match(name):
        raise TopicError(f"command name {name!r}: lowercase letters, digits, '_' or '-' only")
    return name


def _check_sha(sha256: str) -> str:
    if not _SHA_RE.match(sha256):
        raise TopicError(f"artifact id {sha256!r} is not a lowercase hex sha256")
    return sha256
