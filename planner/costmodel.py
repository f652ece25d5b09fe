"""Owns the analytic cost model: how long a slice of a model takes on a device and on the wire.

The planner must compare thousands of (slice, device) pairs per plan, so costs
are closed-form: FLOPs over a calibrated rate, bytes over a measured link, fixed
prices per hop and per MQTT message. Analytic estimates are systematically off on
real boards (cache effects, thermal limits, the Python overhead of a stage), so a
per-agent multiplicative ``correction`` is fitted from the stage timings agents
report (:func:`fit_correction`) -- FlexPie's learned-correction idea, fed by live
data instead of an offline sweep, one robust ratio per agent weighted by how many
requests each reported timing averages.

**A hop** (client -> stage, stage -> stage, stage -> client) goes through the
broker (a star) and costs, in order:

1. the sender's CPU: ``hop_cpu_s`` (envelope encode, ``pack_tensors``, chunking,
   the publish calls) plus ``codec_s_per_byte`` per byte;
2. the sender's uplink: bytes / bandwidth + half of ``per_message_s`` per chunk;
3. the broker round ``broker_round_s`` plus half of each side's round trip;
4. the receiver's downlink: bytes / bandwidth + the other half per chunk;
5. the receiver's CPU: reassembly, ``unpack_tensors`` and the hand-off to the
   stage worker's queue (the same ``hop_cpu_s`` + per-byte price).

CPU prices are seconds on the host that measured them (``reference_gflops``) and
scale with a device's speed like compute does (:func:`hop_cpu_time_s`). A
request's latency adds everything. A device's **period** (busy time per request
in steady state) is ``max(cpu, uplink, downlink)``: the agent receives and sends
while its stage thread computes, but the hop CPU work competes with compute for
the same cores. The client is one more device on the path (``None`` here): it
packs every input and unpacks every output over its own link, so a plan's period
is never below :func:`client_period_s`, however many replicas serve stage 0.
An agent that batches requests (agent/batching.py) divides a stage's *compute*, not its
hop costs, by a batch speed-up once its queue is full. :func:`batched_period_s` prices that
with the calibration kernel's speed-up; the plan search uses the speed-up measured per
segment of the model itself (``Segment.batch_gain``, :mod:`planner.batchcost`). Latency
and the fitted correction stay at batch 1.

Where the hop constants come from: :func:`hop_constants` fits them to the
transport benchmark's chunked and raw transfers (``benchmarks/results/transport.json``
of 2026-11-23, mosquitto on this 2-core host); the defaults below are that fit, rounded
(``tests/unit/test_costmodel.py`` keeps those rows and checks the fit). Cross-check
against what agents report: the median ``transfer_s`` of a stage-to-stage hop
(previous hop's send -> first chunk here) measured 1.6-3.3 ms on two emulated rpi4s,
against the 2.02 ms broker round plus uplink the model charges.

:class:`~planner.costtable.CostTable` precomputes all this per (cut, device) for
the partitioner's DPs; the functions here are the readable reference definitions
the table must agree with (the tests check both).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CHUNK_BYTES = 262144  # chunk size on the wire (DESIGN §4)


@dataclass(frozen=True)
class Segment:
    """An atomic piece of the model between two consecutive cut points (batch 1)."""

    flops: float  # forward FLOPs of the piece
    param_bytes: int  # parameter + buffer bytes it holds
    out_bytes: int  # bytes of the activation(s) crossing the cut after this piece
    act_bytes: int  # peak activation working memory while running it
    batch_gain: float = 1.0  # measured B·t(1)/t(B) at ModelCost.batch_size (planner/timing.py)


@dataclass(frozen=True)
class ModelCost:
    """What the planner knows of a model: its input size and its segments in order."""

    name: str
    input_bytes: int
    segments: tuple[Segment, ...]
    batch_size: int = 1  # the batch B each segment's batch_gain was measured at (1: none)

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
    batch_speedup: float = 1.0  # compute throughput gain when it batches (info, at max batch)
    max_batch: int = 1  # the most requests it runs at once (info.max_batch; 1: no batching)


@dataclass(frozen=True)
class CostParams:
    """Knobs of the cost model; ``correction`` maps agent_id -> fitted compute multiplier.

    Hop constants (see :func:`hop_constants` for the fit to ``transport.json``):
    ``broker_round_s`` is the raw paho transfers' fixed part (2.02 ms),
    ``per_message_s`` the chunked transfers' cost per 256 KiB chunk (1.12 ms, on
    localhost including the broker's copy of the bytes), ``hop_cpu_s`` half the
    fixed cost the chunked path adds to the raw one (2 x 1.11 ms: pack + unpack,
    envelope, reassembly, queue hand-off), ``codec_s_per_byte`` what it adds per
    byte (none measurable: ``pack_tensors`` is zero-copy). ``reference_gflops`` is
    ``host_core_gflops`` of the host that ran the benchmark (101.8 and 102.1 in
    ``benchmarks/results``). The client link defaults are an ASSUMPTION, not a
    measurement: a client beside the broker (localhost/LAN; the chunked transport
    moved 120-220 MB/s here), at the reference speed.
    """

    per_message_s: float = 0.00112  # link occupancy per chunk, half on each side's link
    broker_round_s: float = 0.00202  # publish -> broker -> delivery, once per hop (latency)
    hop_cpu_s: float = 0.00111  # CPU per hop per side at reference_gflops
    codec_s_per_byte: float = 0.0  # serialisation CPU per byte per side at reference_gflops
    reference_gflops: float = 100.0  # host_core_gflops where the hop constants were measured
    chunk_bytes: int = CHUNK_BYTES
    memory_factor: float = 1.5  # headroom over weights + peak activation
    min_compute_s: float = 0.0002  # fixed per-stage overhead (dispatch, tensor unpack)
    client_bandwidth_bps: float = 100e6  # the client's link to the broker (assumed, see above)
    client_rtt_s: float = 0.0005
    client_gflops: float = 100.0  # the client's CPU speed for its own pack/unpack (assumed)
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


def hop_flops(nbytes: int, params: CostParams = DEFAULT_PARAMS) -> float:
    """One side's CPU work for a hop of ``nbytes``, in calibration-equivalent FLOPs."""
    seconds = params.hop_cpu_s + params.codec_s_per_byte * nbytes
    return seconds * params.reference_gflops * 1e9


