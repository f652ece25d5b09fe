"""Owns removing emulation cgroups that agents left behind (killed before they could).

An agent removes its own groups on a normal exit (agent/limits.py ``AppliedLimits.release``);
one killed with SIGKILL cannot. :func:`remove_agent_cgroups` removes such leftovers by name
(agent/limits.py ``group_name``: ``<namespace>@<agent id>``), for ``edgeslice testbed down``
and ``LocalFleet.close`` (lab/). It kills nothing: a group whose agent still runs is
reported, with what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeslice.agent.limits import CONTROLLERS, DEFAULT_ROOT, PREFIX, remove_group

_MAX_DEPTH = 8  # how deep remove_agent_cgroups looks for edgeslice/ groups


def _prefix_dirs(mount: Path) -> list[Path]:
    """Every ``edgeslice/`` group below ``mount`` (bounded depth, not descending into them)."""
    found: list[Path] = []
    for dirpath, dirnames, _files in os.walk(mount):
        depth = len(Path(dirpath).relative_to(mount).parts)
        if PREFIX in dirnames:
            found.append(Path(dirpath) / PREFIX)
        dirnames[:] = [] if depth >= _MAX_DEPTH else [d for d in dirnames if d != PREFIX]
    return found


def remove_agent_cgroups(name: str | None = None, root: Path = DEFAULT_ROOT) -> list[str]:
    """Remove empty ``edgeslice/<name>`` groups (``name``: agent/limits.py ``group_name``;
    every agent's when None); what is left.

    Kills nothing: a group whose agent still runs is reported. With ``name=None`` the
    ``edgeslice/`` parents are removed too once empty.
    """
    mounts = [root / c for c in CONTROLLERS if (root / c).is_dir()]
    mounts += [m for m in (root, root / "unified") if (m / "cgroup.controllers").exists()]
    left: list[str] = []
    for mount in mounts:
        for parent in _prefix_dirs(mount):
            groups = sorted(p for p in parent.iterdir() if p.is_dir())
            chosen = [g for g in groups if name is None or g.name == name]
            left += [problem for g in chosen if (problem := remove_group(g))]
            if name is None and not any(p.is_dir() for p in parent.iterdir()):
                left += [problem] if (problem := remove_group(parent)) else []
    return left
