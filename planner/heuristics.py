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
from collections.abc import Callable, Sequence
from functools import partial
from math import inf

from edgeslice.planner.costtable import CostTable

Stage = tuple[int, int, int]  # (start, end, device index)


def _reach(t: CostTable, i: int, d: int, limit_s: float) -> int:
    """Furthest end ``j`` with ``[i, j)`` fitting ``d`` and period <= ``limit_s`` (or ``i``).

    Starts below both the memory limit and the compute-only bound, then walks
    down: ``drop`` links skip ends whose CPU cannot be lower, single steps skip
    ends whose uplink is too slow for the bound. A batching device's CPU is the
    smaller of two (planner/costtable.py): the furthest end under either.
    """
    if t.down[d][i] > limit_s:
        return i
    j = _walk_down(t, i, d, limit_s, t.flops, t.head[d], t.offset[d], t.drop[d])
    if t.batching[d]:
        j = max(j, _walk_down(t, i, d, limit_s, t.bflops[d], t.bhead[d], t.boffset[d], t.bdrop[d]))
    return j


def _walk_down(
    t: CostTable,
    i: int,
    d: int,
    limit_s: float,
    flops: list[float],
    head: list[float],
    offset: list[float],
    drop: list[int],
) -> int:
    theta = limit_s - offset[i]  # CPU(i, j) <= limit_s  <=>  head[j] <= theta
    flops_bound = (theta - t.min_compute) / t.spf[d]  # head[j] >= spf * flops[j] + min_compute
    j = min(t.reach[d][i], bisect_right(flops, flops_bound) - 1)
    up = t.up[d]
    while j > i and (head[j] > theta or up[j] > limit_s):
        j = drop[j] if head[j] > theta else j - 1
    return max(j, i)


def _room_left(t: CostTable, r: int, left: list[int], stages_left: int, limit_s: float) -> bool:
    """Necessary conditions for the devices ``left`` to cover segments ``[r, n)`` within limits."""
    if stages_left < 1 or not left:
        return False
    budgets = [t.budget[e] for e in left]
    capacity = sum(1.0 / t.spf[e] for e in left) * (limit_s - t.min_compute)
    return (
        t.suffix_mem[r] <= max(budgets)
        and t.weights[t.n] - t.weights[r] <= sum(budgets)
        and t.least_flops[t.n] - t.least_flops[r] <= capacity
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


def _moves(size: int, used: int) -> list[tuple[int, int, bool]]:
    """``(a, b, swap)``: swap places a and b, or move the device at b in front of place a.

    Only moves that touch the first ``used + 1`` places can change a probe.
    """
    return [
        (a, b, swap)
        for a in range(min(used + 1, size))
        for b in range(size)
        for swap in (True, False)
        if (b > a if swap else b != a)
    ]


def _apply(order: list[int], a: int, b: int, swap: bool) -> tuple[int, list[int]]:
    """The order after one move, with the first place it changes."""
    moved = order.copy()
    if swap:
        moved[a], moved[b] = order[b], order[a]
        return a, moved
    moved.insert(a, moved.pop(b))
    return min(a, b), moved


def _walk(
    t: CostTable,
    order: Sequence[int],
    start: int,
    state: tuple[int, int],
    limit_s: float,
    limit: int,
    memo: dict[int, int],
    trace: list[tuple[int, int]] | None = None,
) -> bool:
    """:func:`_in_order` from ``order[start]`` on, at ``state`` = (position, stages so far).

    ``memo`` caches reaches by ``position * D + device`` for this ``limit_s``;
    ``trace`` collects the state before each device, so a candidate that
    differs from this order only from index ``a`` on can start from ``trace[a]``.
    """
    (pos, count), width = state, len(t.spf)
    for d in order[start:]:
        if trace is not None:
            trace.append((pos, count))
        if pos == t.n or count == limit:
            break
        r = memo.get(pos * width + d, -1)
        if r < 0:
            r = memo[pos * width + d] = _reach(t, pos, d, limit_s)
        if r > pos:
            pos, count = r, count + 1
    return pos == t.n


def _local_search(
    t: CostTable, order: list[int], lo: float, limit: int, probes: int
) -> tuple[float, list[Stage]]:
    """First-improvement descent on the device order; ``probes`` bounds the work.

    A move must gain at least 0.1 % (smaller gains are left to the final re-cut);
    after a gain the scan resumes where it was rather than from the first move,
    and stops after a full round of moves without one. Each accepted move's
    bisection is charged to the budget as well.
    """
    best, found = _bisect_period(partial(_in_order, t, order, limit=limit), t, lo, inf)
    if not found:
        return best, found
    moves, k, idle = _moves(len(order), len(found)), 0, 0
    target, memo, trace = best * (1 - 1e-3), dict[int, int](), list[tuple[int, int]]()
    _walk(t, order, 0, (0, 0), target, limit, memo, trace)
    while idle < len(moves) and probes > 0:
        first, candidate = _apply(order, *moves[k % len(moves)])
        k, idle, probes = k + 1, idle + 1, probes - 1
        state = trace[first] if first < len(trace) else trace[-1]
        if _walk(t, candidate, first, state, target, limit, memo):
            order = candidate
            best, found = _bisect_period(partial(_in_order, t, order, limit=limit), t, lo, best)
            moves, idle, probes = _moves(len(order), len(found)), 0, probes - 16
            target, memo, trace = best * (1 - 1e-3), {}, []
            _walk(t, order, 0, (0, 0), target, limit, memo, trace)
    return best, found


def best_order(t: CostTable, limit: int, thorough: bool = True) -> tuple[float, list[Stage]]:
    """Least bottleneck found and its stages, or ``(inf, [])`` when no probe succeeds.

    Greedy bisection first; then local search from three starting orders (the
    greedy's order with spare devices appended, fastest first, slowest first),
    1500 probes each. ``thorough=False`` takes the greedy's first feasible order
    without bisecting and searches from it alone with 300 probes. Orders list
    every device, so a move can bring a spare in.
    """
    lo = t.least_flops[t.n] / sum(1.0 / spf for spf in t.spf)  # even a perfect split needs this
    if thorough:
        best, found = _bisect_period(lambda x: greedy(t, x, limit), t, lo, inf)
    else:
        found = greedy(t, inf, limit)
        best = max((t.period(*s) for s in found), default=inf)
    if not found:
        return inf, []
    devices = range(len(t.spf))
    orders = [
        [d for _, _, d in found] + sorted(set(devices) - {d for _, _, d in found}),
        sorted(devices, key=lambda d: (t.spf[d], d)),
        sorted(devices, key=lambda d: (-t.spf[d], d)),
    ]
    for order in orders if thorough else orders[:1]:
        result = _local_search(t, order, lo, limit, 1500 if thorough else 300)
        best, found = min((best, found), result)
    return best, found