def hop_cpu_time_s(
    nbytes: int, device: Device | None, params: CostParams = DEFAULT_PARAMS
) -> float:
    """CPU seconds one side (sender or receiver) of a hop takes on ``device`` (client: None).

    The measured seconds scale by the device's speed relative to the reference host,
    so a board ten times slower than the host also packs ten times slower.
    """
    if device is None:
        return hop_flops(nbytes, params) / (params.client_gflops * 1e9)
    return hop_flops(nbytes, params) * seconds_per_flop(device, params)


def link_occupancy_s(
    nbytes: int, device: Device | None, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Time ``device``'s link is busy moving ``nbytes`` (its half of the per-chunk overhead).

    Round trips and the broker round are latency, not occupancy: while one request
    waits on them the link carries the next, so pipelined throughput only pays this.
    """
    bandwidth = params.client_bandwidth_bps if device is None else device.bandwidth_bps
    return nbytes / bandwidth + 0.5 * params.per_message_s * num_chunks(nbytes, params)


def transfer_s(
    nbytes: int, src: Device | None, dst: Device | None, params: CostParams = DEFAULT_PARAMS
) -> float:
    """One hop's latency: sender CPU + uplink + broker round + RTT halves + downlink + receiver CPU.

    A hand-off inside one agent costs nothing.
    """
    if src is not None and dst is not None and src.agent_id == dst.agent_id:
        return 0.0
    rtt_src = params.client_rtt_s if src is None else src.rtt_s
    rtt_dst = params.client_rtt_s if dst is None else dst.rtt_s
    return (
        hop_cpu_time_s(nbytes, src, params)
        + link_occupancy_s(nbytes, src, params)
        + params.broker_round_s
        + 0.5 * (rtt_src + rtt_dst)
        + link_occupancy_s(nbytes, dst, params)
        + hop_cpu_time_s(nbytes, dst, params)
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


def stage_cpu_s(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> float:
    """CPU time per request of a stage: receiving side of its hop + compute + sending side."""
    return (
        hop_cpu_time_s(stage_in_bytes(model, start), device, params)
        + compute_s(model, start, end, device, params)
        + hop_cpu_time_s(stage_out_bytes(model, end), device, params)
    )


def stage_period_s(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Time per request ``device`` needs in steady state: max(CPU, downlink, uplink)."""
    return max(
        stage_cpu_s(model, start, end, device, params),
        link_occupancy_s(stage_in_bytes(model, start), device, params),
        link_occupancy_s(stage_out_bytes(model, end), device, params),
    )


def speedup_at(points: Iterable[Sequence[float]], batch: int) -> float:
    """Speed-up at ``batch`` from measured ``(batch, speedup)`` points (``info.batch_speedup``):
    1 at batch 1, linear between points, the largest measured batch's beyond it."""
    curve = sorted((int(b), float(s)) for b, s in points if b >= 1 and s > 0)
    prev_b, prev_s = 1, 1.0
    for b, s in curve:
        if batch <= b:
            return prev_s + (s - prev_s) * (batch - prev_b) / (b - prev_b) if b > prev_b else s
        prev_b, prev_s = b, s
    return prev_s


def batched_period_s(
    model: ModelCost,
    start: int,
    end: int,
    device: Device,
    params: CostParams = DEFAULT_PARAMS,
    speedup: float | None = None,
) -> float:
    """A stage's period at saturation when its agent batches requests (agent/batching.py).

    With the queue full, the agent runs ``max_batch`` requests at once, so compute per
    request is :func:`compute_s` over the batch speed-up (``device.batch_speedup`` unless
    ``speedup`` is given, floored at 0.1); each request's hop CPU and link occupancy are
    unchanged (requests arrive and leave one by one). Latency is not improved by this:
    :func:`stage_period_s` stays the batch-1 reference the correction is fitted against.
    """
    gain = max(0.1, device.batch_speedup if speedup is None else speedup)
    cpu = (
        hop_cpu_time_s(stage_in_bytes(model, start), device, params)
        + compute_s(model, start, end, device, params) / gain
        + hop_cpu_time_s(stage_out_bytes(model, end), device, params)
    )
    return max(
        cpu,
        link_occupancy_s(stage_in_bytes(model, start), device, params),
        link_occupancy_s(stage_out_bytes(model, end), device, params),
    )


def client_period_s(model: ModelCost, params: CostParams = DEFAULT_PARAMS) -> float:
    """The client's own time per request: max(its CPU, its uplink, its downlink).

    One client sends every input and receives every output, so no plan runs faster
    than one request per this, however many replicas serve the first stage.
    """
    cpu = hop_cpu_time_s(model.input_bytes, None, params)
    cpu += hop_cpu_time_s(model.output_bytes, None, params)
    return max(
        cpu,
        link_occupancy_s(model.input_bytes, None, params),
        link_occupancy_s(model.output_bytes, None, params),
    )


def hop_constants(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-hop constants fitted to the transport benchmark's rows (``transport.json``).

    Each row times one tensor of ``size_mib`` through mosquitto as chunked transfers
    (``pack_tensors`` -> 256 KiB chunks -> reassembly -> ``unpack_tensors``,
    ``chunked_s``) and as raw paho publishes of the same chunks (``raw_s``). A
    straight line through the two smallest sizes (larger ones are dominated by the
    host's memory traffic; activations here are at most a few MB) gives, per path,
    a fixed part and a part per chunk. The raw fixed part is the broker round; the
    chunked per-chunk part the per-message price; the fixed part the chunked path
    adds, split over its two sides, the hop CPU; what it adds per byte the codec.
    """
    small = sorted(rows, key=lambda r: float(r["size_mib"]))[:2]
    if len(small) < 2 or small[0]["size_mib"] == small[1]["size_mib"]:
        raise ValueError("hop_constants needs transport rows of two different sizes")
    size = [float(r["size_mib"]) * 2**20 for r in small]

    def line(key: str) -> tuple[float, float]:
        slope = (float(small[1][key]) - float(small[0][key])) / (size[1] - size[0])
        return float(small[0][key]) - slope * size[0], slope

    fixed_chunked, per_byte_chunked = line("chunked_s")
    fixed_raw, per_byte_raw = line("raw_s")
    chunk = float(small[0].get("chunk_bytes", CHUNK_BYTES))
    return {
        "broker_round_s": fixed_raw,
        "per_message_s": per_byte_chunked * chunk,
        "hop_cpu_s": max(0.0, fixed_chunked - fixed_raw) / 2,
        "codec_s_per_byte": max(0.0, per_byte_chunked - per_byte_raw) / 2,
    }


Sample = tuple[str, float, float] | tuple[str, float, float, int]


def _weighted_median(values: Sequence[tuple[float, float]]) -> float:
    """Median of ``(value, weight)`` pairs (the lower one when the halves balance)."""
    ordered = sorted(values)
    half, seen = 0.5 * sum(w for _, w in ordered), 0.0
    for value, weight in ordered:
        seen += weight
        if seen >= half:
            return value
    return ordered[-1][0]


def correction_samples(samples: Iterable[Sample]) -> dict[str, list[tuple[float, float]]]:
    """Valid ``measured / predicted`` ratios per agent, with their weights (request counts).

    A sample is ``(agent_id, predicted_s, measured_s[, count])``; ``count`` is how
    many requests an agent's reported mean covers (1 when absent). Samples with a
    non-positive or non-finite time or count are dropped.
    """
    ratios: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for agent_id, predicted, measured, *rest in samples:
        count = float(rest[0]) if rest else 1.0
        ok = math.isfinite(predicted) and math.isfinite(measured) and math.isfinite(count)
        if ok and predicted > 0 and measured > 0 and count > 0:
            ratios[agent_id].append((measured / predicted, count))
    return ratios


def fit_correction(samples: Iterable[Sample], prior_samples: float = 3.0) -> dict[str, float]:
    """Per-agent compute multipliers from ``(agent_id, predicted_s, measured_s[, count])``.

    The estimate is the count-weighted median of measured/predicted over an agent's
    stages (robust to one stray stage), shrunk toward 1 in log space with weight
    ``N / (N + prior_samples)``, ``N`` the requests behind it, so one request cannot
    swing a plan but a stage's mean over a few dozen requests is trusted (24 requests:
    89 % of the way); the result is clamped to [0.1, 10].
    """
    result: dict[str, float] = {}
    for agent_id, values in sorted(correction_samples(samples).items()):
        total = sum(w for _, w in values)
        weight = total / (total + prior_samples)
        factor = math.exp(weight * math.log(_weighted_median(values)))
        result[agent_id] = min(10.0, max(0.1, factor))
    return result
