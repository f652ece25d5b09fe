"""The planner's pure re-planning policy (planner/replan.py) and the client's request tracker."""

from __future__ import annotations

import asyncio

from edgeslice.broker.fleetstate import AgentState
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    AssignmentReported,
    Info,
    PlanMessage,
    PlannerStatus,
    PlanStage,
)
from edgeslice.client.requests import InFlight, RequestTracker, no_plan_reason, routable
from edgeslice.planner.costmodel import Device
from edgeslice.planner.replan import (
    JOIN,
    LEAVE,
    Backoff,
    LoadShift,
    LoadShiftConfig,
    ReplanSchedule,
    adopt_problem,
    candidates,
    classify,
    first_plan_gate,
    layout,
    reconnect_wait,
)


def _plan(*stages: tuple[str, ...], ready: bool = True, version: int = 1) -> PlanMessage:
    return PlanMessage(
        model="m",
        plan_id="p",
        plan_version=version,
        objective="throughput",
        strategy="edgeslice",
        stages=[PlanStage(i, i, i + 1, list(a), artifact=f"sha{i}") for i, a in enumerate(stages)],
        ready=ready,
    )


def test_a_leave_replans_now_and_joins_wait_for_quiet() -> None:
    assert classify(frozenset("ab"), frozenset("a")) == LEAVE
    assert classify(frozenset("a"), frozenset("ab")) == JOIN
    assert classify(frozenset("ab"), frozenset("ac")) == LEAVE  # a leave wins
    assert classify(frozenset("a"), frozenset("a")) is None
    s = ReplanSchedule(delay_s=2.0)
    assert s.wait_s(0.0) is None
    s.join(10.0)
    s.join(11.0)  # a burst of joins: quiet counts from the last one
    assert s.wait_s(11.0) == 2.0 and not s.take(12.9)
    s.leave(12.0)  # a leave does not wait
    assert s.wait_s(12.0) == 0.0
    s.join(12.0)  # ... and a join right after it does not delay it
    assert s.take(12.0) and s.wait_s(12.0) is None


def test_min_agents_gates_only_the_first_plan() -> None:
    assert first_plan_gate(2, 3, served_before=False) is not None
    assert "need 3" in (first_plan_gate(2, 3, served_before=False) or "")
    assert first_plan_gate(3, 3, served_before=False) is None
    assert first_plan_gate(1, 3, served_before=True) is None


def test_backoff_grows_caps_clears_and_a_new_session_is_eligible_at_once() -> None:
    b = Backoff()
    waits = [b.fail("a", 1, 0.0) for _ in range(6)]
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert not b.eligible("a", 1, 59.0) and b.eligible("a", 1, 60.0)
    assert b.eligible("a", 2, 1.0)  # restarted: a new session
    assert b.next_expiry(0.0) == 60.0
    b.clear("a")
    assert b.eligible("a", 1, 0.0) and b.next_expiry(0.0) is None
    assert b.fail("a", 2, 100.0) == 5.0  # counting starts over in a new session


def test_layout_and_adoption_of_a_retained_plan() -> None:
    plan = _plan(("a",), ("b",))
    assert layout(plan) == ((0, 1, ("a",), "sha0"), (1, 2, ("b",), "sha1"))
    assert layout(None) == ()
    swapped = _plan(("b", "a"))
    assert layout(swapped) == layout(None, [PlanStage(0, 0, 1, ["a", "b"], artifact="sha0")])

    def agent(agent_id: str, state: str = "ready", version: int = 1) -> AgentState:
        view = AgentState(agent_id, online=True, state="online", session=3)
        view.info = Info(agent_id=agent_id, profile="p", session=3)
        view.reported = AssignmentReported(agent_id, "p", version, state)
        return view

    agents = {"a": agent("a"), "b": agent("b")}
    assert adopt_problem(plan, "m", "edgeslice", "", agents) is None
    assert "model" in (adopt_problem(plan, "other", "edgeslice", "", agents) or "")
    assert "strategy" in (adopt_problem(plan, "m", "amp4ec", "", agents) or "")
    assert adopt_problem(plan, "m", "edgeslice", "", agents, plan.objective) is None
    other = "latency" if plan.objective != "latency" else "throughput"
    assert "objective" in (adopt_problem(plan, "m", "edgeslice", "", agents, other) or "")
    assert "compression" in (adopt_problem(plan, "m", "edgeslice", "fp16", agents) or "")
    assert "b" in (adopt_problem(plan, "m", "edgeslice", "", {"a": agents["a"]}) or "")
    stale = {**agents, "b": agent("b", version=0)}
    assert "ready" in (adopt_problem(plan, "m", "edgeslice", "", stale) or "")
    draining = agent("b")
    draining.online, draining.state = False, "draining"
    assert "online" in (adopt_problem(plan, "m", "edgeslice", "", {**agents, "b": draining}) or "")


