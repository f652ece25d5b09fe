"""Firmware profiles: every shipped file loads, stays plausible, and bad files fail clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from edgeslice.broker.protocol.errors import ConfigError, ProfileError
from edgeslice.firmware_profiles import (
    FirmwareProfile,
    list_profiles,
    load_profile,
    profile_from_dict,
    profile_names,
    profile_to_dict,
    validate_file,
)

REQUIRED = {
    "rpi3b",
    "rpi4-2gb",
    "rpi4-4gb",
    "rpi4-8gb",
    "rpi5-4gb",
    "rpi5-8gb",
    "jetson-nano",
    "jetson-orin-nano",
    "x86-laptop",
}
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "firmware_profiles"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)


def _render(data: dict[str, Any]) -> str:
    """A tiny TOML writer for flat profiles with one optional [link] table."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _valid(name: str = "myboard") -> dict[str, Any]:
    data = profile_to_dict(load_profile("rpi4-4gb"))
    data["name"] = name
    return data


def _write(tmp_path: Path, data: dict[str, Any], stem: str = "myboard") -> Path:
    path = tmp_path / f"{stem}.toml"
    path.write_text(_render(data), encoding="utf-8")
    return path


# --- shipped profiles ---------------------------------------------------------------------


def test_every_required_device_class_is_shipped_and_loads() -> None:
    assert set(profile_names()) >= REQUIRED
    profiles = list_profiles()
    assert [p.name for p in profiles] == sorted(p.name for p in profiles)
    assert {p.name for p in profiles} == set(profile_names())
    for profile in profiles:
        assert isinstance(profile, FirmwareProfile)
        assert load_profile(profile.name) == profile


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_shipped_profile_is_self_consistent(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.memory_budget_mb == profile.ram_mb - profile.memory_reserved_mb > 0
    assert profile.memory_budget_bytes == profile.memory_budget_mb * 1024 * 1024
    # Where the number comes from must say whether it is an estimate or a measurement.
    assert profile.gflops_source.startswith(("estimate:", "measured:", "published:"))
    # Loading by path gives the same value as loading by name.
    assert load_profile(str(PACKAGE_DIR / f"{name}.toml")) == profile
    assert validate_file(PACKAGE_DIR / f"{name}.toml") == profile


def test_relative_speeds_are_plausible() -> None:
    """The emulator scales CPU quota by these ratios, so their order matters more than values."""
    g = {p.name: p.gflops_fp32 for p in list_profiles()}
    assert g["rpi3b"] < g["jetson-nano"] < g["rpi4-4gb"] < g["rpi5-4gb"] < g["x86-laptop"]
    assert g["rpi4-2gb"] == g["rpi4-4gb"] == g["rpi4-8gb"]
    assert g["rpi5-4gb"] == g["rpi5-8gb"]
    assert 0.5 < g["jetson-orin-nano"] / g["rpi5-4gb"] < 2


def test_same_board_variants_differ_only_in_ram() -> None:
    def board(name: str) -> dict[str, Any]:
        data = profile_to_dict(load_profile(name))
        for key in ("name", "description", "ram_mb"):
            del data[key]
        return data

    assert board("rpi4-2gb") == board("rpi4-4gb") == board("rpi4-8gb")
    assert board("rpi5-4gb") == board("rpi5-8gb")
    assert [load_profile(f"rpi4-{n}gb").ram_mb for n in (2, 4, 8)] == [2048, 4096, 8192]


def test_links_match_the_boards() -> None:
    assert load_profile("rpi3b").link.bandwidth_mbit <= 100  # 100 Mbit Ethernet or 2.4 GHz Wi-Fi
    for name in ("rpi4-4gb", "rpi5-8gb", "jetson-nano", "jetson-orin-nano"):
        link = load_profile(name).link
        assert (link.kind, link.loss_pct) == ("ethernet", 0.0)
        assert 500 < link.bandwidth_mbit <= 1000


def test_dict_round_trip_is_json_safe() -> None:
    for profile in list_profiles():
        data = json.loads(json.dumps(profile_to_dict(profile)))
        assert data["link"]["kind"] == profile.link.kind
        assert profile_from_dict(data) == profile


def test_int_is_accepted_where_a_float_is_expected(tmp_path: Path) -> None:
    data = _valid()
    data["gflops_fp32"] = 12
    profile = validate_file(_write(tmp_path, data))
    assert profile.gflops_fp32 == 12.0
    assert isinstance(profile.gflops_fp32, float)


def test_custom_file_loads_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, _valid())
    assert load_profile(str(path)).name == "myboard"
    assert load_profile(path).name == "myboard"


# --- unknown names and unreadable files ----------------------------------------------------


def test_unknown_name_lists_the_known_names() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("rpi9-16gb")
    message = str(info.value)
    assert "rpi9-16gb" in message
    assert all(name in message for name in REQUIRED)
    assert isinstance(info.value, ConfigError)


