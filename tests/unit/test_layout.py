"""The house's layout rules, checked on the code: imports point down, and the installed
namespace works from any directory (not only from the repository root)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("broker", "agent", "planner", "client", "lab", "firmware_profiles", "benchmarks")

# package -> the edgeslice packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "broker": set(),
    "firmware_profiles": {"broker"},
    "agent": {"broker", "firmware_profiles"},
    "planner": {"broker", "firmware_profiles"},
    "client": {"broker", "firmware_profiles"},
    "lab": {"broker", "firmware_profiles", "agent", "planner", "client"},
    "benchmarks": {"broker", "firmware_profiles", "agent", "planner", "client", "lab"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down(package: str) -> None:
    wrong = []
    for path in _sources(package):
        for line, module in _imports(path):
            parts = module.split(".")
            if parts[0] in PACKAGES:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: bare import {module}")
            elif parts[0] == "edgeslice" and len(parts) > 1:
                target = parts[1]
                if target != package and target not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_string_imports_outside_the_command_group() -> None:
    """Only lab/cli.py (the lazy command group) and same-package lazy loads use
    importlib with a computed name; a string import must not cross packages."""
    offenders = []
    for package in PACKAGES:
        for path in _sources(package):
            text = path.read_text(encoding="utf-8")
            if "import_module(" not in text or path == ROOT / "lab" / "cli.py":
                continue
            for n, line in enumerate(text.splitlines(), 1):
                if "import_module(" in line and "__package__" not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    # planner/modelspec.py imports the *user's* model module named on --model: allowed.
    offenders = [o for o in offenders if not o.startswith("planner/modelspec.py")]
    assert not offenders, "\n".join(offenders)


def test_installed_namespace_works_outside_the_repository(tmp_path: Path) -> None:
    """From a directory without the repository on sys.path, every package imports as
    edgeslice.* and the firmware profiles load (a bare 'firmware_profiles' name once
    worked only from the repository root)."""
    code = (
        "import importlib, sys\n"
        f"for name in {[f'edgeslice.{p}' for p in PACKAGES]!r}:\n"
        "    importlib.import_module(name)\n"
        "from edgeslice.firmware_profiles import list_profiles\n"
        "assert list_profiles(), 'no firmware profiles found'\n"
        f"assert not any(p in sys.modules for p in {list(PACKAGES)!r}), 'bare module'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_test_modules_have_unique_basenames() -> None:
    """pytest's default import mode cannot collect two test modules of one basename in
    tests/unit and tests/integration: the whole run stops at collection."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, "rename one of: " + "; ".join(clashes)
