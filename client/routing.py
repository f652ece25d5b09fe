"""Which agent serves each stage of one request: the fleet's word plus this client's measures.

:class:`Router` keeps what the client measures itself (its requests in flight per agent,
EWMAs of recent stage times) beside the shared :class:`FleetState` (telemetry load, link
latency, liveness), and asks :func:`~edgeslice.client.scoring.pick_replica` for one replica
per stage. Replicas known not to be online (last will, ``draining``) are passed over
while another replica of the stage is up. A tiled plan's request goes to every tile of its
tiled stages (:meth:`Router.choose_tiles`); its other stages get one replica as above.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol.messages import PlanMessage, StageTiming, Tile
from edgeslice.client.requests import Measured
from edgeslice.client.scoring import Candidate, Weights, pick_replica


class Router:
    """Replica choice for one client; see the module docstring."""

    def __init__(self, fleet: FleetState, weights: Weights) -> None:
        self.fleet = fleet
        self.weights = weights
        self.measured: dict[str, Measured] = {}

    def offline(self) -> set[str]:
        """Agents whose last word is that they are not online (offline, draining, ...)."""
        return {a for a, st in self.fleet.agents.items() if st.state and not st.online}

    def choose_route(self, plan: PlanMessage) -> list[str]:
        """One agent per stage among the stage's replicas (online ones when there are)."""
        now = time.time()
        down = self.offline()
        route = []
        for stage in plan.stages:
            predicted = dict(zip(stage.agents, stage.replica_period_s, strict=False))
            agents = [a for a in stage.agents if a not in down] or list(stage.agents)
            cands = [self.candidate(a, stage.stage, predicted.get(a, 1.0), now) for a in agents]
            route.append(pick_replica(cands, plan.strategy, self.weights))
        return route

    def choose_tiles(self, plan: PlanMessage) -> list[list[Tile]]:
        """Per stage, the tiles a request of a tiled plan goes to: a tiled stage's own, and
        for a stage that is not split one whole tile on the replica :meth:`choose_route`
        picks."""
        route = self.choose_route(plan)
        return [
            list(stage.tiles) or [Tile(agent, stage.artifact, [], [])]
            for stage, agent in zip(plan.stages, route, strict=True)
        ]

    def candidate(self, agent_id: str, stage: int, predicted_s: float, now: float) -> Candidate:
        """One replica as the policy sees it: the fleet's word plus this client's measures."""
        own = self.measured.setdefault(agent_id, Measured())
        agent = self.fleet.agents.get(agent_id)
        tel = agent.fresh_telemetry(now, self.fleet.stale_after_s) if agent else None
        info = agent.info if agent else None
        return Candidate(
            agent_id=agent_id,
            resource_fit=max(0.0, 1.0 - tel.mem_percent / 100.0) if tel else 1.0,
            load=self.fleet.load(agent_id, now),  # stage-worker busy share, not host CPU
            recent_task_s=own.recent.get(stage, 0.0),
            in_flight=own.in_flight,
            latency_s=info.link_rtt_s if info else 0.0,
            compute_s=own.compute.get(stage, 0.0),
            predicted_period_s=predicted_s,
        )

    def learn(self, timings: Sequence[StageTiming]) -> None:
        """Fold a finished request's measured stage times into the EWMAs routing uses.

        A batched run reports the whole batch's compute time; one request's share of it
        (``compute_s / batch``) is what the replica costs per request. Folding the batch's
        time in as one request's made a fast replica that batched during a burst look
        slower than an idle slow one, and requests sent one at a time afterwards went to
        the slow one, whose EWMA then stayed the lowest (the fast one was never tried again).
        """
        for t in timings:
            st = self.measured.setdefault(t.agent, Measured())
            per_request = t.compute_s / max(1, t.batch)
            prev = st.recent.get(t.stage)
            value = per_request + t.queue_s
            st.recent[t.stage] = value if prev is None else 0.7 * prev + 0.3 * value
            last = st.compute.get(t.stage)
            st.compute[t.stage] = per_request if last is None else 0.7 * last + 0.3 * per_request

    def track(self, old: Sequence[str], new: Sequence[str]) -> None:
        """A request moved from route ``old`` to ``new`` (either may be empty)."""
        for agent_id in old:
            self.measured.setdefault(agent_id, Measured()).in_flight -= 1
        for agent_id in new:
            self.measured.setdefault(agent_id, Measured()).in_flight += 1
