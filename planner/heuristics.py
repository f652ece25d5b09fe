"""Owns the throughput heuristics: a guarded greedy and a local search on device orders.

For fleets too large for the exact DP (see :mod:`planner.partition` for the
whole algorithm). Both work by *probes*: given a bottleneck ``T``, can the
devices cover the model left to right with every stage's period <= ``T``? A
probe costs O(D² log n) (greedy: every unused device tried at each stage) or
O(k) with memoised reaches (fixed order), so hundreds of orders can be tried
in a few milliseconds. Everything is deterministic: budgets count probes, not
seconds.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from math import inf

from planner.costmodel import CostTable

Stage = tuple[int, int, int]  # (start, end, device index)


def _reach(t: CostTable, i: int, d: int, limit_s: float) -> int:
    """Furthest end ``j`` with ``[i, j)`` fitting ``d`` and period <= ``limit_s`` (or ``i``)."""
    slack = limit_s - t.min_compute - t.occ_in[d][i] - t.min_out[d]
    if slack < 0:
        return i
    hi = min(t.reach[d][i], bisect_right(t.flops, t.flops[i] + slack / t.spf[d]) - 1)
    for j in range(hi, i, -1):
        if t.period(i, j, d) <= limit_s:
            return j
    return i


def _room_left(t: CostTable, r: int, left: list[int], stages_left: int, limit_s: float) -> bool:
    """Necessary conditions for the devices ``left`` to cover segments ``[r, n)`` within limits."""
    if stages_left < 1 or not left:
        return False
    budgets = [t.budget[e] for e in left]
    capacity = sum(1.0 / t.spf[e] for e in left) * (limit_s - t.min_compute)
    return (
        t.suffix_mem[r] <= max(budgets)
        and t.weights[t.n] - t.weights[r] <= sum(budgets)
        and t.flops[t.n] - t.flops[r] <= capacity
    )


def greedy(t: CostTable, limit_s: float, limit: int) -> list[Stage]:
    """Feasibility probe for bottleneck ``limit_s``: furthest reach, guarded by what is left."""
    unused, pos = list(range(len(t.spf))), 0
    stages: list[Stage] = []
    while pos < t.n and len(stages) < limit:
        best: tuple[int, float, int] | None = None
        pick = -1
        for d in unused:
            r = _reach(t, pos, d, limit_s)
            key = (r, -1.0 / t.spf[d], -t.budget[d])  # furthest, then the weakest device
            if r <= pos or (best is not None and key <= best):
                continue
            left = [e for e in unused if e != d]
            if r < t.n and not _room_left(t, r, left, limit - len(stages) - 1, limit_s):
                continue
            best, pick = key, d
        if best is None:
            return []
        stages.append((pos, best[0], pick))
        unused.remove(pick)
        pos = best[0]
    return stages if pos == t.n else []


def _in_order(
    t: CostTable,
    order: Sequence[int],
    limit_s: float,
    limit: int,
    memo: dict[tuple[int, int], int] | None = None,
) -> list[Stage]:
    """Feasibility probe for a fixed device order: each device in turn takes its furthest reach.

    ``memo`` caches reaches by (start, device) for one ``limit_s``: orders one
    move apart share most of their prefix, so the local search mostly hits it.
    """
    pos = 0
    stages: list[Stage] = []
    for d in order:
        if pos == t.n or len(stages) == limit:
            break
        if memo is None:
            r = _reach(t, pos, d, limit_s)
        elif (r := memo.get((pos, d), -1)) < 0:
            r = memo[pos, d] = _reach(t, pos, d, limit_s)
        if r > pos:
            stages.append((pos, r, d))
            pos = r
    return stages if pos == t.n else []


def _bisect_period(
    probe: Callable[[float], list[Stage]], t: CostTable, lo: float, hi: float
) -> tuple[float, list[Stage]]:
    """Least bottleneck in ``[lo, hi]`` that ``probe`` accepts (to 1e-4), with its stages."""
    found = probe(hi)
    if not found:
        return inf, []
    hi = max(t.period(*s) for s in found)
    while hi - lo > 1e-4 * hi:
        mid = 0.5 * (lo + hi)
        trial = probe(mid)
        if trial:
            found, hi = trial, max(t.period(*s) for s in trial)
        else:
            lo = mid
    return hi, found


def _neighbours(order: list[int], used: int) -> Iterator[list[int]]:
    """Orders one move away: swap two devices, or move one device in front of another.

    Only moves that touch the first ``used + 1`` places can change the probe.
    """
    for a in range(min(used + 1, len(order))):
        for b in range(len(order)):
            if b > a:
                swapped = order.copy()
                swapped[a], swapped[b] = order[b], order[a]
                yield swapped
            if b != a:
                moved = order.copy()
                moved.insert(a, moved.pop(b))
                yield moved


def _local_search(
    t: CostTable, order: list[int], lo: float, limit: int, probes: int
) -> tuple[float, list[Stage]]:
    """First-improvement descent on the device order; ``probes`` bounds the work.

    A move must gain at least 0.1 % (smaller gains are left to the final re-cut);
    each accepted move's bisection is charged to the budget as well.
    """
    best, found = _bisect_period(partial(_in_order, t, order, limit=limit), t, lo, inf)
    improved = bool(found)
    while improved and probes > 0:
        improved = False
        memo: dict[tuple[int, int], int] = {}
        for candidate in _neighbours(order, len(found)):
            probes -= 1
            if probes < 0:
                break
            if _in_order(t, candidate, best * (1 - 1e-3), limit, memo):
                order = candidate
                best, found = _bisect_period(partial(_in_order, t, order, limit=limit), t, lo, best)
                probes -= 16
                improved = True
                break
    return best, found


def best_order(t: CostTable, limit: int, probes: int = 1500) -> tuple[float, list[Stage]]:
    """Least bottleneck found and its stages, or ``(inf, [])`` when no probe succeeds.

    Greedy bisection first; then local search from three starts (the greedy's
    order with spare devices appended, fastest first, slowest first), each with
    ``probes`` probes. Orders list every device, so a move can bring a spare in.
    """
    lo = t.flops[t.n] / sum(1.0 / spf for spf in t.spf)  # even a perfect split needs this
    best, found = _bisect_period(lambda x: greedy(t, x, limit), t, lo, inf)
    if not found:
        return inf, []
    devices = range(len(t.spf))
    starts = [
        [d for _, _, d in found] + sorted(set(devices) - {d for _, _, d in found}),
        sorted(devices, key=lambda d: (t.spf[d], d)),
        sorted(devices, key=lambda d: (-t.spf[d], d)),
    ]
    for order in starts:
        best, found = min((best, found), _local_search(t, order, lo, limit, probes))
    return best, found