def test_load_shift_needs_a_hold_and_recovers_later_with_hysteresis() -> None:
    shift = LoadShift(LoadShiftConfig(high=0.9, low=0.6, hold_s=10.0, recover_s=30.0))
    hot = {"a": 0.95, "b": 0.3, "c": 0.3}
    assert not shift.observe(hot, 0.0)
    assert not shift.observe(hot, 9.0)  # not for long enough yet
    assert shift.observe(hot, 10.0) and shift.derated == {"a": 0.8}
    assert not shift.observe({"a": 0.7, "b": 0.3, "c": 0.3}, 11.0)  # in the band: stays
    assert not shift.observe({"a": 0.5, "b": 0.3, "c": 0.3}, 12.0)
    assert not shift.observe({"a": 0.5, "b": 0.3, "c": 0.3}, 30.0)  # recovering, not yet
    assert shift.observe({"a": 0.5, "b": 0.3, "c": 0.3}, 42.0) and shift.derated == {}
    busy_fleet = {"a": 0.95, "b": 0.9, "c": 0.92}  # everyone is busy: nobody is singled out
    assert not shift.observe(busy_fleet, 50.0) and not shift.observe(busy_fleet, 70.0)


def test_the_agent_that_took_a_derated_agents_work_is_not_derated_for_it() -> None:
    """The flap tests/integration/test_load_shift.py found: sa (a hog beside it) derated,
    its work moved to sb, which is then the busy one; judged against sa, sb was derated
    too and the next plan gave sa its work back with the hog still running."""
    shift = LoadShift(LoadShiftConfig(high=0.8, low=0.6, hold_s=4.0, recover_s=20.0))
    for t in range(4):
        assert not shift.observe({"sa": 1.0, "sb": 0.5}, float(t))
    assert shift.observe({"sa": 1.0, "sb": 0.5}, 4.0) and shift.derated == {"sa": 0.8}
    for t in range(5, 24):  # the derated plan: sb busy with sa's work, sa (hogged) idles
        assert not shift.observe({"sa": 0.4, "sb": 1.0}, float(t)), f"changed at t={t}"
    assert shift.derated == {"sa": 0.8}
    # with a third agent the comparison is sb against sc: a second hog is still found
    shift = LoadShift(LoadShiftConfig(high=0.8, low=0.6, hold_s=4.0, recover_s=20.0))
    shift.derated["sa"] = 0.8
    for t in range(4):
        assert not shift.observe({"sa": 0.4, "sb": 1.0, "sc": 0.95}, float(t))  # both took work
    assert not shift.observe({"sa": 0.4, "sb": 1.0, "sc": 0.95}, 4.0)
    changed = [t for t in range(5, 12) if shift.observe({"sa": 0.4, "sb": 1.0, "sc": 0.4}, t)]
    assert len(changed) == 1 and shift.derated == {"sa": 0.8, "sb": 0.8}


def test_the_agent_busy_with_a_recovering_agents_work_is_not_derated_when_it_recovers() -> None:
    """The victim gets its work back after ``recover_s`` below ``low``; its peer, busy
    with that work until the next plan, was derated in the same breath (a flip with no
    hog at all). Every window starts again with the next plan instead."""
    shift = LoadShift(LoadShiftConfig(high=0.8, low=0.6, hold_s=4.0, recover_s=20.0))
    for t in range(5):
        shift.observe({"sa": 0.5, "sb": 1.0}, float(t))
    assert shift.derated == {"sb": 0.8}
    changes = [t for t in range(5, 26) if shift.observe({"sa": 1.0, "sb": 0.1}, float(t))]
    assert changes == [25] and shift.derated == {}  # sb back after 20 s; sa not derated
    # the plan after: both at work, nobody singled out
    assert not any(shift.observe({"sa": 0.9, "sb": 0.85}, float(t)) for t in range(26, 60))


