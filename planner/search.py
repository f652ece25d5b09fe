"""Owns the plan search: exact DPs over cuts and device classes, lazy latency, replicas.

Everything here works on a :class:`~planner.costmodel.CostTable` (devices by
index) and returns stages as ``(start, end, device index)``;
:mod:`planner.partition` validates inputs, calls :func:`search` and prices the
result. The algorithms, their complexity and when they are exact are described
in :mod:`planner.partition`'s docstring.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence

from edgeslice.planner.costmodel import CostParams, Device, seconds_per_flop
from edgeslice.planner.costtable import CostTable
from edgeslice.planner.heuristics import best_order, greedy
from edgeslice.planner.margin import prefer

EXACT_BUDGET_US = 40_000  # the exact DP runs by default when estimated under this
_INF = math.inf
Stage = tuple[int, int, int]  # (start, end, device index)
Group = tuple[int, int, list[int]]  # (start, end, [primary, *replicas])


def _extend(
    t: CostTable, prev: list[float], d: int, mode: str, cap: float
) -> tuple[list[float], list[int]]:
    """Best value per end ``j`` after one more stage ``[i, j)`` on device ``d`` from ``prev[i]``.

    ``mode`` "sum" adds the stage's latency, "max" takes the bottleneck; stages
    whose period exceeds ``cap`` are not allowed.
    """
    n, flops, spf, base = t.n, t.flops, t.spf[d], t.min_compute
    head, b, reach = t.head[d], t.offset[d], t.reach[d]  # CPU of (i, j) = head[j] + b[i]
    # a batching device: CPU = min(head[j] + b[i], bhead[j] + bb[i]) (planner/costtable.py)
    batching, bflops, bhead, bb = t.batching[d], t.bflops[d], t.bhead[d], t.boffset[d]
    up, down, lhead, lb = t.up[d], t.down[d], t.lhead[d], t.loff[d]  # latency = lhead + lb
    vals, args = [_INF] * (n + 1), [-1] * (n + 1)
    starts = [i for i in range(n) if prev[i] < _INF]
    if not starts:
        return vals, args
    window: deque[int] = deque()  # sliding-minimum candidates for uncapped "sum"
    lo, nxt = 0, 0
    for j in range(1, n + 1):
        while lo < j and reach[lo] < j:  # memory: [i, j) must fit
            lo += 1
        a, ab = head[j], bhead[j]
        first = lo
        if cap < _INF:  # the first start whose CPU may be under the cap, either way
            first = bisect_left(flops, flops[j] - (cap - base) / spf)
            if batching:
                first = min(first, bisect_left(bflops, bflops[j] - (cap - base) / spf))
            first = max(lo, first)
        if mode == "sum" and cap == _INF:
            while nxt < j:  # admit start j-1 into the deque
                if prev[nxt] < _INF:
                    key = prev[nxt] + lb[nxt]
                    while window and prev[window[-1]] + lb[window[-1]] >= key:
                        window.pop()
                    window.append(nxt)
                nxt += 1
            while window and window[0] < first:
                window.popleft()
            if window:
                i = window[0]
                vals[j], args[j] = prev[i] + lb[i] + lhead[j], i
            continue
        best, arg = _INF, -1
        if up[j] > cap:
            continue
        for i in starts[bisect_left(starts, first) : bisect_left(starts, j)]:
            h = max(min(a + b[i], ab + bb[i]) if batching else a + b[i], down[i])
            if h > cap:
                continue
            v = prev[i] + lhead[j] + lb[i] if mode == "sum" else max(prev[i], h, up[j])
            if v < best:
                best, arg = v, i
        vals[j], args[j] = best, arg
    return vals, args


def device_classes(devices: Sequence[Device], params: CostParams) -> list[list[int]]:
    """Indices of devices grouped by identical cost numbers (interchangeable in a plan)."""
    groups: dict[tuple[float, int, float, float, int], list[int]] = {}
    for k, d in enumerate(devices):
        key = (seconds_per_flop(d, params), d.memory_bytes, d.bandwidth_bps, d.rtt_s, d.max_batch)
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def _exact_cost_us(
    classes: Sequence[Sequence[int]], n: int, objective: str, stages: int = 0
) -> float:
    """Estimated microseconds of :func:`_state_dp` (constants measured on CPython 3.11).

    Per (state, class) pair: a latency pass costs ~1.2 us per end; a throughput
    run is two passes whose ends each try the starts within one stage's reach,
    about ``n / stages`` of them (``stages`` from the heuristic plan, if known).
    """
    states = math.prod(len(c) + 1 for c in classes)
    pairs = states * sum(len(c) / (len(c) + 1) for c in classes)
    if objective == "latency":
        return pairs * (1.2 * n + 5)
    window = n / max(1, stages or min(sum(len(c) for c in classes), n))
    return pairs * 2 * (n * (1 + 0.15 * window) + 5)


def _state_dp(
    t: CostTable, classes: Sequence[Sequence[int]], limit: int, mode: str, cap: float
) -> tuple[float, list[Stage]]:
    """Exact DP over (cut, used-count per class); returns (value, stages) or (inf, [])."""
    counts = [len(c) for c in classes]
    strides = [math.prod(x + 1 for x in counts[:c]) for c in range(len(counts))]
    start = [_INF] * (t.n + 1)
    start[0] = 0.0
    values: list[list[float] | None] = [start]
    parents: list[list[tuple[int, int]]] = [[]]
    best, best_state = _INF, 0
    for s in range(1, math.prod(x + 1 for x in counts)):
        used = [(s // strides[c]) % (counts[c] + 1) for c in range(len(counts))]
        cur, par = [_INF] * (t.n + 1), [(-1, -1)] * (t.n + 1)
        for c in (c for c in range(len(counts)) if used[c] and sum(used) <= limit):
            prev = values[s - strides[c]]
            if prev is None:
                continue
            vals, args = _extend(t, prev, classes[c][0], mode, cap)
            for j in range(1, t.n + 1):
                if vals[j] < cur[j]:
                    cur[j], par[j] = vals[j], (c, args[j])
        values.append(cur if any(v < _INF for v in cur) else None)
        parents.append(par)
        if cur[t.n] < best:
            best, best_state = cur[t.n], s
    stages: list[Stage] = []
    s, j, taken = best_state, t.n, [0] * len(counts)
    while s and best < _INF:
        c, i = parents[s][j]
        stages.append((i, j, classes[c][taken[c]]))
        taken[c] += 1
        s, j = s - strides[c], i
    return best, stages[::-1]


def _ordered_dp(
    t: CostTable, order: Sequence[int], mode: str, cap: float
) -> tuple[float, list[Stage]]:
    """Exact DP over cuts for devices used in ``order`` (any subsequence of it)."""
    values = [_INF] * (t.n + 1)
    values[0] = 0.0
    history: list[list[int]] = []
    for d in order:
        vals, args = _extend(t, values, d, mode, cap)
        choice = [-1] * (t.n + 1)
        for j in range(1, t.n + 1):
            if vals[j] < values[j]:
                values[j], choice[j] = vals[j], args[j]
        history.append(choice)
    stages: list[Stage] = []
    j = t.n
    for d, choice in zip(reversed(order), reversed(history), strict=True):
        if values[t.n] < _INF and j > 0 and choice[j] >= 0:
            stages.append((choice[j], j, d))
            j = choice[j]
    return values[t.n], stages[::-1]


def _two_phase(
    search: Callable[[str, float], tuple[float, list[Stage]]], objective: str, cap: float
) -> list[Stage]:
    """Latency: one "sum" search. Throughput: least bottleneck, then least latency under it."""
    if objective == "throughput":
        period, _ = search("max", cap)
        if period == _INF:
            return []
        cap = period * (1 + 1e-9) + 1e-15
    return search("sum", cap)[1]


def _throughput_heuristic(t: CostTable, limit: int, thorough: bool) -> list[Stage]:
    """The heuristics' best order (:func:`~planner.heuristics.best_order`), re-cut exactly."""
    best, found = best_order(t, limit, thorough)
    sequence = [d for _, _, d in found]
    cap = best * (1 + 1e-9) + 1e-15
    return _two_phase(lambda m, c: _ordered_dp(t, sequence, m, c), "throughput", cap) or found


