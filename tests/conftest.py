"""Shared pytest set-up: keep torch to one thread per test process (2-core CI machines)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
