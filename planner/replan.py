"""When to re-plan, and on which agents: the planner's pure re-planning policy.

Everything here is a plain value or class over the clock it is handed (no I/O, no
asyncio), so each rule is unit-tested in tests/unit/test_replan.py:

* :class:`ReplanSchedule`: a **join** waits for ``delay_s`` of quiet (a booting fleet
  yields one plan, not five); a **leave** (last will, ``offline``, ``draining`` or any
  other non-online state, or an error from an agent of the new plan) re-plans at once.
* :func:`first_plan_gate`: ``--min-agents`` gates the first plan only; afterwards the
  planner always serves the best plan on the agents it has.
* :func:`reconnect_wait`: after the planner's own reconnect, the agents of the served plan
  get a grace period to re-announce before their absence counts (a broker restarted
  without persistence holds no status yet; the agents reconnect at the same time as the
  planner, on the same back-off, and the last wills the broker sent as it stopped say
  nothing about them).
* :class:`Backoff`: an agent that failed an assignment sits out 5 s, 10 s, 20 s ...
  (capped), not until the planner restarts; a new session (restarted agent) is eligible at
  once, and a ``ready`` report clears its record.
* :func:`layout` / :func:`adopt_problem`: whether a freshly planned layout is the one being
  served (then nothing is republished), and whether a plan retained by an earlier planner
  may be adopted as is.
* :func:`capability_changed`: an agent that re-measured itself (``cmd/calibrate``: its link
  and GFLOP/s, republished in ``info``) by more than ``factor`` either way is re-planned
  like a join (after the quiet period): a link that dropped from gigabit to a few Mbit/s
  is priced at its new rate. Agents measure at start-up and on ``cmd/calibrate`` only
  (a periodic link test would cost the link it measures); small drifts change nothing.
* :class:`LoadShift`: an agent whose stage worker is busy above ``high`` on average over
  ``hold_s`` while the rest of the fleet is not (a CPU hog beside it) is planned with its
  effective rate; it gets its work back only after averaging below ``low`` over the
  longer ``recover_s`` (hysteresis: plans do not flap). "The rest of the fleet" is the
  agents not derated: the agent that took over a derated agent's work is busy because of
  the plan, and derating it too gave the work straight back (a flap seen on real load);
  for the same reason every window starts again when any agent is derated or gets its
  work back (the peer busy with a recovering agent's work was derated at once).
  The signal is busy time, which falls once the agent has less work, so an agent whose
  hog never stops gets its work back after ``recover_s`` and is derated again after
  ``hold_s``: a slow cycle, not a flap (a speed signal per interval would tell "idle"
  from "fast again").
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgeslice.broker.fleetstate import AgentState
from edgeslice.broker.protocol.messages import Info, PlanMessage, PlanStage
from edgeslice.planner.costmodel import Device

JOIN = "join"
LEAVE = "leave"


def classify(before: frozenset[str], after: frozenset[str]) -> str | None:
    """How the set of usable agents changed: LEAVE if any left, JOIN if only joins."""
    if before - after:
        return LEAVE
    if after - before:
        return JOIN
    return None


@dataclass
class ReplanSchedule:
    """When the next re-plan is due (``None``: none pending); see the module docstring."""

    delay_s: float
    due: float | None = None

    def join(self, now: float, delay_s: float | None = None) -> None:
        """An agent joined (or came back): re-plan after ``delay_s`` of quiet."""
        if self.due is not None and self.due <= now:
            return  # a leave already asked for a re-plan now: it includes this join
        self.due = now + (self.delay_s if delay_s is None else delay_s)

    def leave(self, now: float) -> None:
        """An agent of the fleet left or failed: re-plan now."""
        self.due = now if self.due is None else min(self.due, now)

    def wait_s(self, now: float) -> float | None:
        """Seconds until the re-plan is due (0: now), None when none is pending."""
        return None if self.due is None else max(0.0, self.due - now)

    def take(self, now: float) -> bool:
        """True (and forget it) when a re-plan is due at ``now``."""
        if self.due is None or self.due > now:
            return False
        self.due = None
        return True


def capability_changed(before: Info | None, after: Info | None, factor: float = 1.5) -> bool:
    """True when a new ``info`` of the same session moved the agent's measured link
    bandwidth, round trip or GFLOP/s by more than ``factor`` (a new session is a join)."""
    if before is None or after is None or before.session != after.session:
        return False
    pairs = (
        (before.link_bandwidth_bps, after.link_bandwidth_bps),
        (before.link_rtt_s, after.link_rtt_s),
        (before.gflops, after.gflops),
    )
    return any(a > 0 and b > 0 and max(a / b, b / a) > factor for a, b in pairs)


def first_plan_gate(usable: int, min_agents: int, served_before: bool) -> str | None:
    """Why the planner must not plan yet (None: plan). Only the first plan waits."""
    if served_before or usable >= min_agents:
        return None
    return f"waiting for the first plan: {usable} usable agent(s), need {min_agents}"


def reconnect_wait(
    expected: frozenset[str],
    usable: frozenset[str],
    heard: frozenset[str],
    now: float,
    until: float,
) -> float:
    """Seconds to wait before planning (0: plan now): until ``until`` (the planner's own
    reconnect plus its grace) while an agent of the served plan (``expected``) is neither
    usable nor ``heard`` from since the reconnect (a status after it -- ``draining``, or a
    last will the restarted broker sent -- is news, not a silence to wait out)."""
    if now >= until or expected <= usable | heard:
        return 0.0
    return until - now


@dataclass(frozen=True)
class BackoffConfig:
    base_s: float = 5.0
    factor: float = 2.0
    cap_s: float = 60.0


@dataclass
class _Failure:
    session: int
    count: int
    until: float


@dataclass
class Backoff:
    """Agents sitting out after a failed assignment; see the module docstring."""

    config: BackoffConfig = field(default_factory=BackoffConfig)
    failures: dict[str, _Failure] = field(default_factory=dict)

    def fail(self, agent_id: str, session: int, now: float) -> float:
        """Record a failure; returns how long the agent now sits out."""
        prev = self.failures.get(agent_id)
        count = prev.count + 1 if prev is not None and prev.session == session else 1
        c = self.config
        wait = min(c.cap_s, c.base_s * c.factor ** (count - 1))
        self.failures[agent_id] = _Failure(session, count, now + wait)
        return wait

    def eligible(self, agent_id: str, session: int, now: float) -> bool:
        """May the agent be planned on? Yes after its back-off, or at once in a new session."""
        rec = self.failures.get(agent_id)
        return rec is None or rec.session != session or now >= rec.until

    def clear(self, agent_id: str) -> None:
        """The agent reported ready: forget its failures."""
        self.failures.pop(agent_id, None)

    def next_expiry(self, now: float) -> float | None:
        """The earliest time an agent's back-off ends after ``now`` (to re-plan then)."""
        ends = [f.until for f in self.failures.values() if f.until > now]
        return min(ends) if ends else None


