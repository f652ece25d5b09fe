"""Owns the precomputed stage costs the partitioner's DPs run on (O(1) per stage).

:class:`CostTable` holds, per device and cut point, the terms of
:mod:`planner.costmodel`'s reference functions, so that for stage ``[i, j)`` on
device ``d``:

* CPU per request ``head[d][j] + offset[d][i]`` (compute prefix sums, the hop CPU
  of the stage's input at ``i`` and output at ``j``),
* downlink ``down[d][i]`` and uplink ``up[d][j]`` occupancy,
* ``period = max(CPU, down, up)`` (:func:`~planner.costmodel.stage_period_s`),
* ``latency = lhead[d][j] + loff[d][i]``: the stage's CPU, both its link halves,
  the broker round of its incoming hop and its RTT, which makes a pipeline's
  latency separable by stage: ``client_s + sum(latency(stage))``.

With ``batched=True`` (the throughput objective) a device whose agent batches
(``batching[d]``) has a second, saturated CPU ``bhead[d][j] + boffset[d][i]``: compute over
the batch gains measured per segment (prefix sums ``bflops[d]`` of ``flops_k / gain_k``,
:func:`~planner.batchcost.device_gains`), and its CPU in the period is the smaller of the
two, since a stage that batching slows down is told not to batch
(:func:`~planner.batchcost.saturated_period_s`, which the period then equals outside a
stage gain of 0.95-1). The minimum of two separable costs keeps the DPs exact: the
stages under a bound are the union of those under each. Latency stays at batch 1.
``least_flops`` is a prefix sum of work no device's CPU goes below (capacity bounds).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from edgeslice.planner.batchcost import device_gains
from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    client_period_s,
    hop_cpu_time_s,
    hop_flops,
    link_occupancy_s,
    num_chunks,
    seconds_per_flop,
    stage_in_bytes,
)


class CostTable:
    """Stage costs of one (model, fleet, params) precomputed for the partitioner's DPs.

    Devices are addressed by index; see the module docstring for the terms.
    """

    def __init__(
        self,
        model: ModelCost,
        devices: Sequence[Device],
        params: CostParams = DEFAULT_PARAMS,
        batched: bool = False,
    ) -> None:
        segs = model.segments
        self.n = n = len(segs)
        self.min_compute = params.min_compute_s
        self.flops = [0.0] * (n + 1)  # prefix sums
        self.weights = [0.0] * (n + 1)  # prefix sums of headroom-scaled parameter bytes
        for k, seg in enumerate(segs):
            self.flops[k + 1] = self.flops[k] + seg.flops
            self.weights[k + 1] = self.weights[k] + params.memory_factor * seg.param_bytes
        # mem[i][j - i - 1]: memory of stage [i, j) before rounding up; non-decreasing in j.
        weights, acts = [s.param_bytes for s in segs], [s.act_bytes for s in segs]
        factor = params.memory_factor
        # Unrounded: ceil(x) <= budget exactly when x <= budget, budgets being integers.
        self.mem = [
            [
                factor * (w + a)
                for w, a in zip(accumulate(weights[i:]), accumulate(acts[i:], max), strict=True)
            ]
            for i in range(n)
        ]
        self.spf = [seconds_per_flop(d, params) for d in devices]
        self.budget = [d.memory_bytes for d in devices]
        self.rtt = [d.rtt_s for d in devices]
        # Same arithmetic as link_occupancy_s / hop_flops, computed once per cut.
        ins = [stage_in_bytes(model, i) for i in range(n)]
        outs = [0] + [seg.out_bytes for seg in segs]
        in_fixed = [0.5 * params.per_message_s * num_chunks(b, params) for b in ins]
        out_fixed = [0.5 * params.per_message_s * num_chunks(b, params) for b in outs]
        in_cpu = [hop_flops(b, params) for b in ins]
        out_cpu = [hop_flops(b, params) for b in outs]
        self.down = [
            [b / d.bandwidth_bps + c for b, c in zip(ins, in_fixed, strict=True)] for d in devices
        ]
        self.up = [
            [b / d.bandwidth_bps + c for b, c in zip(outs, out_fixed, strict=True)] for d in devices
        ]
        # The client's side of the first and the last hop, and its own period.
        self.client_s = (
            hop_cpu_time_s(model.input_bytes, None, params)
            + link_occupancy_s(model.input_bytes, None, params)
            + link_occupancy_s(model.output_bytes, None, params)
            + hop_cpu_time_s(model.output_bytes, None, params)
            + params.client_rtt_s
            + params.broker_round_s  # the last hop's; each stage carries its incoming hop's
        )
        self.client_period = client_period_s(model, params)
        # CPU of (i, j, d) = head[d][j] + offset[d][i]: the DPs' inner loops read two lists.
        self.head = [
            [spf * (f + c) + self.min_compute for f, c in zip(self.flops, out_cpu, strict=True)]
            for spf in self.spf
        ]
        self.offset = [[spf * (in_cpu[i] - self.flops[i]) for i in range(n)] for spf in self.spf]
        self.lhead = [
            [h + u for h, u in zip(head, up, strict=True)]
            for head, up in zip(self.head, self.up, strict=True)
        ]
        self.loff = [
            [o + w + params.broker_round_s + rtt for o, w in zip(off, down, strict=True)]
            for off, down, rtt in zip(self.offset, self.down, self.rtt, strict=True)
        ]
        self.drop = [_drops(head) for head in self.head]
        # The saturated CPU of devices whose agents batch (module docstring).
        gains = [device_gains(model, d) if batched else [1.0] * n for d in devices]
        self.batching = [any(g != 1.0 for g in gs) for gs in gains]
        self.bflops = [
            [0.0, *accumulate(s.flops / g for s, g in zip(segs, gs, strict=True))]
            if on
            else self.flops
            for gs, on in zip(gains, self.batching, strict=True)
        ]
        best = [max(1.0, *(gs[k] for gs in gains)) for k in range(n)]
        self.least_flops = [0.0, *accumulate(s.flops / g for s, g in zip(segs, best, strict=True))]
        self.bhead = [
            [spf * (f + c) + self.min_compute for f, c in zip(bf, out_cpu, strict=True)]
            if on
            else head
            for spf, bf, on, head in zip(
                self.spf, self.bflops, self.batching, self.head, strict=True
            )
        ]
        self.boffset = [
            [spf * (in_cpu[i] - bf[i]) for i in range(n)] if on else off
            for spf, bf, on, off in zip(
                self.spf, self.bflops, self.batching, self.offset, strict=True
            )
        ]
        self.bdrop = [
            _drops(bh) if on else drop
            for bh, on, drop in zip(self.bhead, self.batching, self.drop, strict=True)
        ]
        self.suffix_mem = [0.0] * (n + 1)  # largest one-segment memory from segment k on
        for k in range(n - 1, -1, -1):
            self.suffix_mem[k] = max(self.suffix_mem[k + 1], self.mem[k][0])
        # reach[d][i]: largest end j such that [i, j) fits device d (i when none does);
        # non-decreasing in i, because a shorter stage never needs more memory.
        self.reach = [
            [i + bisect_right(self.mem[i], budget) for i in range(n)] for budget in self.budget
        ]

    def cpu(self, i: int, j: int, d: int) -> float:
        """CPU time per request of stage ``[i, j)`` on device ``d`` (hop sides + compute;
        the saturated one where ``d`` batches, see the module docstring)."""
        return min(self.head[d][j] + self.offset[d][i], self.bhead[d][j] + self.boffset[d][i])

    def period(self, i: int, j: int, d: int) -> float:
        """Steady-state time per request of stage ``[i, j)`` on ``d``: max(CPU, links)."""
        return max(self.cpu(i, j, d), self.up[d][j], self.down[d][i])

    def latency(self, i: int, j: int, d: int) -> float:
        """This stage's share of one request's latency (see the module docstring)."""
        return self.lhead[d][j] + self.loff[d][i]

    def fits(self, i: int, j: int, d: int) -> bool:
        """Whether stage ``[i, j)`` fits device ``d``."""
        return j <= self.reach[d][i]


def _drops(head: Sequence[float]) -> list[int]:
    """Per end ``j``: the last ``j' < j`` with ``head[j'] < head[j]`` (-1 if none). Scanning
    for the furthest end under a bound may jump there: everything between is no lower."""
    drop, stack = [-1] * len(head), list[int]()
    for j, value in enumerate(head):
        while stack and head[stack[-1]] >= value:
            stack.pop()
        drop[j] = stack[-1] if stack else -1
        stack.append(j)
    return drop
