"""The wheel as a user gets it: built from the checkout, installed in a fresh virtual
environment, ``edgeslice demo`` run from a folder outside the repository.

The venv is a plain one (no ``--system-site-packages``): the machine's own Python has no
torch to share (it lives only in the venv running the tests), and installing
``torch==2.13.0`` fresh takes about 25 s here from the local wheel cache, which fits the
budget: about 60 s in all on an idle 2-core machine (build ~5 s, venv ~3 s, torch ~25 s,
the other dependencies ~8 s, the demo ~20 s), 80 s with other test runs competing. A
plain venv is also the honest check: the wheel is installed *with* its dependencies, so
a package missing from ``install_requires`` or a file missing from the wheel (firmware
profiles, model definitions) fails here. torch is installed first, pinned, so that pip
does not resolve an unpinned (CUDA) torch.

The wheel is built from a copy of the checkout (no ``build/`` or ``*.egg-info`` left in
the repository, none reused from an earlier build): without build isolation when this
Python can build wheels by itself (setuptools >= 70.1, what pyproject.toml asks for, or
the ``wheel`` package), else in pip's isolated build environment (setuptools from the
configured index), as ``python -m build`` does.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeslice.lab.server import find_mosquitto

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", "results", "*.whl",
)  # fmt: skip


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}"
    )
    return result


def _can_build_without_isolation() -> bool:
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)


def _build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=IGNORED)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)]
    if _can_build_without_isolation():
        cmd.insert(4, "--no-build-isolation")
    _run(cmd, tmp_path, timeout=180)
    (wheel,) = out.glob("edgeslice-*.whl")
    return wheel


def test_wheel_installs_and_runs_the_demo_outside_the_repo(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (the demo's broker; apt-get install mosquitto)")
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, timeout=60)
    python, edgeslice = venv / "bin" / "python", venv / "bin" / "edgeslice"
    pip = [str(python), "-m", "pip", "install", "-q"]
    _run([*pip, "torch==2.13.0"], tmp_path, timeout=300)
    _run([*pip, str(wheel)], tmp_path, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [str(python), "-c", "import edgeslice.lab.cli as m; print(m.__file__)"], elsewhere, 30
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), "imported from outside the venv"
    profiles = _run([str(edgeslice), "profiles", "list"], elsewhere, timeout=60)
    assert "rpi4-4gb" in profiles.stdout  # the firmware profiles travel in the wheel

    demo = _run([str(edgeslice), "demo", "--requests", "4"], elsewhere, timeout=240)
    match = re.search(r"outputs equal to the whole model \(allclose\): (\d+)/(\d+)", demo.stdout)
    assert match and match.groups() == ("4", "4"), demo.stdout
    assert "demo finished" in demo.stdout
