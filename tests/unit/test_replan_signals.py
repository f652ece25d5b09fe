"""Re-planning signals beyond joins and leaves: an agent that re-measured itself, and the
load-shift thresholds as planner options."""

from __future__ import annotations

import dataclasses

import pytest

from edgeslice.broker.protocol.errors import ConfigError
from edgeslice.broker.protocol.messages import Info
from edgeslice.broker.settings import parse_broker_url
from edgeslice.planner.config import PlannerConfig
from edgeslice.planner.replan import LoadShift, LoadShiftConfig, capability_changed

INFO = Info(
    agent_id="a", profile="rpi4-4gb", gflops=10.0, link_bandwidth_bps=100e6, link_rtt_s=0.001
)


def test_a_link_that_dropped_is_a_capability_change() -> None:
    slow = dataclasses.replace(INFO, link_bandwidth_bps=0.5e6)  # 800 -> 4 Mbit/s
    assert capability_changed(INFO, slow)
    assert capability_changed(slow, INFO)  # and back up again
    assert capability_changed(INFO, dataclasses.replace(INFO, gflops=4.0))
    assert capability_changed(INFO, dataclasses.replace(INFO, link_rtt_s=0.05))


def test_drift_new_sessions_and_unknown_figures_are_not() -> None:
    assert not capability_changed(INFO, dataclasses.replace(INFO, link_bandwidth_bps=80e6))
    assert not capability_changed(INFO, dataclasses.replace(INFO, session=2, gflops=1.0))
    assert not capability_changed(INFO, dataclasses.replace(INFO, link_bandwidth_bps=0.0))
    assert not capability_changed(None, INFO)


def test_a_noisy_busy_signal_is_averaged_over_the_hold() -> None:
    """Telemetry counts the compute that finished in each second: a saturated agent with
    long stages reports 1.0, 0.7, 1.0, 0.7, ...; its mean, not every sample, decides."""
    shift = LoadShift(LoadShiftConfig(high=0.8, low=0.6, hold_s=10.0, recover_s=30.0))
    for t in range(10):
        assert not shift.observe({"a": 1.0 if t % 2 else 0.7, "b": 0.3}, float(t))
    assert shift.observe({"a": 1.0, "b": 0.3}, 10.0) and "a" in shift.derated
    for t in range(11, 41):  # less work now: idle-ish, but one busy second does not reset it
        assert not shift.observe({"a": 0.9 if t == 20 else 0.3, "b": 0.6}, float(t))
    assert shift.observe({"a": 0.3, "b": 0.6}, 41.0) and not shift.derated


def test_no_load_decision_while_the_next_plan_is_loading() -> None:
    """Derated, then idle while the derating plan loads: that is not the hog gone. The
    recovery window counts from the plan being ready (``restart``), not from the decision."""
    shift = LoadShift(LoadShiftConfig(high=0.8, low=0.6, hold_s=4.0, recover_s=20.0))
    for t in range(5):
        shift.observe({"a": 1.0, "b": 0.2}, float(t))
    assert "a" in shift.derated
    for t in range(5, 40):  # the new plan loads for 35 s: the agents are idle meanwhile
        assert not shift.observe({"a": 0.0, "b": 0.0}, float(t), serving=False)
    assert "a" in shift.derated
    shift.restart(40.0)
    for t in range(40, 60):
        assert not shift.observe({"a": 0.3, "b": 0.5}, float(t))
    assert shift.observe({"a": 0.3, "b": 0.5}, 60.0) and not shift.derated


def test_load_shift_thresholds_are_planner_options() -> None:
    fast = LoadShiftConfig(high=0.8, low=0.5, hold_s=2.0, recover_s=5.0)
    shift = LoadShift(fast)
    assert not shift.observe({"a": 0.95, "b": 0.2}, 0.0)
    assert shift.observe({"a": 0.95, "b": 0.2}, 2.0)  # derated after 2 s, not 10
    assert not shift.observe({"a": 0.1, "b": 0.2}, 3.0)
    assert shift.observe({"a": 0.1, "b": 0.2}, 8.0) and not shift.derated  # back after 5 s
    broker = parse_broker_url("mqtt://127.0.0.1:1883")
    assert PlannerConfig("mobilenetv2", broker, load_shift=fast).load_shift == fast
    bad = LoadShiftConfig(high=0.5, low=0.6)
    with pytest.raises(ConfigError, match="--busy-low must be below --busy-high"):
        PlannerConfig("mobilenetv2", broker, load_shift=bad)