Layout = tuple[tuple[int, int, tuple[str, ...], str], ...]


def layout(plan: PlanMessage | None, stages: Sequence[PlanStage] | None = None) -> Layout:
    """What a plan (or a list of its stages) runs where: per stage (start, end, agents in
    a canonical order, artifact). Equal layouts: nothing to republish."""
    chosen = stages if stages is not None else (plan.stages if plan is not None else [])
    return tuple(
        (s.start_segment, s.end_segment, tuple(sorted(s.agents)), s.artifact) for s in chosen
    )


def adopt_problem(
    plan: PlanMessage,
    model: str,
    strategy: str,
    compression: str,
    agents: Mapping[str, AgentState],
    objective: str | None = None,
) -> str | None:
    """Why a retained plan cannot be served as is by this planner (None: adopt it;
    ``objective`` None: any objective will do).

    The artifacts are checked separately (rebuilding the cut must give the same shas).
    """
    if plan.model != model:
        return f"it is for model {plan.model!r}, not {model!r}"
    if not plan.stages:
        return "it has no stages" + (f" ({plan.reason})" if plan.reason else "")
    if plan.strategy != strategy:
        return f"it was made by strategy {plan.strategy!r}, not {strategy!r}"
    if objective is not None and plan.objective != objective:
        return f"it was planned for objective {plan.objective!r}, not {objective!r}"
    if plan.compression != compression:
        return f"it uses compression {plan.compression or 'none'!r}, not {compression or 'none'!r}"
    for stage in plan.stages:
        for agent_id in stage.agents:
            view = agents.get(agent_id)
            if view is None or not view.usable:
                return f"agent {agent_id} is not online"
            rep = view.reported
            if (
                rep is None
                or rep.state != "ready"
                or (rep.plan_id, rep.plan_version) != (plan.plan_id, plan.plan_version)
            ):
                return f"agent {agent_id} does not report plan v{plan.plan_version} ready"
    return None


@dataclass(frozen=True)
class LoadShiftConfig:
    # busy above this ... (0.8, not 0.9: an agent saturated by a CPU hog in its cgroup
    # averaged 0.8-0.85, its own data-plane work sharing the same throttled CPU)
    high: float = 0.8
    low: float = 0.6  # ... until below this (hysteresis band)
    hold_s: float = 10.0  # busy for this long before it is derated
    recover_s: float = 30.0  # and below ``low`` this long before it gets its work back
    fleet_gap: float = 0.3  # while the rest of the fleet's median is at least this much lower
    max_load: float = 0.8  # the load a derated agent is planned with (cost: 1/(1-load))


