"""agent.pacing: the paced emulation's arithmetic (pure), the pacer on fake clocks, its hooks
in the runtime (stages and calibration go through the same pacer) and its memory-only cgroup."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeslice.agent import pacing
from edgeslice.agent.cgroupclean import remove_agent_cgroups
from edgeslice.agent.limits import group_name
from edgeslice.agent.pacing import (
    MIN_HOST_SECONDS,
    PacePlan,
    Pacer,
    calibration_host_seconds,
    device_seconds,
    emulate_paced,
    hold_seconds,
    pace_factor,
    paced_rate,
    plan_pacing,
)
from edgeslice.agent.runtime import LoadedStage, StageInfo, measure_gflops
from edgeslice.broker.protocol.artifacts import TensorSpec
from edgeslice.firmware_profiles import load_profile

MIB = 1024 * 1024


# -- arithmetic -------------------------------------------------------------------------------
def test_factor_is_host_core_over_device_rate() -> None:
    assert pace_factor(100.0, 25.0) == pytest.approx(4.0)
    plan = plan_pacing(load_profile("rpi4-4gb"), 100.0, host_cpus=2)
    assert plan.factor == pytest.approx(10.0) and plan.threads == 1
    assert plan.device_gflops == 10.0 and plan.memory_bytes == 4096 * MIB


def test_profiles_keep_their_ratio_in_device_time() -> None:
    rpi5 = plan_pacing(load_profile("rpi5-8gb"), 47.0, host_cpus=2)
    rpi4 = plan_pacing(load_profile("rpi4-4gb"), 47.0, host_cpus=2)
    rpi3 = plan_pacing(load_profile("rpi3b"), 47.0, host_cpus=2)
    work = 0.010  # CPU seconds of one stage on this host
    t5, t4, t3 = (device_seconds(work, p.factor) for p in (rpi5, rpi4, rpi3))
    assert t4 / t5 == pytest.approx(2.5) and t3 / t4 == pytest.approx(10 / 3)
    assert t4 == pytest.approx(work * 4.7)


def test_scale_multiplies_the_device_rate() -> None:
    half = plan_pacing(load_profile("rpi5-8gb"), 100.0, scale=0.5, host_cpus=2)
    assert half.device_gflops == 12.5 and half.factor == pytest.approx(8.0)
    with pytest.raises(ValueError, match="emulate-scale"):
        plan_pacing(load_profile("rpi5-8gb"), 100.0, scale=0.0)
    with pytest.raises(ValueError, match="> 0"):
        pace_factor(0.0, 10.0)


def test_a_device_faster_than_one_host_core_gets_threads() -> None:
    laptop = load_profile("x86-laptop")  # 80 GFLOP/s, 4 cores
    assert plan_pacing(laptop, 50.0, host_cpus=8).threads == 2  # factor 0.625
    assert plan_pacing(laptop, 10.0, host_cpus=2).threads == 2  # capped by the host
    assert plan_pacing(laptop, 5.0, host_cpus=64).threads == 4  # capped by the board


def test_hold_is_measured_from_the_start_and_never_negative() -> None:
    # 10 ms of CPU on a x4 device = 40 ms; 12 ms of wall already passed -> hold 28 ms
    assert hold_seconds(100.0, 100.012, 0.010, 4.0) == pytest.approx(0.028)
    # the host was slower than the device (contention): nothing to hold
    assert hold_seconds(100.0, 100.050, 0.010, 4.0) == 0.0
    assert device_seconds(-1.0, 4.0) == 0.0


def test_paced_rate_divides_the_work_by_the_paced_time() -> None:
    assert paced_rate(100.0, 0.1, 0.4) == pytest.approx(25.0)
    assert paced_rate(100.0, 0.1, 0.05) == pytest.approx(100.0)  # never faster than the host
    assert calibration_host_seconds(2.0, 4.0) == pytest.approx(0.5)
    assert calibration_host_seconds(0.5, 33.0) == MIN_HOST_SECONDS


# -- the pacer on fake clocks -----------------------------------------------------------------
class FakeClocks:
    """Wall and CPU clocks a test advances by hand; sleep advances the wall clock."""

    def __init__(self) -> None:
        self.wall = 1000.0
        self.cpu = 5.0
        self.slept: list[float] = []

    def work(self, cpu_s: float, wall_s: float) -> None:
        self.cpu += cpu_s
        self.wall += wall_s

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.wall += seconds


def _pacer(factor: float, clocks: FakeClocks) -> Pacer:
    plan = PacePlan(device_gflops=100.0 / factor, host_core_gflops=100.0, threads=1, memory_bytes=0)
    return Pacer(plan, clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu, sleep=clocks.sleep)


def test_pacer_holds_a_stage_for_the_device_time() -> None:
    clocks = FakeClocks()
    pacer = _pacer(4.0, clocks)
    start = clocks.wall
    assert pacer.run(lambda x: (clocks.work(0.010, 0.011), x * 2)[1], 21) == 42
    assert clocks.wall - start == pytest.approx(0.040)  # released at the device's time
    assert clocks.slept == [pytest.approx(0.029)]
    assert (pacer.calls, pacer.late) == (1, 0) and pacer.held_s == pytest.approx(0.029)


def test_pacer_does_not_hold_work_that_was_already_late() -> None:
    clocks = FakeClocks()
    pacer = _pacer(2.0, clocks)
    pacer.run(clocks.work, 0.010, 0.030)  # a busy host: 30 ms of wall for 10 ms of CPU
    assert clocks.slept == [] and pacer.late == 1


def test_pacer_holds_even_when_the_work_raises() -> None:
    clocks = FakeClocks()
    pacer = _pacer(3.0, clocks)

    def fails() -> None:
        clocks.work(0.010, 0.010)
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        pacer.run(fails)
    assert clocks.slept == [pytest.approx(0.020)]  # the device spent its time before failing


def test_back_to_back_stages_queue_like_on_one_device() -> None:
    clocks = FakeClocks()
    pacer = _pacer(5.0, clocks)
    start = clocks.wall
    for _ in range(4):
        pacer.run(clocks.work, 0.002, 0.002)
    assert clocks.wall - start == pytest.approx(4 * 0.010)


# -- hooks in the runtime ---------------------------------------------------------------------
@pytest.fixture
def installed() -> Iterator[Pacer]:
    plan = plan_pacing(load_profile("rpi4-4gb"), 100.0, host_cpus=2)
    slept: list[float] = []
    pacer = Pacer(plan, sleep=slept.append)  # real clocks, no real sleeping
    pacing.install(pacer)
    try:
        yield pacer
    finally:
        pacing.install(None)


def test_stage_runs_go_through_the_installed_pacer(installed: Pacer) -> None:
    spec = TensorSpec((1, 4), "float32", "x")
    info = StageInfo("0" * 64, "m", 0, 0, 1, (spec,), (spec,), 0, torch.__version__)
    stage = LoadedStage(info, lambda x: x + 1)
    (out,) = stage.run([torch.zeros(1, 4)])
    assert torch.equal(out, torch.ones(1, 4))
    assert installed.calls == 1


def test_calibration_goes_through_the_same_pacer(installed: Pacer) -> None:
    before = installed.calls
    rate = measure_gflops(0.05, 1)  # the runtime's entry point, as the agent service calls it
    assert installed.calls == before + pacing.CALIBRATION_ROUNDS  # the best round counts
    assert rate > 0


def test_without_a_pacer_nothing_is_paced() -> None:
    assert pacing.current() is None  # no --emulate: the runtime runs at host speed


# -- the memory-only cgroup -------------------------------------------------------------------
def _fake_v2(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "cgroup.subtree_control").write_text("")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/\n")
    return root, proc


@pytest.fixture
def fast_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgeslice.agent.quota.host_core_gflops", lambda seconds=0.3: 100.0)


def test_paced_emulation_limits_memory_only(tmp_path: Path, fast_host: None) -> None:
    root, proc = _fake_v2(tmp_path)
    applied, info, pacer = emulate_paced("pi-4", load_profile("rpi4-4gb"), 1.0, root, proc)
    group = root / "edgeslice" / "pi-4"
    assert applied is not None and applied.groups == (group,)
    assert (group / "cpu.max").read_text() == "max 100000"  # no quota: nothing bursts
    assert (group / "memory.max").read_text() == str(4096 * MIB)
    assert info["mode"] == "paced" and info["cgroup"] == "cgroup-v2"
    assert info["device_gflops"] == 10.0 and info["pace_factor"] == pytest.approx(10.0)
    assert pacer.factor == pytest.approx(10.0) and pacing.current() is None  # caller installs


def test_two_fleets_with_the_same_agent_id_get_their_own_groups(
    tmp_path: Path, fast_host: None
) -> None:
    """Agent ids are unique within a namespace only: a benchmark's rpi4-4gb-1 beside a test
    fleet's rpi4-4gb-1 must not share (or clean up) one group."""
    root, proc = _fake_v2(tmp_path)
    profile = load_profile("rpi4-4gb")
    a, _, _ = emulate_paced("rpi4-4gb-1", profile, 1.0, root, proc, namespace="bench")
    b, _, _ = emulate_paced("rpi4-4gb-1", profile, 1.0, root, proc, namespace="tests")
    assert a is not None and b is not None
    assert a.groups == (root / "edgeslice" / "bench@rpi4-4gb-1",)
    assert b.groups == (root / "edgeslice" / "tests@rpi4-4gb-1",)
    # clean-up of one fleet looks at its own group only (here: still holding a process)
    left = remove_agent_cgroups(group_name("tests", "rpi4-4gb-1"), root)
    assert len(left) == 1 and "tests@rpi4-4gb-1: 1 live process" in left[0]
    assert a.groups[0].is_dir()