def _latency_layers(t: CostTable, tracked: Sequence[int]) -> list[Stage]:
    """Least latency if each ``tracked`` device is used at most once and the others may repeat.

    A lower bound on the true optimum (a relaxation), and the optimum itself when
    the answer repeats no device. One layer of prefix values per subset of
    ``tracked`` devices used; inside a layer the untracked devices extend prefixes
    with one sliding minimum each: O(2**len(tracked) * n * D).
    """
    n = t.n
    free = [d for d in range(len(t.spf)) if d not in tracked]
    layers: list[list[float]] = []
    parents: list[list[tuple[int, int, int]]] = []
    for m in range(1 << len(tracked)):
        val, par = [_INF] * (n + 1), [(-1, -1, -1)] * (n + 1)
        val[0] = 0.0 if m == 0 else _INF
        for x, d in enumerate(tracked):
            if m >> x & 1:
                ext, args = _extend(t, layers[m ^ (1 << x)], d, "sum", _INF)
                for j in range(1, n + 1):
                    if ext[j] < val[j]:
                        val[j], par[j] = ext[j], (args[j], d, m ^ (1 << x))
        windows: list[deque[int]] = [deque() for _ in free]
        for j in range(1, n + 1):
            for w, d in zip(windows, free, strict=True):
                b, reach = t.loff[d], t.reach[d]
                if val[j - 1] < _INF:
                    key = val[j - 1] + b[j - 1]
                    while w and val[w[-1]] + b[w[-1]] >= key:
                        w.pop()
                    w.append(j - 1)
                while w and reach[w[0]] < j:
                    w.popleft()
                if w:
                    v = val[w[0]] + b[w[0]] + t.lhead[d][j]
                    if v < val[j]:
                        val[j], par[j] = v, (w[0], d, m)
        layers.append(val)
        parents.append(par)
    m = min(range(len(layers)), key=lambda m: layers[m][n])
    stages: list[Stage] = []
    j = n if layers[m][n] < _INF else 0
    while j > 0:
        i, d, m = parents[m][j]
        stages.append((i, j, d))
        j = i
    return stages[::-1]


