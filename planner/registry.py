"""The fleet as the planner sees it, folded from retained status/info and live telemetry.

Pure: ``apply(topic, payload, now)`` updates the view and says whether the set of
usable agents changed (what triggers a re-plan); ``devices()`` turns usable agents into
the cost model's :class:`~planner.costmodel.Device` values.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.protocol import codec
from broker.protocol.messages import AssignmentReported, Info, Status, Telemetry
from broker.protocol.topics import Kind, Topics
from planner.costmodel import Device


@dataclass
class AgentView:
    """What the planner knows about one agent."""

    agent_id: str
    online: bool = False
    session: int = 0
    info: Info | None = None
    telemetry: Telemetry | None = None
    telemetry_at: float = 0.0
    reported: AssignmentReported | None = None

    @property
    def usable(self) -> bool:
        """Online and has told us what it is (info of the current session)."""
        return self.online and self.info is not None and self.info.session == self.session


class Registry:
    """Agents by id; see the module docstring."""

    def __init__(self, topics: Topics, stale_after_s: float = 15.0) -> None:
        self.topics = topics
        self.stale_after_s = stale_after_s
        self.agents: dict[str, AgentView] = {}

    def usable_ids(self) -> frozenset[str]:
        return frozenset(a.agent_id for a in self.agents.values() if a.usable)

    def apply(self, topic: str, payload: bytes, now: float) -> bool:
        """Fold one message in; True when the set of usable agents changed."""
        parsed = self.topics.parse(topic)
        if not parsed.agent_id or not payload:
            return False
        before = self.usable_ids()
        view = self.agents.setdefault(parsed.agent_id, AgentView(parsed.agent_id))
        if parsed.kind is Kind.STATUS:
            status = codec.decode(payload, Status)
            view.online = status.state == "online"
            view.session = status.session
        elif parsed.kind is Kind.INFO:
            view.info = codec.decode(payload, Info)
        elif parsed.kind is Kind.TELEMETRY:
            view.telemetry = codec.decode(payload, Telemetry)
            view.telemetry_at = now
        elif parsed.kind is Kind.ASSIGNMENT_REPORTED:
            view.reported = codec.decode(payload, AssignmentReported)
        return self.usable_ids() != before

    def load(self, agent_id: str, now: float) -> float:
        """Live CPU load 0..1 from recent telemetry (0 when unknown or stale)."""
        view = self.agents.get(agent_id)
        if view is None or view.telemetry is None or now - view.telemetry_at > self.stale_after_s:
            return 0.0
        return max(0.0, min(1.0, view.telemetry.cpu_percent / 100.0))

    def devices(self, now: float, use_load: bool = False) -> list[Device]:
        """Usable agents as cost-model devices (measured rate, budget, link)."""
        out = []
        for view in sorted(self.agents.values(), key=lambda v: v.agent_id):
            info = view.info
            if not view.usable or info is None:
                continue
            link = info.profile_data.get("link", {}) if info.profile_data else {}
            nominal_bps = float(link.get("bandwidth_mbit", 100.0)) * 1e6 / 8
            bandwidth = info.link_bandwidth_bps if info.link_bandwidth_bps > 0 else nominal_bps
            rtt = (
                info.link_rtt_s
                if info.link_rtt_s > 0
                else 2 * float(link.get("latency_ms", 1.0)) / 1e3
            )
            out.append(
                Device(
                    agent_id=view.agent_id,
                    gflops=max(info.gflops, 1e-3),
                    memory_bytes=info.memory_budget_bytes,
                    bandwidth_bps=bandwidth,
                    rtt_s=rtt,
                    load=self.load(view.agent_id, now) if use_load else 0.0,
                )
            )
        return out

    def stage_timings(self) -> dict[str, dict[str, dict[str, float]]]:
        """agent -> artifact sha -> {stage, count, compute_s, queue_s} from telemetry."""
        return {
            a.agent_id: dict(a.telemetry.stage_timings)
            for a in self.agents.values()
            if a.telemetry is not None
        }
