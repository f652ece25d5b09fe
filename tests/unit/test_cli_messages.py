"""A new user's first hour: each mistake ends in one line saying what to do, never a traceback.

Every test runs the command a user would type (click's CliRunner on the root group, or a
``python -m edgeslice.lab.cli`` subprocess where torch's own stderr output matters) and
checks the one line and the exit code. None of them needs a broker: the checks run
before any connection (tests needing a broker are in tests/integration/).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from torch import nn

from edgeslice.broker.client import describe_connect_error
from edgeslice.broker.fleetkey import write_key
from edgeslice.broker.modelname import model_name_for_spec
from edgeslice.broker.settings import parse_broker_url
from edgeslice.client.cli import stage_timings_ms
from edgeslice.lab.cli import cli

NOWHERE = "mqtt://no-such-host.invalid:1883"  # .invalid never resolves: nothing is contacted


def _write(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def _run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def _one_error_line(result: Result) -> str:
    """The output is exactly one ``Error: ...`` line; returns it."""
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, str]:
    """Model specs a user might write, good and bad."""
    _write(tmp_path, "broken_import.py", "raise RuntimeError('boom at import')\n")
    _write(
        tmp_path,
        "broken_build.py",
        """
        def build():
            raise ValueError("bad layer size")
        """,
    )
    _write(
        tmp_path,
        "unseeded.py",
        """
        import torch
        from torch import nn

        def build():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.ones(1, 4)
        """,
    )
    _write(
        tmp_path,
        "seeded.py",
        """
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.ones(1, 4)
        """,
    )
    _write(
        tmp_path,
        "untraceable.py",
        """
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return x

        def build():
            torch.manual_seed(0)
            return Branchy(), torch.ones(1, 4)
        """,
    )
    return {
        "missing": f"{tmp_path / 'nothere.py'}:build",
        "broken_import": f"{tmp_path / 'broken_import.py'}:build",
        "broken_build": f"{tmp_path / 'broken_build.py'}:build",
        "unseeded": f"{tmp_path / 'unseeded.py'}:build",
        "seeded": f"{tmp_path / 'seeded.py'}:build",
        "untraceable": f"{tmp_path / 'untraceable.py'}:build",
    }


BAD_SPECS = {
    "missing": "does not exist",
    "broken_import": "raised RuntimeError: boom at import (at ",
    "broken_build": "calling build() raised ValueError: bad layer size (at ",
    "unseeded": "build() returns different weights on each call",
}


# -- 1 and 4: bad model specs, unseeded build() ----------------------------------------
@pytest.mark.parametrize("kind", sorted(BAD_SPECS))
def test_profile_says_what_is_wrong_with_the_model_spec(models: dict[str, str], kind: str) -> None:
    result = _run("profile", "--model", models[kind])
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert BAD_SPECS[kind] in line
    assert "nothere.py" in line or kind != "missing"


@pytest.mark.parametrize("kind", sorted(BAD_SPECS))
def test_demo_checks_the_model_spec_before_starting_anything(
    models: dict[str, str], kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    result = _run("demo", "--model", models[kind], "--broker", NOWHERE)
    assert result.exit_code == 1
    assert BAD_SPECS[kind] in _one_error_line(result)
    assert list(scratch.iterdir()) == []  # no fleet folder, no key, no process


@pytest.mark.parametrize("kind", sorted(BAD_SPECS))
def test_planner_says_what_is_wrong_with_the_model_spec(
    models: dict[str, str], kind: str, tmp_path: Path
) -> None:
    key = tmp_path / "fleet.key"
    write_key(str(key))
    result = _run(
        "planner",
        "--model",
        models[kind],
        "--broker",
        NOWHERE,
        "--fleet-key-file",
        str(key),
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and BAD_SPECS[kind] in errors[0], result.output
    assert result.output.rstrip().endswith(errors[0])


def test_unseeded_message_says_how_to_fix_it(models: dict[str, str]) -> None:
    line = _one_error_line(_run("profile", "--model", models["unseeded"]))
    assert "torch.manual_seed" in line and "'0.weight' differs" in line


def test_seeded_user_model_profiles(models: dict[str, str]) -> None:
    result = _run("profile", "--model", models["seeded"])
    assert result.exit_code == 0, result.output


def test_spec_without_a_callable_suggests_one() -> None:
    line = _one_error_line(_run("profile", "--model", "mynet.py"))
    assert "did you mean 'mynet.py:build'?" in line


# -- 3: a model torch.export cannot trace --------------------------------------------
def _cli_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EDGESLICE_VERBOSE"}
    return subprocess.run(
        [sys.executable, "-m", "edgeslice.lab.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def test_profile_of_an_untraceable_model_gives_the_reason_in_one_line(
    models: dict[str, str], tmp_path: Path
) -> None:
    proc = _cli_subprocess("profile", "--model", models["untraceable"], cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: torch.export could not trace Branchy: ")
    assert "untraceable.py:11 (`if x.sum() > 0:`)" in lines[0]
    assert "run with -v" in lines[0]


def test_profile_shows_torchs_graph_dump_only_with_verbose(
    models: dict[str, str], tmp_path: Path
) -> None:
    proc = _cli_subprocess("-v", "profile", "--model", models["untraceable"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "def forward(" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("Error: torch.export could not")


# -- 2: infer --input with the wrong kind of file -------------------------------------
def _bad_inputs(directory: Path) -> dict[str, tuple[Path, str]]:
    torch.save({"image": torch.ones(2)}, directory / "dict.pt")
    (directory / "notes.txt").write_text("hello world\n")
    (directory / "random.bin").write_bytes(os.urandom(512))
    torch.save(nn.Linear(2, 2), directory / "module.pt")
    torch.save([torch.ones(1), 3], directory / "mixed.pt")
    return {
        "dict": (directory / "dict.pt", "holds a dict (keys image)"),
        "text": (directory / "notes.txt", "holds no torch.save data"),
        "bytes": (directory / "random.bin", "holds no torch.save data"),
        "module": (directory / "module.pt", "holds a pickled torch.nn.modules.linear.Linear"),
        "mixed": (directory / "mixed.pt", "holds a list of Tensor, int"),
    }


@pytest.mark.parametrize("kind", ["dict", "text", "bytes", "module", "mixed"])
def test_infer_input_that_is_not_tensors_is_refused_before_connecting(
    tmp_path: Path, kind: str
) -> None:
    path, found = _bad_inputs(tmp_path)[kind]
    # the broker cannot be resolved: a connection attempt would give another message
    result = _run("infer", "--broker", NOWHERE, "--model", "m", "--input", str(path))
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert found in line
    assert "expected a tensor or a tuple/list of tensors saved with torch.save" in line


# -- 5: infer --model takes the planner's spec as well as the served name ----------------
@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("mobilenetv2", "mobilenetv2"),
        ("examples/branchy_model.py:build", "build"),
        ("/abs/path/My Net.py:Make_Net", "make_net"),
        ("pkg.models:resnet_small", "resnet_small"),
        ("build", "build"),
    ],
)
def test_served_name_is_derived_from_the_spec_alone(spec: str, name: str) -> None:
    assert model_name_for_spec(spec) == name


def test_served_name_matches_what_the_planner_loads(models: dict[str, str]) -> None:
    from edgeslice.planner.modelspec import load_model

    assert load_model(models["seeded"]).name == model_name_for_spec(models["seeded"])


def test_planner_prints_its_served_name_and_the_infer_command(
    models: dict[str, str], tmp_path: Path
) -> None:
    key = tmp_path / "fleet.key"
    write_key(str(key))
    result = _run(
        "planner",
        "--model",
        models["broken_build"],
        "--broker",
        "mqtt://127.0.0.1:9",
        "--namespace",
        "lab",
        "--fleet-key-file",
        str(key),
    )
    assert "served as 'build'" in result.output
    assert (
        "edgeslice infer --broker mqtt://127.0.0.1:9 --namespace lab --model build --random"
        in result.output
    )


# -- 6: --json units match the key names ----------------------------------------------
def test_json_stage_timings_are_milliseconds_named_ms() -> None:
    timing = {"stage": 0, "agent": "pi-1", "compute_s": 0.0125, "queue_s": 0.001}
    assert stage_timings_ms(timing) == {
        "stage": 0,
        "agent": "pi-1",
        "compute_ms": 12.5,
        "queue_ms": 1.0,
    }


# -- 7: broker config into a folder that already holds files ---------------------------
def test_broker_config_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "mosquitto.conf").write_text("# mine\n")
    result = _run("broker", "config", "--out", str(tmp_path), "--agents", "pi-1")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "is not empty (it holds mosquitto.conf)" in line and "--force" in line
    assert (tmp_path / "mosquitto.conf").read_text() == "# mine\n"


def test_broker_config_force_writes_into_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "mosquitto.conf").write_text("# mine\n")
    result = _run("broker", "config", "--out", str(tmp_path), "--agents", "pi-1", "--force")
    assert result.exit_code == 0, result.output
    assert "listener" in (tmp_path / "mosquitto.conf").read_text()


# -- 9: connection failures each get their own message ---------------------------------
def test_unknown_host_says_it_cannot_be_resolved() -> None:
    result = _run("infer", "--broker", NOWHERE, "--model", "m", "--random")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "cannot resolve host 'no-such-host.invalid'" in line
    assert "check the --broker URL" in line


def test_connect_errors_are_mapped_to_their_own_messages() -> None:
    plain = parse_broker_url("mqtt://127.0.0.1:1884")
    tls = parse_broker_url("mqtts://127.0.0.1:1884")
    refused, final = describe_connect_error(plain, ConnectionRefusedError(111, "refused"))
    assert refused.startswith("nothing listens on 127.0.0.1:1884: is the broker running?")
    assert not final  # a broker that is starting up: keep trying until the timeout
    handshake, final = describe_connect_error(tls, ssl.SSLError(1, "wrong version number"))
    assert handshake.startswith("TLS handshake with 127.0.0.1:1884 failed")
    assert "usually 8883" in handshake and final
    reset, _ = describe_connect_error(tls, ConnectionResetError(104, "reset"))
    assert reset == handshake  # mosquitto's plain port drops a TLS hello this way
    dns, final = describe_connect_error(plain, socket.gaierror(socket.EAI_NONAME, "unknown"))
    assert dns.startswith("cannot resolve host '127.0.0.1'") and final
