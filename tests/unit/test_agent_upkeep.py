"""The agent's upkeep on telemetry ticks: giving malloc's kept memory back once requests stop."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from edgeslice.agent.memtrim import IdleTrim, rss_bytes


def test_idle_trim_trims_once_per_idle_spell_after_work() -> None:
    resident = [500]
    trim = IdleTrim(trim=lambda: resident.__setitem__(0, 400), rss=lambda: resident[0])
    assert trim.tick(holding=0, done=0) is None  # nothing ran yet
    assert trim.tick(holding=3, done=10) is None  # busy: memory in use stays
    assert trim.tick(holding=0, done=12) is None  # a gap between requests, not idle
    assert trim.tick(holding=0, done=12) == 100  # a whole tick without a request
    assert trim.tick(holding=0, done=12) is None  # still the same idle spell
    resident[0] = 450
    assert trim.tick(holding=0, done=13) is None
    assert trim.tick(holding=1, done=13) is None  # one arrived (e.g. waits for its batch)
    assert trim.tick(holding=0, done=13) == 50
    assert (trim.trims, trim.released_bytes) == (2, 150)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
    or not ctypes.util.find_library("c"),
    reason="malloc_trim is glibc's",
)  # fmt: skip
def test_idle_trim_gives_freed_heap_memory_back_on_glibc() -> None:
    # 64 KiB blocks come from the heap (below the mmap threshold); every 16th one kept
    # stops the heap's top from shrinking by itself, so the rest stays resident until trimmed
    blocks = [bytearray(b"x" * 65536) for _ in range(3000)]  # ~190 MiB, touched
    kept = blocks[::16]
    del blocks
    trim = IdleTrim()
    trim.tick(holding=0, done=1)
    released = trim.tick(holding=0, done=1)
    assert released is not None and released > 100 * 2**20, released
    assert rss_bytes() > 0 and len(kept) == 188
