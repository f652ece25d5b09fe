"""The one fold of agent control messages (status, info, telemetry, assignments, plans) into
fleet state, shared by the monitor, the planner's registry, the inference client and the lab.

Pure: :meth:`FleetState.apply` takes a topic, a payload and the clock, and returns the id
of the agent whose state changed (``None`` when nothing about an agent changed). Decoding
failures raise :class:`~edgeslice.broker.protocol.errors.ProtocolError`; each caller
decides whether a malformed message is worth a log line.

What "load" means, in one place: :meth:`AgentState.load` is the fraction of the last
telemetry interval the agent's **stage worker** spent computing (``Telemetry.busy``,
0..1). That is what says whether more requests fit on the agent; host CPU use (which
counts the agent's own MQTT loop and anything else on the device) stays
``Telemetry.cpu_percent``: the monitor shows it, nothing calls it load.

What "usable" means, in one place: online (any other state -- ``offline``, ``draining``,
whatever a newer agent says -- means "send it nothing new") with an ``info`` of the
current session. The planner's own liveness (``planner/status``) is folded too: a client
tells "nobody will re-plan" from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.messages import (
    ONLINE,
    AssignmentDesired,
    AssignmentReported,
    Info,
    PlanMessage,
    PlannerStatus,
    Status,
    Telemetry,
)
from edgeslice.broker.protocol.topics import Kind, Topics

DEFAULT_STALE_AFTER_S = 15.0


@dataclass
class AgentState:
    """Everything the fleet's retained and live messages say about one agent."""

    agent_id: str
    online: bool = False
    state: str = ""  # as the agent said: online, offline, draining, ...
    session: int = 0
    offline_reason: str = ""
    info: Info | None = None
    telemetry: Telemetry | None = None
    telemetry_at: float = 0.0
    reported: AssignmentReported | None = None
    desired: AssignmentDesired | None = None

    @property
    def usable(self) -> bool:
        """Online and has told us what it is (an info of the current session)."""
        return self.online and self.info is not None and self.info.session == self.session

    def fresh_telemetry(self, now: float, stale_after_s: float) -> Telemetry | None:
        """The latest telemetry, or None when there is none or it is older than the limit."""
        if self.telemetry is None or now - self.telemetry_at > stale_after_s:
            return None
        return self.telemetry

    def load(self, now: float, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> float:
        """Stage-worker busy fraction 0..1 from fresh telemetry (0 when unknown or stale)."""
        tel = self.fresh_telemetry(now, stale_after_s)
        return 0.0 if tel is None else max(0.0, min(1.0, tel.busy))


class FleetState:
    """Agents by id and plans by model; see the module docstring."""

    def __init__(self, topics: Topics, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.topics = topics
        self.stale_after_s = stale_after_s
        self.agents: dict[str, AgentState] = {}
        self.plans: dict[str, PlanMessage] = {}
        self.planner: PlannerStatus | None = None  # None: never heard of / cleared

    def usable_ids(self) -> frozenset[str]:
        return frozenset(a.agent_id for a in self.agents.values() if a.usable)

    def load(self, agent_id: str, now: float) -> float:
        """:meth:`AgentState.load` of one agent; 0 for an agent never heard of."""
        state = self.agents.get(agent_id)
        return 0.0 if state is None else state.load(now, self.stale_after_s)

    def apply(self, topic: str, payload: bytes, now: float) -> str | None:
        """Fold one message in; the id of the agent it changed, or None.

        An empty payload is a cleared retained message: a cleared plan is forgotten, a
        cleared agent topic changes nothing (the agent's last will says when it left).
        """
        parsed = self.topics.parse(topic)
        if parsed.kind is Kind.PLAN:
            model = parsed.name or ""
            if not payload:
                self.plans.pop(model, None)
            else:
                plan = codec.decode(payload, PlanMessage)
                self.plans[plan.model] = plan
            return None
        if parsed.kind is Kind.PLANNER_STATUS:
            self.planner = codec.decode(payload, PlannerStatus) if payload else None
            return None
        if not parsed.agent_id or not payload:
            return None
        kind = parsed.kind
        if kind is Kind.STATUS:
            status = codec.decode(payload, Status)
            state = self._agent(parsed.agent_id)
            state.online = status.state == ONLINE
            state.state = status.state
            state.session = status.session
            state.offline_reason = "" if state.online else status.reason
        elif kind is Kind.INFO:
            self._agent(parsed.agent_id).info = codec.decode(payload, Info)
        elif kind is Kind.TELEMETRY:
            state = self._agent(parsed.agent_id)
            state.telemetry = codec.decode(payload, Telemetry)
            state.telemetry_at = now
        elif kind is Kind.ASSIGNMENT_REPORTED:
            self._agent(parsed.agent_id).reported = codec.decode(payload, AssignmentReported)
        elif kind is Kind.ASSIGNMENT_DESIRED:
            self._agent(parsed.agent_id).desired = codec.decode(payload, AssignmentDesired)
        else:
            return None
        return parsed.agent_id

    def _agent(self, agent_id: str) -> AgentState:
        return self.agents.setdefault(agent_id, AgentState(agent_id))
