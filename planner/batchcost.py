"""Owns the batched (saturated) cost of a stage, from the batch gains measured per segment.

An agent that batches (agent/batching.py) runs up to ``max_batch`` queued requests of a
stage at once. What that buys depends on the model, not on the device's calibration
kernel (``info.batch_speedup``): measured on the development host, batching made
MobileNetV2 and ResNet-18 *slower* (x0.7, x0.8 throughput) and a small transformer
faster (x1.66), while the kernel gained on every host. So planner/timing.py times each
segment of a batchable model at batch 1 and at batch ``B`` (``ModelCost.batch_size``)
and records ``gain_k = B * t1_k / tB_k`` (``Segment.batch_gain``, 1 when not measured).

For a stage ``[i, j)`` on a device whose agent batches (``Device.max_batch > 1``):

* its measured gain at ``B`` is ``G = sum(t_k) / sum(t_k / gain_k)`` (:func:`stage_gain`);
  when ``G < BATCH_HURTS`` the plan tells the stage's agents not to batch it
  (:func:`stage_max_batch` -> 1, ``PlanStage.max_batch``), so it runs at batch 1;
* otherwise its compute per request at saturation is ``sum(t_k / g_k)``, ``g_k`` the
  segment's gain at the device's batch ``min(max_batch, B)``, linear between 1 at batch
  1 and the measured gain at ``B`` (the one point measured), and scaled to the device
  like batch-1 compute (the same seconds per calibration-equivalent FLOP): no device
  measures the model, so the host's ratio is the best measured figure there is.

:func:`saturated_period_s` is that reference. The plan search
(:class:`~planner.costtable.CostTable`) prices a stage's compute on a batching device as
``min(sum(t_k), sum(t_k / g_k))``, two prefix sums: the same, except for a stage whose
gain is between 0.95 and 1, which batches (and is up to 5 % slower than priced).
Hop costs and latency stay at batch 1 either way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgeslice.planner.costmodel import (
    DEFAULT_PARAMS,
    CostParams,
    Device,
    ModelCost,
    Segment,
    hop_cpu_time_s,
    link_occupancy_s,
    seconds_per_flop,
    stage_in_bytes,
    stage_out_bytes,
    stage_period_s,
)

BATCH_HURTS = 0.95  # a stage whose measured gain is below this is not batched
MIN_GAIN = 0.1  # floor of a measured gain (a noisy tiny segment must not explode a sum)


def batches(model: ModelCost, device: Device) -> bool:
    """Whether ``device``'s agent batches requests of ``model`` (both sides said so)."""
    return model.batch_size > 1 and device.max_batch > 1


def gain_at(segment: Segment, measured_at: int, batch: int) -> float:
    """``segment``'s gain at ``batch``: 1 at batch 1, linear up to its gain at
    ``measured_at``, that gain beyond (never extrapolated); floored at :data:`MIN_GAIN`."""
    if measured_at <= 1 or batch <= 1:
        return 1.0
    b = min(batch, measured_at)
    gain = 1.0 + (segment.batch_gain - 1.0) * (b - 1) / (measured_at - 1)
    return max(MIN_GAIN, gain)


def device_gains(model: ModelCost, device: Device) -> list[float]:
    """Per segment, its gain at ``device``'s batch (:func:`gain_at`); all 1 when the device
    does not batch or nothing was measured."""
    if not batches(model, device):
        return [1.0] * len(model.segments)
    return [gain_at(s, model.batch_size, device.max_batch) for s in model.segments]


def stage_gain(model: ModelCost, start: int, end: int) -> float:
    """The measured throughput gain of stage ``[start, end)`` at ``model.batch_size``."""
    segs = model.segments[start:end]
    one = math.fsum(s.flops for s in segs)
    batched = math.fsum(s.flops / max(MIN_GAIN, s.batch_gain) for s in segs)
    return one / batched if batched > 0 else 1.0


def stage_max_batch(model: ModelCost, start: int, end: int) -> int | None:
    """What the plan tells a stage's agents: 1 (do not batch) when its measured gain is
    below :data:`BATCH_HURTS`, else None (each agent's own ``--max-batch``)."""
    if model.batch_size <= 1:
        return None
    return 1 if stage_gain(model, start, end) < BATCH_HURTS else None


def batched_compute_s(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Compute per request of stage ``[start, end)`` on ``device`` with its queue full."""
    batched = batches(model, device) and stage_max_batch(model, start, end) is None
    b = device.max_batch if batched else 1
    flops = math.fsum(s.flops / gain_at(s, model.batch_size, b) for s in model.segments[start:end])
    return flops * seconds_per_flop(device, params) + params.min_compute_s


def saturated_period_s(
    model: ModelCost, start: int, end: int, device: Device, params: CostParams = DEFAULT_PARAMS
) -> float:
    """Time per request of the stage on ``device`` when its agent's queue stays full:
    :func:`~planner.costmodel.stage_period_s` with :func:`batched_compute_s`."""
    if not batches(model, device):
        return stage_period_s(model, start, end, device, params)
    in_bytes, out_bytes = stage_in_bytes(model, start), stage_out_bytes(model, end)
    cpu = (
        hop_cpu_time_s(in_bytes, device, params)
        + batched_compute_s(model, start, end, device, params)
        + hop_cpu_time_s(out_bytes, device, params)
    )
    return max(
        cpu, link_occupancy_s(in_bytes, device, params), link_occupancy_s(out_bytes, device, params)
    )


def gains_from_times(one_s: Sequence[float], batch_s: Sequence[float], batch: int) -> list[float]:
    """``batch * t1 / tB`` per segment, clamped to [MIN_GAIN, batch]; 1 where either time
    is not positive (nothing measured)."""
    return [
        min(float(batch), max(MIN_GAIN, batch * t1 / tb)) if t1 > 0 and tb > 0 else 1.0
        for t1, tb in zip(one_s, batch_s, strict=True)
    ]
