"""Owns the analytic cost model: how long a slice of a model takes on a device and on the wire.

The planner must compare thousands of (slice, device) pairs per plan, so costs
are closed-form: FLOPs over a calibrated rate, bytes over a measured link, a
fixed price per MQTT message. Analytic estimates are systematically off on real
boards (cache effects, thermal limits, the Python overhead of a stage), so a
per-agent multiplicative ``correction`` is fitted from the stage timings agents
report (:func:`fit_correction`) -- FlexPie's learned-correction idea, fed by live
data instead of an offline sweep, and kept to one robust ratio per agent so it
cannot overfit a handful of samples.

Every hop goes through the broker (a star): a transfer costs the sender's
upload, the receiver's download, half of each round trip and a fixed overhead
per chunk. ``None`` stands for the client, which sits on a fast local link.

:class:`CostTable` precomputes prefix sums and per-(cut, device) link terms so a
stage is priced in O(1); the partitioner's dynamic programs run on it, while
:func:`compute_s` / :func:`transfer_s` are the readable reference definitions
the table must agree with (the tests check both).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from statistics import median


@dataclass(frozen=True)
class Segment:
    """An atomic piece of the model between two consecutive cut points (batch 1)."""

    flops: float  # forward FLOPs of the piece
    param_bytes: int  # parameter + buffer bytes it holds
    out_bytes: int  # bytes of the activation(s) crossing the cut after this piece
    act_bytes: int  # peak activation working memory while running it


@dataclass(frozen=True)
class ModelCost:
    """What the planner knows of a model: its input size and its segments in order."""

    name: str
    input_bytes: int
    segments: tuple[Segment, ...]

    @property
    def output_bytes(self) -> int:
        """Bytes of the final result sent back to the client."""
        return self.segments[-1].out_bytes if self.segments else 0


@dataclass(frozen=True)
class Device:
    """One agent as the cost model sees it: calibrated speed, memory budget, link, load."""

    agent_id: str
    gflops: float  # effective, calibrated GFLOP/s
    memory_bytes: int  # memory budget for model stages
    bandwidth_bps: float  # measured throughput device <-> broker, bytes/s
    rtt_s: float  # measured round trip device <-> broker
    load: float = 0.0  # 0..1 live CPU load; compute slows by 1/(1-load), capped


@dataclass(frozen=True)
class CostParams:
    """Knobs of the cost model; ``correction`` maps agent_id -> fitted compute multiplier."""

    per_message_s: float = 0.002  # broker + codec overhead per chunk
    chunk_bytes: int = 262144  # chunk size on the wire (DESIGN §4)
    memory_factor: float = 1.5  # headroom over weights + peak activation
    min_compute_s: float = 0.0002  # fixed per-stage overhead (dispatch, tensor unpack)
    client_bandwidth_bps: float = 100e6  # the client's link to the broker (fast, local)
    client_rtt_s: float = 0.0005
    max_slowdown: float = 10.0  # cap of the 1/(1-load) slowdown
    correction: Mapping[str, float] = field(default_factory=dict, hash=False)


DEFAULT_PARAMS = CostParams()


def _check_range(model: ModelCost, start: int, end: int) -> None:
    if not 0 <= start < end <= len(model.segments):
        raise ValueError(
            f"stage range [{start}, {end}) is not inside model {model.name!r} "
            f"with {len(model.segments)} segments"
        )


def seconds_per_flop(device: Device, params: CostParams = DEFAULT_PARAMS) -> float:
    """Seconds one FLOP takes on ``device`` under its current load and fitted correction."""
    load = min(max(device.load, 0.0), 1.0 - 1.0 / params.max_slowdown)
    factor = params.correction.get(device.agent_id, 1.0)
    return factor / ((1.0 - load) * device.gflops * 1e9)


def compute_s(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Predicted time to run segments ``[start, end)`` once on ``device``."""
    _check_range(model, start, end)
    flops = math.fsum(s.flops for s in model.segments[start:end])
    return flops * seconds_per_flop(device, params) + params.min_compute_s


