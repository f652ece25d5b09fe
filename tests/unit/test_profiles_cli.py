"""`edgeslice profiles list/show/validate` through the real `edgeslice` click group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgeslice.firmware_profiles import (
    load_profile,
    profile_from_dict,
    profile_names,
    profile_to_dict,
)
from edgeslice.lab.cli import cli

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "firmware_profiles"


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["profiles", *args])


def _custom_profile(tmp_path: Path, name: str = "myboard", cores: int = 4) -> Path:
    text = (PACKAGE_DIR / "rpi4-4gb.toml").read_text(encoding="utf-8")
    text = text.replace('name = "rpi4-4gb"', f'name = "{name}"')
    text = text.replace("cores = 4", f"cores = {cores}")
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_list_prints_a_row_per_profile() -> None:
    result = run("list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = ["NAME", "ARCH", "CORES", "CLOCK", "RAM", "BUDGET", "GFLOP/S", "LINK"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(profile_names())
    assert "1500 MHz" in rows["rpi4-4gb"] and "ethernet 940 Mbit/s" in rows["rpi4-4gb"]
    assert "wifi" in rows["rpi3b"] and "1 GiB" in rows["rpi3b"]


def test_list_json_is_one_object_per_line() -> None:
    result = run("list", "--json")
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["name"] for o in objects] == profile_names()
    for obj in objects:
        assert obj == profile_to_dict(load_profile(obj["name"]))


def test_show_prints_every_field() -> None:
    result = run("show", "jetson-orin-nano")
    assert result.exit_code == 0, result.output
    profile = load_profile("jetson-orin-nano")
    for field in profile_to_dict(profile):
        if field != "link":
            assert field in result.stdout
    for field in ("link.kind", "link.bandwidth_mbit", "link.latency_ms", "link.loss_pct"):
        assert field in result.stdout
    assert "6144 MiB for model stages" in result.stdout
    assert "27 GFLOP/s" in result.stdout


def test_show_json_round_trips() -> None:
    result = run("show", "rpi5-8gb", "--json")
    assert result.exit_code == 0, result.output
    assert profile_from_dict(json.loads(result.stdout)) == load_profile("rpi5-8gb")


def test_show_accepts_a_path(tmp_path: Path) -> None:
    path = _custom_profile(tmp_path, cores=3)
    result = run("show", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cores"] == 3


def test_show_unknown_name_is_a_clean_error() -> None:
    result = run("show", "rpi9")
    assert result.exit_code == 1
    assert "unknown firmware profile 'rpi9'" in result.stderr
    assert "rpi4-4gb" in result.stderr  # lists what exists
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_validate_good_files() -> None:
    files = [str(PACKAGE_DIR / f"{name}.toml") for name in profile_names()]
    result = run("validate", *files)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok  ") == len(files)


def test_validate_reports_bad_file_and_exits_1(tmp_path: Path) -> None:
    good = _custom_profile(tmp_path, name="good")
    bad = _custom_profile(tmp_path, name="bad", cores=-3)
    result = run("validate", str(good), str(bad))
    assert result.exit_code == 1
    assert f"ok  {good}" in result.stdout
    assert str(bad) not in result.stdout
    assert str(bad) in result.stderr and "'cores'" in result.stderr
    assert "1 of 2 profile files are invalid" in result.stderr
    assert "Traceback" not in result.output


def test_validate_missing_file_exits_1(tmp_path: Path) -> None:
    result = run("validate", str(tmp_path / "absent.toml"))
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


def test_validate_without_files_is_a_usage_error() -> None:
    assert run("validate").exit_code == 2


@pytest.mark.parametrize("sub", ["list", "show", "validate"])
def test_help_texts(sub: str) -> None:
    result = run(sub, "--help")
    assert result.exit_code == 0
    assert "Usage: " in result.stdout and len(result.stdout.splitlines()) > 4
    group = run("--help")
    assert sub in group.stdout and "firmware profile" in group.stdout


def test_profiles_cli_does_not_import_torch() -> None:
    code = (
        "import sys; import firmware_profiles.cli; from edgeslice.lab.cli import cli; "
        "cli.get_command(None, 'profiles'); "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