@dataclass
class LoadShift:
    """Agents planned with a reduced effective rate; see the module docstring.

    Decisions read each agent's *mean* busy fraction over the window (``hold_s`` to be
    derated, ``recover_s`` to get its work back), not every sample: telemetry reports
    the compute that finished in each 1 s interval, so an agent busy all the time with
    0.5-1 s stages reports 0.6, 1.0, 0.7, ... and a rule "every sample above ``high``"
    almost never held for 10 s on real load (measured: tests/integration/test_load_shift.py).
    A window counts only once it has been observed for its whole length since the last
    change of that agent or the last new plan (:meth:`restart`): a full window of
    evidence about the plan being served.
    """

    config: LoadShiftConfig = field(default_factory=LoadShiftConfig)
    derated: dict[str, float] = field(default_factory=dict)  # agent -> load planned with
    _samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _since: dict[str, float] = field(default_factory=dict)  # agent -> first sample kept

    def _mean(self, agent_id: str, now: float, window: float) -> float | None:
        """Mean busy over the last ``window`` s, None until observed that long."""
        since = self._since.get(agent_id)
        if since is None or now - since < window:
            return None
        recent = [v for t, v in self._samples.get(agent_id, []) if t >= now - window]
        return statistics.fmean(recent) if recent else None

    def restart(self, now: float) -> None:
        """A new plan serves from ``now``: every window starts again (busy while stages
        were loading, or idle while agents switched, says nothing about the new plan)."""
        for agent_id in self._since:
            self._since[agent_id] = now
            self._samples[agent_id] = []

    def observe(self, loads: Mapping[str, float], now: float, serving: bool = True) -> bool:
        """Fold the agents' current busy fractions in; True when the derated set changed.

        ``serving`` False: the planned plan is not ready yet (agents still loading its
        stages) -- nothing is kept or decided: an agent idle while a peer loads is not an
        agent whose load went away (measured: a derated agent got its work back before
        the derating plan had served a request, as loading took 19 s on a slow board).
        """
        if not serving:
            return False
        c = self.config
        keep = max(c.hold_s, c.recover_s)
        changed = False
        for agent_id in list(self._since):
            if agent_id not in loads:  # gone: the next plan does not use it anyway
                changed |= self.derated.pop(agent_id, None) is not None
                self._since.pop(agent_id, None)
                self._samples.pop(agent_id, None)
        for agent_id, load in loads.items():
            self._since.setdefault(agent_id, now)
            samples = self._samples.setdefault(agent_id, [])
            samples.append((now, load))
            samples[:] = [(t, v) for t, v in samples if t >= now - keep]
        means = {a: self._mean(a, now, c.hold_s) for a in loads}
        before = set(self.derated)  # every decision reads the fleet as it was planned
        decided = []
        for agent_id in loads:
            if agent_id in before:
                mean = self._mean(agent_id, now, c.recover_s)
                if mean is not None and mean < c.low:
                    del self.derated[agent_id]
                    decided.append(agent_id)
                continue
            mean = means[agent_id]
            # the rest of the fleet is the agents planned at their measured rate: a derated
            # agent is planned with a made-up one, so the plan gives it too little or too
            # much and its busy fraction says nothing about the others' (the work taken
            # from it makes its peer busy: derating that peer too gave the work back)
            others = [
                m for a, m in means.items() if a != agent_id and m is not None and a not in before
            ]
            if not others:
                continue  # nobody to compare with: busy is the plan's doing, not a hog's
            rest = statistics.median(others)
            if mean is not None and mean > c.high and rest <= mean - c.fleet_gap:
                self.derated[agent_id] = min(c.max_load, mean)
                decided.append(agent_id)
        if decided:  # the next plan moves everyone's work: each window starts again
            for agent_id in loads:
                self._since[agent_id] = now + 1e-9
                self._samples[agent_id] = []
            changed = True
        return changed


def candidates(
    devices: Sequence[Device],
    sessions: Mapping[str, int],
    backoff: Backoff,
    shift: LoadShift,
    now: float,
) -> tuple[list[Device], list[str]]:
    """The usable devices to plan on (derated ones with their effective rate: planned with
    the load they were derated at), and the agents sitting out a back-off."""
    out, sitting_out = [], []
    for d in devices:
        if not backoff.eligible(d.agent_id, sessions.get(d.agent_id, 0), now):
            sitting_out.append(d.agent_id)
            continue
        derate = shift.derated.get(d.agent_id)
        out.append(d if derate is None else dataclasses.replace(d, load=derate))
    return out, sitting_out