def _latency_search(
    t: CostTable, classes: list[list[int]], limit: int, exact: bool | None
) -> tuple[list[Stage], bool]:
    """Lazy constraints: relax distinctness, then track each device the answer repeats.

    Every round is a lower bound, so the first answer without a repeated device is
    optimal. Rounds stop when their work passes the budget; then the exact DP
    (when affordable or forced) or the heuristics take over.
    """
    tracked: list[int] = []
    relaxed: list[Stage] = []
    while not tracked or (1 << len(tracked)) * t.n * len(t.spf) * 1.5 <= EXACT_BUDGET_US:
        relaxed = _latency_layers(t, tracked)
        if not relaxed:
            return [], True  # not even the relaxation fits: nothing does
        used = [d for _, _, d in relaxed]
        repeated = sorted({d for d in used if used.count(d) > 1})
        if not repeated:
            if len(relaxed) <= limit:
                return relaxed, True
            break
        tracked += repeated

    def exact_dp(cls: list[list[int]]) -> list[Stage]:
        return _two_phase(lambda m, c: _state_dp(t, cls, limit, m, c), "latency", _INF)

    if exact or (exact is None and _exact_cost_us(classes, t.n, "latency") <= EXACT_BUDGET_US):
        return exact_dp(classes), True
    single = [t.latency(0, t.n, d) for d in range(len(t.spf))]
    in_relaxed = {d for _, _, d in relaxed}  # the devices the relaxation found best
    ranked = sorted(range(len(t.spf)), key=lambda d: (d not in in_relaxed, single[d], d))
    chosen: set[int] = set()
    for d in ranked:
        subset = [[e for e in c if e in chosen | {d}] for c in classes]
        if chosen and _exact_cost_us([c for c in subset if c], t.n, "latency") > EXACT_BUDGET_US:
            break
        chosen.add(d)
    candidates = [exact_dp([c for c in ([e for e in c if e in chosen] for c in classes) if c])]
    order = [d for _, _, d in greedy(t, _INF, limit)]
    candidates.append(_two_phase(lambda m, c: _ordered_dp(t, order, m, c), "latency", _INF))
    found = [c for c in candidates if c]
    best = min(found, key=lambda s: sum(t.latency(*x) for x in s), default=[])
    return best, len(chosen) == len(t.spf)