def test_missing_file_is_a_profile_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(str(missing))
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile("../nope")  # contains a separator: a path, never a package lookup


def test_directory_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        validate_file(tmp_path)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\ncores = \n', encoding="utf-8")
    with pytest.raises(ProfileError, match="not valid TOML") as info:
        validate_file(path)
    assert str(path) in str(info.value)


def test_non_utf8_file_is_a_profile_error(tmp_path: Path) -> None:
    path = tmp_path / "latin.toml"
    path.write_bytes(b'name = "latin"\ndescription = "caf\xe9"\n')
    with pytest.raises(ProfileError, match="UTF-8"):
        validate_file(path)


# --- field validation -----------------------------------------------------------------------

BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("cores", {"cores": -2}, "must be >= 1"),
    ("cores", {"cores": 0}, "must be >= 1"),
    ("cores", {"cores": "4"}, "must be an integer, got a string"),
    ("cores", {"cores": 4.5}, "must be an integer (no decimal point)"),
    ("cores", {"cores": True}, "must be an integer, got a boolean"),
    ("ram_mb", {"ram_mb": -1}, "must be >= 1"),
    ("gflops_fp32", {"gflops_fp32": 0.0}, "must be > 0"),
    ("gflops_fp32", {"gflops_fp32": float("nan")}, "must be finite"),
    ("gflops_fp32", {"gflops_fp32": "fast"}, "must be a number, got a string"),
    ("thermal_limit_c", {"thermal_limit_c": 400.0}, "<= 150"),
    ("description", {"description": "  "}, "must not be empty"),
    ("arch", {"arch": "sparc"}, "expected one of: aarch64"),
    ("name", {"name": "My Board"}, "lower-case letters"),
    ("link.kind", {"link": {"kind": "lte"}}, "expected one of: ethernet, wifi"),
    ("link.loss_pct", {"link": {"loss_pct": 100.0}}, "< 100"),
    ("link.latency_ms", {"link": {"latency_ms": -1.0}}, ">= 0"),
    ("link.bandwidth_mbit", {"link": {"bandwidth_mbit": 0}}, "> 0"),
    ("link", {"link": 5}, "must be a table"),
    ("memory_reserved_mb", {"memory_reserved_mb": 4096}, "must leave some memory"),
]


@pytest.mark.parametrize(("field", "change", "expected"), BAD_FIELDS)
def test_bad_value_names_file_and_field(
    tmp_path: Path, field: str, change: dict[str, Any], expected: str
) -> None:
    data = _valid()
    for key, value in change.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    stem = "My Board" if change.get("name") == "My Board" else "myboard"
    path = _write(tmp_path, data, stem=stem)
    with pytest.raises(ProfileError) as info:
        validate_file(path)
    message = str(info.value)
    assert str(path) in message
    assert f"'{field}'" in message
    assert expected in message


@pytest.mark.parametrize("missing", ["cores", "gflops_source", "memory_reserved_mb"])
def test_missing_field_is_named(tmp_path: Path, missing: str) -> None:
    data = _valid()
    del data[missing]
    with pytest.raises(ProfileError, match=f"missing field '{missing}'"):
        validate_file(_write(tmp_path, data))


def test_missing_link_field_and_table(tmp_path: Path) -> None:
    data = _valid()
    del data["link"]["latency_ms"]
    with pytest.raises(ProfileError, match=r"missing field 'link\.latency_ms'"):
        validate_file(_write(tmp_path, data))
    del data["link"]
    with pytest.raises(ProfileError, match=r"missing table \[link\]"):
        validate_file(_write(tmp_path, data))


def test_unknown_fields_are_refused_with_a_suggestion(tmp_path: Path) -> None:
    data = _valid()
    data["coers"] = 4
    data["link"]["jitter_ms"] = 1.0
    with pytest.raises(ProfileError) as info:
        validate_file(_write(tmp_path, data))
    message = str(info.value)
    assert "unknown field 'coers'; did you mean 'cores'?" in message
    assert "unknown field 'link.jitter_ms'" in message
    assert "2 problems" in message


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    path = _write(tmp_path, _valid(name="other"), stem="myboard")
    with pytest.raises(ProfileError, match="name must equal the file name") as info:
        validate_file(path)
    assert "'other'" in str(info.value) and "myboard.toml" in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = _valid()
    data["cores"] = -1
    data["link"]["kind"] = "carrier-pigeon"
    del data["arch"]
    with pytest.raises(ProfileError) as info:
        validate_file(_write(tmp_path, data))
    message = str(info.value)
    assert "3 problems" in message
    assert all(f"'{f}'" in message for f in ("cores", "link.kind", "arch"))


def test_received_dict_is_validated_too() -> None:
    data = profile_to_dict(load_profile("rpi3b"))
    data["cores"] = 0
    with pytest.raises(ProfileError, match=r"agent rpi-17.*'cores'"):
        profile_from_dict(data, source="from edgeslice.agent rpi-17")
