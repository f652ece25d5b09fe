"""agent.quota (arithmetic) and agent.limits (v1/v2 files on a fake root, unlimited fallback)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from edgeslice.agent.cgroupclean import remove_agent_cgroups
from edgeslice.agent.limits import (
    apply_limits,
    cgroup_problem,
    detect_layout,
    emulate_profile,
)
from edgeslice.agent.quota import cpu_period_quota, plan_emulation
from edgeslice.broker.protocol.errors import CgroupUnavailable
from edgeslice.firmware_profiles import load_profile

MIB = 1024 * 1024


# -- arithmetic -------------------------------------------------------------------------------
def test_quota_gives_the_profile_rate_on_one_host_core() -> None:
    plan = plan_emulation(load_profile("rpi4-4gb"), host_core_gflops=50.0, host_cpus=2)
    assert plan.cores == pytest.approx(0.2)
    assert plan.threads == 1
    assert plan.memory_bytes == 4096 * MIB
    assert plan.quota_us / plan.period_us == pytest.approx(0.2)


def test_profiles_keep_their_speed_ratio() -> None:
    rpi4 = plan_emulation(load_profile("rpi4-4gb"), 47.0, host_cpus=2)
    rpi5 = plan_emulation(load_profile("rpi5-8gb"), 47.0, host_cpus=2)
    rpi3 = plan_emulation(load_profile("rpi3b"), 47.0, host_cpus=2)
    assert rpi5.cores / rpi4.cores == pytest.approx(2.5, rel=1e-3)
    assert rpi4.cores / rpi3.cores == pytest.approx(10 / 3, rel=1e-3)


def test_scale_multiplies_the_quota() -> None:
    base = plan_emulation(load_profile("rpi5-8gb"), 50.0, host_cpus=2)
    half = plan_emulation(load_profile("rpi5-8gb"), 50.0, scale=0.5, host_cpus=2)
    assert half.cores == pytest.approx(base.cores / 2)
    assert half.scale == 0.5


def test_more_than_one_core_gets_threads_capped_by_host_and_profile() -> None:
    laptop = load_profile("x86-laptop")  # 80 GFLOP/s, 4 cores
    assert plan_emulation(laptop, 50.0, host_cpus=8).threads == 2  # 1.6 cores
    capped = plan_emulation(laptop, 10.0, host_cpus=2)  # would need 8 cores
    assert capped.cores == 2.0 and capped.threads == 2
    many = plan_emulation(laptop, 5.0, host_cpus=64)  # 16 cores, but the board has 4
    assert many.cores == 16.0 and many.threads == 4


def test_tiny_quota_floors_at_the_kernel_minimum() -> None:
    plan = plan_emulation(load_profile("rpi3b"), 1e6, host_cpus=2)
    assert plan.cores == 0.01
    assert plan.quota_us >= 1000 and plan.quota_us / plan.period_us == pytest.approx(0.01)


@pytest.mark.parametrize("cores", [0.01, 0.05, 0.2, 0.9, 1.5, 7.0])
def test_period_and_quota_stay_in_kernel_bounds(cores: float) -> None:
    period, quota = cpu_period_quota(cores)
    assert quota >= 1000 and 1000 <= period <= 1_000_000
    assert quota / period == pytest.approx(cores, rel=0.01)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="host single-core"):
        plan_emulation(load_profile("rpi4-4gb"), 0.0)
    with pytest.raises(ValueError, match="emulate-scale"):
        plan_emulation(load_profile("rpi4-4gb"), 50.0, scale=0.0)


# -- fake cgroup roots ------------------------------------------------------------------------
def _v1_root(tmp_path: Path, memory_own: str = "/sandbox/x") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for controller, files in {
        "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cgroup.procs"),
        "memory": ("memory.limit_in_bytes", "cgroup.procs"),
    }.items():
        (root / controller).mkdir(parents=True)
        for name in files:
            (root / controller / name).write_text("")
    (root / "memory" / memory_own.strip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"4:memory:{memory_own}\n2:cpu,cpuacct:/\n0::/\n")
    return root, proc


def _v2_root(tmp_path: Path, own: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_v1_limits_land_in_cpu_and_memory_groups_nested_in_the_own_cgroup(tmp_path: Path) -> None:
    root, proc = _v1_root(tmp_path)
    plan = plan_emulation(load_profile("rpi4-4gb"), 50.0, host_cpus=2)
    applied = apply_limits("pi-1", plan, 4242, root, proc)
    cpu = root / "cpu" / "edgeslice" / "pi-1"
    mem = root / "memory" / "sandbox" / "x" / "edgeslice" / "pi-1"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "20000"
    assert (mem / "memory.limit_in_bytes").read_text() == str(4096 * MIB)
    assert (cpu / "cgroup.procs").read_text() == "4242"
    assert (mem / "cgroup.procs").read_text() == "4242"
    info = applied.to_info()
    assert info["mode"] == "quota" and info["cgroup"] == "cgroup-v1"
    assert info["cgroups"] == [str(cpu), str(mem)]
    assert info["cpu_cores"] == pytest.approx(0.2) and info["memory_bytes"] == 4096 * MIB
    assert applied.origins == (root / "cpu", root / "memory" / "sandbox" / "x")


def test_v1_own_cgroup_missing_under_the_mount_falls_back_to_the_mount(tmp_path: Path) -> None:
    root, proc = _v1_root(tmp_path)
    proc.write_text("4:memory:/not/here\n1:cpu:/\n")
    applied = apply_limits("pi-2", plan_emulation(load_profile("rpi3b"), 50.0), None, root, proc)
    assert root / "memory" / "edgeslice" / "pi-2" in applied.groups


def test_v2_limits_enable_controllers_and_write_cpu_max(tmp_path: Path) -> None:
    root, proc = _v2_root(tmp_path, own="/edgeslice/old")  # never nest inside edgeslice/
    plan = plan_emulation(load_profile("rpi5-8gb"), 50.0, host_cpus=2)
    applied = apply_limits("pi-5", plan, 99, root, proc)
    group = root / "edgeslice" / "pi-5"
    assert applied.to_info()["cgroup"] == "cgroup-v2"
    assert applied.groups == (group,)
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert (group / "memory.max").read_text() == str(8192 * MIB)
    assert (group / "cgroup.procs").read_text() == "99"
    for parent in (root, root / "edgeslice"):
        assert set((parent / "cgroup.subtree_control").read_text().split()) >= {"+cpu", "+memory"}


def test_hybrid_layout_uses_unified_when_it_has_the_controllers(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("cpu memory\n")
    layout = detect_layout(root, tmp_path / "no-proc-file")
    assert layout.mode == "cgroup-v2" and layout.mounts == {"unified": root / "unified"}


def test_missing_root_runs_unlimited_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nothing"
    with caplog.at_level(logging.WARNING, logger="edgeslice.agent.limits"):
        applied, limits = emulate_profile("pi-1", load_profile("rpi4-4gb"), root=missing)
    assert applied is None
    assert limits["mode"] == "unlimited" and str(missing) in limits["reason"]
    assert "UNLIMITED" in caplog.text
    assert cgroup_problem(missing) is not None


def test_root_without_controllers_runs_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("")  # hybrid, controllers on v1 absent
    applied, limits = emulate_profile("pi-1", load_profile("rpi4-4gb"), root=root)
    assert applied is None and "cpu and memory" in limits["reason"]


def test_a_group_that_cannot_be_created_is_reported_by_path(tmp_path: Path) -> None:
    root, proc = _v1_root(tmp_path, memory_own="/")
    (root / "memory" / "edgeslice").write_text("not a directory")
    with pytest.raises(CgroupUnavailable, match="edgeslice/pi-1"):
        apply_limits("pi-1", plan_emulation(load_profile("rpi4-4gb"), 50.0), 1, root, proc)


def test_read_only_root_runs_unlimited(tmp_path: Path) -> None:
    root, proc = _v1_root(tmp_path, memory_own="/")
    for d in (root / "cpu", root / "memory"):
        d.chmod(0o555)
    try:
        if os.access(root / "cpu", os.W_OK):
            pytest.skip("this user may write to read-only directories (root with CAP_DAC_OVERRIDE)")
        applied, limits = emulate_profile("pi-1", load_profile("rpi4-4gb"), 1.0, root, proc)
    finally:
        for d in (root / "cpu", root / "memory"):
            d.chmod(0o755)
    assert applied is None and "cannot create a cgroup" in limits["reason"]


def test_ids_that_are_not_directory_names_are_refused(tmp_path: Path) -> None:
    root, proc = _v1_root(tmp_path)
    with pytest.raises(CgroupUnavailable, match="cannot name a cgroup"):
        apply_limits("..", plan_emulation(load_profile("rpi4-4gb"), 50.0), None, root, proc)


def test_cleanup_removes_empty_groups_and_reports_busy_ones(tmp_path: Path) -> None:
    root, _proc = _v1_root(tmp_path)
    stale = root / "cpu" / "edgeslice" / "gone"
    busy = root / "memory" / "sandbox" / "x" / "edgeslice" / "busy"
    stale.mkdir(parents=True)
    busy.mkdir(parents=True)
    (busy / "cgroup.procs").write_text("321\n")
    assert remove_agent_cgroups("other", root) == []
    assert stale.is_dir()
    left = remove_agent_cgroups(None, root)
    assert not stale.exists() and not (root / "cpu" / "edgeslice").exists()
    assert busy.is_dir()
    assert len(left) == 1 and str(busy) in left[0] and "321" in left[0]
