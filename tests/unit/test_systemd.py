"""``edgeslice agent-service install``: the unit systemd would load, the env file, the CLI."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeslice.agent import systemd
from edgeslice.agent.systemd_cli import agent_service_group, find_executable
from edgeslice.lab.cli import cli

UNIT = Path("etc/systemd/system/edgeslice-agent.service")
ENV = Path("etc/edgeslice/agent.env")


def real_executable() -> str:
    """systemd-analyze checks that ExecStart exists: point it at a real edgeslice."""
    exe = find_executable()
    assert exe is not None, "the dev venv has an edgeslice console script"
    return exe


def spec(**changes: object) -> systemd.ServiceSpec:
    values: dict[str, object] = {
        "executable": real_executable(),
        "broker": "mqtts://broker.lan:8883",
        "agent_id": "pi-1",
        "username": "pi-1",
        "password": 'p@ss "word" \\ x',
        "metrics_port": 9101,
    }
    values.update(changes)
    return systemd.ServiceSpec(**values)  # type: ignore[arg-type]


def unit_settings(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"]
    return {key: value for key, value in pairs}


def test_the_unit_runs_the_agent_as_its_user_with_restart_journal_and_hardening() -> None:
    text = systemd.render_unit(spec())
    keys = unit_settings(text)
    assert keys["ExecStart"] == f"{real_executable()} agent"
    assert keys["User"] == "edgeslice" and keys["Group"] == "edgeslice"
    assert keys["Restart"] == "on-failure"
    assert keys["EnvironmentFile"] == "/etc/edgeslice/agent.env"
    assert keys["StandardOutput"] == keys["StandardError"] == "journal"
    assert keys["NoNewPrivileges"] == "yes"
    assert keys["ProtectSystem"] == "strict"
    assert keys["CacheDirectory"] == "edgeslice"  # writable under ProtectSystem=strict
    assert keys["ProtectControlGroups"] == "yes"
    assert "--emulate" not in keys["ExecStart"]
    assert "EMULATE" not in systemd.render_env(spec())
    # the stop timeout leaves room for the drain and finishing held requests
    assert int(keys["TimeoutStopSec"]) > 60 + 10
    assert "PASSWORD" not in text and "p@ss" not in text  # the secret stays in the env file


def test_the_env_file_holds_every_setting_quoted_for_systemd() -> None:
    text = systemd.render_env(spec(namespace="lab", tls_ca="/etc/edgeslice/ca.pem"))
    keys = unit_settings(text)
    assert keys["EDGESLICE_BROKER"] == "mqtts://broker.lan:8883"
    assert keys["EDGESLICE_ID"] == "pi-1"
    assert keys["EDGESLICE_PROFILE"] == "auto"
    assert keys["EDGESLICE_NAMESPACE"] == "lab"
    assert keys["EDGESLICE_FLEET_KEY_FILE"] == "/etc/edgeslice/fleet.pub"
    assert keys["EDGESLICE_CACHE_DIR"] == "/var/cache/edgeslice"
    assert keys["EDGESLICE_USERNAME"] == "pi-1"
    assert keys["EDGESLICE_PASSWORD"] == '"p@ss \\"word\\" \\\\ x"'
    assert keys["EDGESLICE_METRICS_PORT"] == "9101"
    assert "EDGESLICE_METRICS_HOST" not in keys  # unset: the agent's default
    bare = unit_settings(systemd.render_env(spec(agent_id=None, password=None, username=None)))
    assert "EDGESLICE_ID" not in bare and "EDGESLICE_PASSWORD" not in bare


def test_a_home_directory_install_keeps_home_readable() -> None:
    keys = unit_settings(systemd.render_unit(spec(executable="/home/pi/venv/bin/edgeslice")))
    assert keys["ProtectHome"] == "read-only"
    steps = systemd.next_steps(spec(executable="/home/pi/venv/bin/edgeslice"))
    assert "/opt/edgeslice/venv" in steps


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        agent_service_group,
        ["install", "--broker", "mqtt://10.0.0.2", "--prefix", str(tmp_path), "--password", "x"],
    )
    assert result.exit_code == 0, result.output
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # verify only warns (exit 0) on unknown keys or bad values: none may be reported
    unit_lines = [line for line in output.splitlines() if UNIT.name in line]
    assert not unit_lines, output


def test_install_writes_both_files_under_prefix_with_their_modes(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "agent-service",
            "install",
            "--broker",
            "mqtt://10.0.0.2",
            "--id",
            "pi-7",
            "--username",
            "pi-7",
            "--prefix",
            str(tmp_path),
            "--executable",
            real_executable(),
        ],
        env={"EDGESLICE_PASSWORD": "from-env"},
    )
    assert result.exit_code == 0, result.output
    unit, env = tmp_path / UNIT, tmp_path / ENV
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert "EDGESLICE_PASSWORD=from-env" in env.read_text()
    assert "EDGESLICE_ID=pi-7" in env.read_text()
    assert "useradd --system" in result.output
    assert "systemctl enable --now edgeslice-agent" in result.output
    # a re-install replaces the settings and tightens a loosened env file again
    env.chmod(0o644)
    again = CliRunner().invoke(
        agent_service_group,
        ["install", "--broker", "mqtt://10.0.0.3", "--prefix", str(tmp_path)],
    )
    assert again.exit_code == 0, again.output
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "EDGESLICE_BROKER=mqtt://10.0.0.3" in env.read_text()
    assert "EDGESLICE_PASSWORD" not in env.read_text()


def test_dry_run_prints_the_files_masks_the_password_and_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        agent_service_group,
        [
            "install",
            "--broker",
            "mqtt://10.0.0.2",
            "--password",
            "hunter2",
            "--prefix",
            str(tmp_path),
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "# ---- /etc/systemd/system/edgeslice-agent.service (mode 0644)" in result.output
    assert "# ---- /etc/edgeslice/agent.env (mode 0600)" in result.output
    assert "ExecStart=" in result.output and "EDGESLICE_BROKER=mqtt://10.0.0.2" in result.output
    assert "hunter2" not in result.output
    assert "nothing written" in result.output
    assert not any(tmp_path.iterdir())


def test_ask_password_prompts_and_a_bad_broker_url_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        agent_service_group,
        ["install", "--broker", "mqtt://h", "--ask-password", "--prefix", str(tmp_path)],
        input="typed-secret\n",
    )
    assert result.exit_code == 0, result.output
    assert "EDGESLICE_PASSWORD=typed-secret" in (tmp_path / ENV).read_text()
    bad = CliRunner().invoke(agent_service_group, ["install", "--broker", "http://h", "--dry-run"])
    assert bad.exit_code == 2
    assert "scheme must be mqtt://" in bad.output
    missing = CliRunner().invoke(
        agent_service_group, ["install", "--dry-run"], env={"EDGESLICE_BROKER": None}
    )
    assert missing.exit_code == 2 and "--broker" in missing.output


def test_an_unwritable_target_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "etc"
    blocker.write_text("a file where a directory should be")
    result = CliRunner().invoke(
        agent_service_group, ["install", "--broker", "mqtt://h", "--prefix", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "cannot write" in result.output and "--dry-run" in result.output


def test_agent_install_service_is_the_same_command(tmp_path: Path) -> None:
    """The issue's spelling, ``edgeslice agent install-service``, reaches the installer."""
    args = ["--dry-run", "--broker", "mqtt://127.0.0.1:1883", "--id", "pi1"]
    args += ["--profile", "rpi4-4gb", "--prefix", str(tmp_path)]
    spelled = CliRunner().invoke(cli, ["agent", "install-service", *args])
    grouped = CliRunner().invoke(cli, ["agent-service", "install", *args])
    assert spelled.exit_code == 0, spelled.output
    assert "[Unit]" in spelled.output and spelled.output == grouped.output
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
    plain = CliRunner().invoke(cli, ["agent", "--help"])
    assert plain.exit_code == 0 and "--profile" in plain.output  # `agent` still runs agents
