"""The fleet as the planner sees it: :class:`~edgeslice.broker.fleetstate.FleetState`
(the one fold of status/info/telemetry) plus what planning needs from it.

Pure: ``apply(topic, payload, now)`` updates the view and says whether the set of
usable agents changed (what triggers a re-plan); ``devices()`` turns usable agents into
the cost model's :class:`~edgeslice.planner.costmodel.Device` values, and ``correction()``
fits the cost model's per-agent correction to the stage timings agents report.
"""

from __future__ import annotations

from edgeslice.broker.fleetstate import DEFAULT_STALE_AFTER_S, AgentState, FleetState
from edgeslice.broker.protocol.messages import PlanStage
from edgeslice.broker.protocol.topics import Topics
from edgeslice.planner.costmodel import Device, ModelCost, compute_s, fit_correction, speedup_at


class Registry:
    """The planner's view of the fleet; see the module docstring."""

    def __init__(self, topics: Topics, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.fleet = FleetState(topics, stale_after_s)

    @property
    def agents(self) -> dict[str, AgentState]:
        return self.fleet.agents

    def usable_ids(self) -> frozenset[str]:
        return self.fleet.usable_ids()

    def apply(self, topic: str, payload: bytes, now: float) -> bool:
        """Fold one message in; True when the set of usable agents changed."""
        before = self.usable_ids()
        self.fleet.apply(topic, payload, now)
        return self.usable_ids() != before

    def load(self, agent_id: str, now: float) -> float:
        """The agent's stage-worker busy fraction 0..1 (see FleetState for the meaning)."""
        return self.fleet.load(agent_id, now)

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
                    batch_speedup=speedup_at(info.batch_speedup, info.max_batch),
                    max_batch=max(1, info.max_batch),  # 0: an agent older than batching
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

    def timing_samples(
        self, cost: ModelCost, stages: list[PlanStage], now: float
    ) -> list[tuple[str, float, float, int]]:
        """(agent, predicted compute uncorrected, reported mean compute, requests) per stage."""
        if not stages:
            return []
        devices = {d.agent_id: d for d in self.devices(now)}
        ranges = {s.artifact: (s.start_segment, s.end_segment) for s in stages}
        samples = []
        for agent_id, timings in self.stage_timings().items():
            for sha, t in timings.items():
                if sha not in ranges or agent_id not in devices or t.get("count", 0) < 3:
                    continue
                predicted = compute_s(cost, *ranges[sha], devices[agent_id])
                if predicted > 0 and t.get("compute_s", 0) > 0:
                    samples.append((agent_id, predicted, float(t["compute_s"]), int(t["count"])))
        return samples

    def correction(self, cost: ModelCost, stages: list[PlanStage], now: float) -> dict[str, float]:
        """FlexPie's learned correction: measured / predicted compute of the current stages,
        each reported mean weighted by the requests it covers."""
        samples = self.timing_samples(cost, stages, now)
        return fit_correction(samples) if samples else {}