def search(
    t: CostTable,
    classes: list[list[int]],
    objective: str,
    limit: int,
    exact: bool | None,
    thorough: bool = True,
) -> tuple[list[Stage], bool]:
    """The best pipeline of at most ``limit`` stages (no replicas) and whether it is proven.

    ``thorough=False`` makes the throughput heuristics cheaper
    (:func:`~planner.heuristics.best_order`) and gives the exact DP a quarter of
    the time budget (for the shorter candidate pipelines of :func:`plan_groups`).
    """
    if objective == "latency":
        return _latency_search(t, classes, limit, exact)
    heuristic = _throughput_heuristic(t, limit, thorough)
    cost = _exact_cost_us(classes, t.n, objective, len(heuristic))
    if exact or (exact is None and cost <= EXACT_BUDGET_US / (1 if thorough else 4)):
        cap = max((t.period(*s) for s in heuristic), default=_INF) * (1 + 1e-9) + 1e-15
        return _two_phase(lambda m, c: _state_dp(t, classes, limit, m, c), objective, cap), True
    return heuristic, False


def stage_limits(limit: int) -> list[int]:
    """Pipeline lengths worth trying before replicas: 1-8, then doubling, and ``limit``.

    Every length up to 8 is tried so that a fleet of up to 8 devices tries every
    length the fleet one device smaller tried (adding a device cannot lose a candidate).
    """
    limits = set(range(1, min(limit, 8) + 1)) | {limit}
    k = 16
    while k < limit:
        limits.add(k)
        k *= 2
    return sorted(limits)


def group_cost(t: CostTable, groups: Sequence[Group]) -> tuple[float, float]:
    """(period, latency) of stages with replicas; the period is never below the client's."""
    period = max(
        [t.client_period] + [1.0 / sum(1.0 / t.period(i, j, d) for d in ds) for i, j, ds in groups]
    )
    return period, sum(t.latency(i, j, ds[0]) for i, j, ds in groups)


def plan_groups(
    t: CostTable,
    classes: list[list[int]],
    objective: str,
    limit: int,
    exact: bool | None,
    replicas: bool,
    margin: float = 0.0,
) -> tuple[list[Group], bool]:
    """Stages as ``(start, end, [primary, *replicas])`` and whether the pipeline is proven.

    For throughput with replicas, shorter pipelines leave more devices to
    replicate (a model that fits one board may run fastest as pure data
    parallelism), so the best pipeline of each length in :func:`stage_limits`
    gets its replicas; from the shortest up, a deeper candidate replaces the best
    so far only when its period is lower by more than ``margin``
    (:func:`~planner.margin.prefer`), one no deeper when it is lower at all, or
    equal with a lower latency.
    """
    lengths = stage_limits(limit) if replicas and objective == "throughput" else [limit]
    best: tuple[float, float, int] = (_INF, _INF, 0)
    chosen: list[Group] = []
    proven = True
    for k in lengths:  # shorter candidates get a smaller local-search budget
        stages, ok = search(t, classes, objective, k, exact, thorough=k == limit)
        if not stages:
            if k == limit:  # the most permissive search: its verdict explains a failure
                proven = ok
            continue
        groups = [(i, j, [d]) for i, j, d in stages]
        if replicas:
            used = {d for _, _, d in stages}
            add_replicas(t, groups, [d for d in range(len(t.spf)) if d not in used])
        period, latency = group_cost(t, groups)
        depth = len(groups)
        tie = period <= best[0] * (1 + 1e-9) and depth <= best[2] and latency < best[1]
        if not chosen or prefer(period, depth, best[0], best[2], margin) or tie:
            best, chosen, proven = (period, latency, depth), groups, ok
    return chosen, proven


def add_replicas(t: CostTable, stages: list[Group], spare: list[int]) -> None:
    """Give spare devices to the stage with the largest effective period while one fits it."""
    spare = sorted(spare)
    while spare:
        eff = [1.0 / sum(1.0 / t.period(i, j, d) for d in ds) for i, j, ds in stages]
        i, j, ds = stages[max(range(len(stages)), key=lambda k: (eff[k], -k))]
        fitting = [d for d in spare if t.fits(i, j, d)]
        if not fitting:
            return
        d = min(fitting, key=lambda d: (t.period(i, j, d), d))
        ds.append(d)
        spare.remove(d)