def test_tracker_resends_off_lost_agents_and_counts_late_duplicates() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        tracker = RequestTracker()
        req = InFlight("r1", [], b"", 0.0, loop.create_future(), route=["a", "b"], plan_version=1)
        other = InFlight("r2", [], b"", 0.0, loop.create_future(), route=["c", "b"], plan_version=1)
        tracker.add(req)
        tracker.add(other)
        v1 = _plan(("a", "c"), ("b",))
        assert tracker.to_resend(v1, set()) == []
        assert tracker.to_resend(v1, {"a"}) == [req]  # its last will: re-send at once
        v2 = _plan(("c",), ("b",), version=2)
        assert tracker.to_resend(v2, set()) == [req]  # the plan dropped a
        assert tracker.to_resend(v2, set(), via="b", before=1.0) == [req, other]
        assert len(tracker.to_resend(None, set(), everything=True)) == 2
        assert tracker.is_stale_error(req, 0, 0, "c")  # from a route it no longer has
        assert not tracker.is_stale_error(req, 0, 0, "a")
        req.future.set_result(None)  # type: ignore[arg-type]
        assert tracker.count_duplicate("r1")  # answered: a second result is a duplicate
        tracker.close("r1")
        assert tracker.count_duplicate("r1") and tracker.duplicates == 2
        assert not tracker.count_duplicate("r2")

    asyncio.run(scenario())


def test_routable_and_no_plan_reasons() -> None:
    plan = _plan(("a", "b"), ("c",))
    assert routable(plan, set()) and routable(plan, {"a"}) and not routable(plan, {"c"})
    assert not routable(_plan(("a",), ready=False), set())
    withdrawn = PlanMessage("m", "p", 3, "throughput", "edgeslice", [], reason="no usable agent")
    assert no_plan_reason(withdrawn, None, set()) == "no usable agent"
    will = PlannerStatus(state=OFFLINE)  # its last will: it may come back, keep waiting
    assert no_plan_reason(plan, will, {"c"}) == ""
    gone = PlannerStatus(state=OFFLINE, summary="stopped", ts=1.0)
    assert no_plan_reason(plan, gone, set()) == ""  # a kept plan serves while agents live
    assert "planner is offline" in no_plan_reason(plan, gone, {"c"})
    assert no_plan_reason(None, gone, set()) == ""  # a planner may be starting: wait


def test_candidates_leave_out_backed_off_agents_and_derate_hot_ones() -> None:
    devices = [
        Device(a, gflops=1.0, memory_bytes=1 << 30, bandwidth_bps=1e6, rtt_s=0.001) for a in "abc"
    ]
    backoff, shift = Backoff(), LoadShift()
    backoff.fail("b", 1, 0.0)
    shift.derated["c"] = 0.8
    out, sitting_out = candidates(devices, {"a": 1, "b": 1, "c": 1}, backoff, shift, 1.0)
    assert [d.agent_id for d in out] == ["a", "c"] and sitting_out == ["b"]
    assert out[0].load == 0.0 and out[1].load == 0.8  # planned with its effective rate


def test_after_a_reconnect_the_planner_waits_for_silent_plan_agents_until_the_grace_ends() -> None:
    plan_agents, none = frozenset({"a", "b"}), frozenset[str]()
    assert reconnect_wait(plan_agents, none, none, now=1.0, until=11.0) == 10.0
    assert reconnect_wait(plan_agents, frozenset({"a"}), none, now=4.0, until=11.0) == 7.0
    assert reconnect_wait(plan_agents, frozenset({"a", "b", "c"}), none, 4.0, 11.0) == 0.0  # back
    # b said something since the reconnect (draining, its will): news, nothing to wait for
    assert reconnect_wait(plan_agents, frozenset({"a"}), frozenset({"b"}), 4.0, 11.0) == 0.0
    assert reconnect_wait(plan_agents, frozenset({"a"}), none, now=11.0, until=11.0) == 0.0  # over
    assert reconnect_wait(none, none, none, now=1.0, until=11.0) == 0.0  # no plan served