def test_paced_emulation_without_cgroups_still_paces(
    tmp_path: Path, fast_host: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgeslice.agent.pacing"):
        applied, info, pacer = emulate_paced("pi-3", load_profile("rpi3b"), root=tmp_path / "x")
    assert applied is None and pacer.factor == pytest.approx(100 / 3)
    assert info["mode"] == "paced" and info["memory"] == "unlimited" and info["reason"]
    assert "NOT limited" in caplog.text


# -- the fleet file ---------------------------------------------------------------------------
def test_fleet_files_choose_the_mode_per_fleet_or_agent() -> None:
    from edgeslice.broker.protocol.errors import ConfigError
    from edgeslice.lab.testbed import parse_fleet

    agents = [{"profile": "rpi4-4gb"}, {"profile": "rpi3b", "emulate_mode": "paced"}]
    default = parse_fleet({"agents": agents}).agents
    assert [a.emulate_mode for a in default] == ["paced", "paced"]
    mixed = parse_fleet({"emulate_mode": "quota", "agents": agents}).agents
    assert [a.emulate_mode for a in mixed] == ["quota", "paced"]
    with pytest.raises(ConfigError, match="emulate_mode"):
        parse_fleet({"agents": [{"profile": "rpi3b", "emulate_mode": "fast"}]})


# -- steady CPU time ---------------------------------------------------------------------------
def test_a_program_is_charged_its_steady_cpu_time() -> None:
    clocks = FakeClocks()
    pacer = _pacer(10.0, clocks)
    key = pacing.program_key("a" * 64, [torch.zeros(1, 3)])
    start = clocks.wall
    pacer.run(clocks.work, 0.002, 0.002, key=key)  # first run: charged in full
    assert clocks.wall - start == pytest.approx(0.020)
    start = clocks.wall
    pacer.run(clocks.work, 0.005, 0.005, key=key)  # contended: 2.5x the CPU time
    assert clocks.wall - start == pytest.approx(0.020)  # charged the steady 2 ms, not 5
    assert pacer.uncharged_cpu_s == pytest.approx(0.003)
    start = clocks.wall
    pacer.run(clocks.work, 0.005, 0.005)  # no key (calibration): charged its own time
    assert clocks.wall - start == pytest.approx(0.050)


def test_steady_time_is_kept_per_artifact_and_shape() -> None:
    clocks = FakeClocks()
    pacer = _pacer(10.0, clocks)
    pacer.run(clocks.work, 0.001, 0.001, key=pacing.program_key("a" * 64, [torch.zeros(1, 3)]))
    start = clocks.wall
    # a batch of 4 is other work: not charged the single request's 1 ms
    pacer.run(clocks.work, 0.003, 0.003, key=pacing.program_key("a" * 64, [torch.zeros(4, 3)]))
    assert clocks.wall - start == pytest.approx(0.030)
    start = clocks.wall
    pacer.run(clocks.work, 0.004, 0.004, key=pacing.program_key("b" * 64, [torch.zeros(1, 3)]))
    assert clocks.wall - start == pytest.approx(0.040)


def test_the_window_forgets_old_runs_and_one_charges_every_run() -> None:
    clocks = FakeClocks()
    plan = PacePlan(device_gflops=10.0, host_core_gflops=100.0, threads=1, memory_bytes=0)
    pacer = Pacer(plan, lambda: clocks.wall, lambda: clocks.cpu, clocks.sleep, window=2)
    key = pacing.program_key("a" * 64, [torch.zeros(1)])
    for cpu in (0.001, 0.004, 0.004):
        start = clocks.wall
        pacer.run(clocks.work, cpu, cpu, key=key)
    assert clocks.wall - start == pytest.approx(0.040)  # the 1 ms run left the window
    every = Pacer(plan, lambda: clocks.wall, lambda: clocks.cpu, clocks.sleep, window=1)
    every.run(clocks.work, 0.001, 0.001, key=key)
    start = clocks.wall
    every.run(clocks.work, 0.004, 0.004, key=key)
    assert clocks.wall - start == pytest.approx(0.040)


def test_window_from_env() -> None:
    assert pacing.window_from_env(None) == pacing.STEADY_WINDOW
    assert pacing.window_from_env("1") == 1
    with pytest.raises(ValueError, match="EDGESLICE_PACE_WINDOW"):
        pacing.window_from_env("0")
    with pytest.raises(ValueError, match="whole number"):
        pacing.window_from_env("many")


def test_stage_runs_are_charged_their_steady_time(installed: Pacer) -> None:
    spec = TensorSpec((1, 4), "float32", "x")
    info = StageInfo("0" * 64, "m", 0, 0, 1, (spec,), (spec,), 0, torch.__version__)
    stage = LoadedStage(info, lambda x: x + 1)
    for _ in range(3):
        stage.run([torch.zeros(1, 4)])
    assert installed.calls == 3 and len(installed._recent) == 1  # one program, one history


def test_env_window_checks_the_host_rate_too() -> None:
    assert pacing.env_window({}) == pacing.STEADY_WINDOW
    assert (
        pacing.env_window({"EDGESLICE_HOST_CORE_GFLOPS": "120.5", "EDGESLICE_PACE_WINDOW": "4"})
        == 4
    )
    with pytest.raises(ValueError, match="EDGESLICE_HOST_CORE_GFLOPS"):
        pacing.env_window({"EDGESLICE_HOST_CORE_GFLOPS": "fast"})


def test_a_shared_host_rate_is_used_instead_of_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeslice.agent import quota

    monkeypatch.setenv(quota.HOST_RATE_ENV, "123.0")
    assert quota.host_core_gflops() == 123.0
    monkeypatch.delenv(quota.HOST_RATE_ENV)
    assert quota.host_core_gflops(seconds=0.03, rounds=2) > 0


def test_a_paced_calibration_reports_about_the_device_rate() -> None:
    from edgeslice.agent.quota import host_core_gflops

    host = host_core_gflops(seconds=0.1, rounds=3)
    plan = PacePlan(device_gflops=host / 3, host_core_gflops=host, threads=1, memory_bytes=0)
    pacer = Pacer(plan)
    rate = pacer.measure_gflops(0.3, 1)  # 3 rounds, each held to 3x its CPU time
    assert pacer.calls == pacing.CALIBRATION_ROUNDS
    assert 0.6 * host / 3 < rate < 1.4 * host / 3, (rate, host)
