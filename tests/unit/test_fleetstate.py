"""The one fold of fleet messages: sessions, usability, load, staleness, plans."""

from __future__ import annotations

import pytest

from edgeslice.broker.fleetstate import FleetState
from edgeslice.broker.protocol import codec
from edgeslice.broker.protocol.errors import ProtocolError
from edgeslice.broker.protocol.messages import (
    OFFLINE,
    ONLINE,
    AssignmentReported,
    Info,
    PlanMessage,
    Status,
    Telemetry,
)
from edgeslice.broker.protocol.topics import Topics

T = Topics("unit")


def _fold(fleet: FleetState, topic: str, msg: object, now: float = 0.0) -> str | None:
    return fleet.apply(topic, codec.encode(msg), now)  # type: ignore[arg-type]


def test_usable_needs_online_status_and_info_of_the_same_session() -> None:
    fleet = FleetState(T)
    assert _fold(fleet, T.status("a"), Status("a", ONLINE, session=2)) == "a"
    assert fleet.usable_ids() == frozenset()
    _fold(fleet, T.info("a"), Info("a", "p", session=1))  # left over from the last run
    assert fleet.usable_ids() == frozenset()
    _fold(fleet, T.info("a"), Info("a", "p", session=2))
    assert fleet.usable_ids() == {"a"}
    _fold(fleet, T.status("a"), Status("a", OFFLINE, session=2, reason="lost"))
    state = fleet.agents["a"]
    assert fleet.usable_ids() == frozenset() and state.offline_reason == "lost"


def test_load_is_stage_worker_busy_and_stale_telemetry_counts_as_zero() -> None:
    fleet = FleetState(T, stale_after_s=5.0)
    tel = Telemetry("a", ts=0.0, cpu_percent=95.0, busy=0.25)
    _fold(fleet, T.telemetry("a"), tel, now=100.0)
    assert fleet.load("a", 101.0) == 0.25  # not the 95% host CPU
    assert fleet.load("a", 106.0) == 0.0
    assert fleet.agents["a"].fresh_telemetry(106.0, 5.0) is None
    _fold(fleet, T.telemetry("a"), Telemetry("a", ts=0.0, cpu_percent=0.0, busy=3.0), 200.0)
    assert fleet.load("a", 200.0) == 1.0  # clamped
    assert fleet.load("nobody", 0.0) == 0.0


def test_plans_are_kept_by_model_and_forgotten_when_cleared() -> None:
    fleet = FleetState(T)
    plan = PlanMessage("mlp", "p", 1, "latency", "edgeslice", stages=[])
    assert _fold(fleet, T.plan("mlp"), plan) is None
    assert fleet.plans["mlp"].plan_version == 1
    assert fleet.apply(T.plan("mlp"), b"", 0.0) is None
    assert fleet.plans == {}


def test_reports_are_folded_and_cleared_agent_topics_change_nothing() -> None:
    fleet = FleetState(T)
    report = AssignmentReported("a", "p", 3, "ready", stages=[0])
    assert _fold(fleet, T.assignment_reported("a"), report) == "a"
    assert fleet.agents["a"].reported == report
    assert fleet.apply(T.status("a"), b"", 0.0) is None
    with pytest.raises(ProtocolError):
        fleet.apply(T.status("a"), b"\xc1", 0.0)
    with pytest.raises(ProtocolError):
        fleet.apply("elsewhere/x", b"", 0.0)