def num_chunks(nbytes: int, params: CostParams = DEFAULT_PARAMS) -> int:
    """Messages a payload of ``nbytes`` becomes on the wire (at least one)."""
    return max(1, -(-nbytes // params.chunk_bytes))


def link_occupancy_s(
    nbytes: int, device: Device | None, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Time ``device``'s link is busy moving ``nbytes`` (its half of the per-chunk overhead).

    Round trips are latency, not occupancy: while one request waits on them the
    link carries the next, so pipelined throughput only pays this part.
    """
    bandwidth = params.client_bandwidth_bps if device is None else device.bandwidth_bps
    return nbytes / bandwidth + 0.5 * params.per_message_s * num_chunks(nbytes, params)


def transfer_s(
    nbytes: int, src: Device | None, dst: Device | None, params: CostParams = DEFAULT_PARAMS
) -> float:
    """One hop through the broker: upload + download + half of both RTTs + chunk overhead.

    Equals ``link_occupancy_s(src) + link_occupancy_s(dst) + (rtt_src + rtt_dst) / 2``;
    a hand-off inside one agent costs nothing.
    """
    if src is not None and dst is not None and src.agent_id == dst.agent_id:
        return 0.0
    rtt_src = params.client_rtt_s if src is None else src.rtt_s
    rtt_dst = params.client_rtt_s if dst is None else dst.rtt_s
    return (
        link_occupancy_s(nbytes, src, params)
        + link_occupancy_s(nbytes, dst, params)
        + 0.5 * (rtt_src + rtt_dst)
    )


def stage_in_bytes(model: ModelCost, start: int) -> int:
    """Bytes entering a stage that starts at segment ``start``."""
    return model.input_bytes if start == 0 else model.segments[start - 1].out_bytes


def stage_out_bytes(model: ModelCost, end: int) -> int:
    """Bytes leaving a stage that ends before segment ``end``."""
    return model.segments[end - 1].out_bytes


def stage_memory_bytes(
    model: ModelCost, start: int, end: int, params: CostParams = DEFAULT_PARAMS
) -> int:
    """Memory a stage needs: (weights + peak activation) times the headroom factor."""
    _check_range(model, start, end)
    segs = model.segments[start:end]
    raw = sum(s.param_bytes for s in segs) + max(s.act_bytes for s in segs)
    return math.ceil(params.memory_factor * raw)


def fits(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> bool:
    """Whether segments ``[start, end)`` fit ``device``'s memory budget."""
    return stage_memory_bytes(model, start, end, params) <= device.memory_bytes


def stage_period_s(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Time ``device`` is busy per request running the stage: receive + compute + send."""
    return (
        link_occupancy_s(stage_in_bytes(model, start), device, params)
        + compute_s(model, start, end, device, params)
        + link_occupancy_s(stage_out_bytes(model, end), device, params)
    )


def fit_correction(
    samples: Iterable[tuple[str, float, float]], prior_samples: float = 3.0
) -> dict[str, float]:
    """Per-agent compute multipliers from ``(agent_id, predicted_s, measured_s)`` samples.

    The estimate is the median of measured/predicted (robust to a stray slow
    request), shrunk toward 1 in log space with weight ``n / (n + prior_samples)``
    so one sample cannot swing a plan; the result is clamped to [0.1, 10].
    Samples with a non-positive or non-finite time are ignored.
    """
    ratios: dict[str, list[float]] = defaultdict(list)
    for agent_id, predicted, measured in samples:
        ok = math.isfinite(predicted) and math.isfinite(measured)
        if ok and predicted > 0 and measured > 0:
            ratios[agent_id].append(measured / predicted)
    result: dict[str, float] = {}
    for agent_id, values in sorted(ratios.items()):
        weight = len(values) / (len(values) + prior_samples)
        factor = math.exp(weight * math.log(median(values)))
        result[agent_id] = min(10.0, max(0.1, factor))
    return result


class CostTable:
    """Stage costs of one (model, fleet, params) precomputed for the partitioner's DPs.

    Devices are addressed by index. ``period(i, j, d)`` is what
    :func:`stage_period_s` returns for segments ``[i, j)`` on device ``d``;
    ``latency(i, j, d)`` adds the device's RTT, which makes a pipeline's latency
    separable by stage: ``client_s + sum(latency(stage))``.
    """

    def __init__(
        self, model: ModelCost, devices: Sequence[Device], params: CostParams = DEFAULT_PARAMS
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
        # Same arithmetic as link_occupancy_s, with the chunk counts computed once per cut.
        ins = [stage_in_bytes(model, i) for i in range(n)]
        outs = [0] + [seg.out_bytes for seg in segs]
        in_fixed = [0.5 * params.per_message_s * num_chunks(b, params) for b in ins]
        out_fixed = [0.5 * params.per_message_s * num_chunks(b, params) for b in outs]
        self.occ_in = [
            [b / d.bandwidth_bps + c for b, c in zip(ins, in_fixed, strict=True)] for d in devices
        ]
        self.occ_out = [
            [b / d.bandwidth_bps + c for b, c in zip(outs, out_fixed, strict=True)] for d in devices
        ]
        # The client's half of the first and the last hop.
        self.client_s = (
            link_occupancy_s(model.input_bytes, None, params)
            + link_occupancy_s(model.output_bytes, None, params)
            + params.client_rtt_s
        )
        # period(i, j, d) = head[d][j] + offset[d][i]: the DPs' inner loops read two lists.
        self.head = [
            [spf * f + out + self.min_compute for f, out in zip(self.flops, occ, strict=True)]
            for spf, occ in zip(self.spf, self.occ_out, strict=True)
        ]
        self.offset = [
            [occ[i] - spf * self.flops[i] for i in range(n)]
            for spf, occ in zip(self.spf, self.occ_in, strict=True)
        ]
        # drop[d][j]: the last j' < j with head[d][j'] < head[d][j] (-1 if none). Scanning
        # for the furthest end under a bound may jump there: everything between is no lower.
        self.drop: list[list[int]] = []
        for head in self.head:
            drop, stack = [-1] * (n + 1), list[int]()
            for j, value in enumerate(head):
                while stack and head[stack[-1]] >= value:
                    stack.pop()
                drop[j] = stack[-1] if stack else -1
                stack.append(j)
            self.drop.append(drop)
        self.suffix_mem = [0.0] * (n + 1)  # largest one-segment memory from segment k on
        for k in range(n - 1, -1, -1):
            self.suffix_mem[k] = max(self.suffix_mem[k + 1], self.mem[k][0])
        # reach[d][i]: largest end j such that [i, j) fits device d (i when none does);
        # non-decreasing in i, because a shorter stage never needs more memory.
        self.reach = [
            [i + bisect_right(self.mem[i], budget) for i in range(n)] for budget in self.budget
        ]

    def period(self, i: int, j: int, d: int) -> float:
        """Receive + compute + send time of stage ``[i, j)`` on device ``d``."""
        return self.head[d][j] + self.offset[d][i]

    def latency(self, i: int, j: int, d: int) -> float:
        """This stage's share of one request's latency (its link halves + RTT + compute)."""
        return self.head[d][j] + self.offset[d][i] + self.rtt[d]

    def fits(self, i: int, j: int, d: int) -> bool:
        """Whether stage ``[i, j)`` fits device ``d``."""
        return j <= self.reach[d][i]
