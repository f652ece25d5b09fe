"""Owns the layer configurations a calibration sweep times: what one layer is, on the wire.

The learned cost estimator (planner/learned.py) predicts a layer's time on a device from
the layer's shape, trained on layers the agents timed on their own (paced) execution path
(agent/sweep.py). The planner sends the configurations in the ``sweep`` command, the agent
builds and times them (broker/layerrun.py), the planner turns the same configurations into
features. So the configuration is shared by both sides and lives here, pure: no torch.

A :class:`LayerSpec` is one layer at batch 1: a 2-D convolution (``groups`` = channels is
depthwise, ``k`` = 1 pointwise), a linear layer over ``h`` rows, a pooling, a norm, or an
elementwise op, on an ``cin x h x w`` input. Its FLOPs are counted the way the planner's
profile counts them (``FlopCounterMode``: convolutions and matrix products only), because
those are the FLOPs the analytic cost model prices; what the other ops cost is exactly
what the learned model is for.

:func:`sweep_set` is the default sweep: a fixed, seeded draw over op kinds, channel counts
and spatial sizes, including small tile-sized inputs (a tile of an intra-layer split plus
its halo), with each layer's work bounded so the sweep stays short on a slow board.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

FLOAT_BYTES = 4

# op -> kind of layer; the kinds are what holdout groups and the planner's choice use
OPS: dict[str, str] = {
    "conv2d": "conv",  # split into conv / pointwise / depthwise by :func:`kind`
    "linear": "linear",
    "maxpool2d": "pool",
    "avgpool2d": "pool",
    "gavgpool": "pool",  # global average pool (adaptive_avg_pool2d to 1x1)
    "batchnorm": "norm",
    "layernorm": "norm",
    "relu": "eltwise",
    "hardtanh": "eltwise",
    "gelu": "eltwise",
    "add": "eltwise",
}
KINDS = ("conv", "pointwise", "depthwise", "linear", "pool", "norm", "eltwise")


@dataclass(frozen=True)
class LayerSpec:
    """One layer at batch 1 on a ``cin x h x w`` input (linear: ``h`` rows of ``cin``)."""

    op: str
    cin: int
    h: int
    w: int = 1
    cout: int = 0  # conv/linear output channels (others: = cin)
    k: int = 1  # kernel (conv, pool)
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown layer op {self.op!r}; one of {sorted(OPS)}")
        dims = (self.cin, self.h, self.w, self.k, self.stride, self.groups)
        if min(dims) < 1 or self.padding < 0 or self.cout < 0:
            raise ValueError(f"layer {self} has a non-positive size")
        if self.op == "conv2d" and (self.cin % self.groups or self.cout % self.groups):
            raise ValueError(f"layer {self}: channels must divide by groups")
        if self.out_hw[0] < 1 or self.out_hw[1] < 1:
            raise ValueError(f"layer {self}: kernel larger than its padded input")

    @property
    def channels_out(self) -> int:
        return self.cout if self.op in ("conv2d", "linear") else self.cin

    @property
    def out_hw(self) -> tuple[int, int]:
        if self.op == "gavgpool":
            return 1, 1
        if self.op in ("conv2d", "maxpool2d", "avgpool2d"):
            k, s, p = self.k, self.stride, self.padding
            return (self.h + 2 * p - k) // s + 1, (self.w + 2 * p - k) // s + 1
        return self.h, self.w

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> LayerSpec:
        """A spec from its msgpack map; ``ValueError`` for anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a layer spec is a map, not {type(data).__name__}")
        names = set(cls.__dataclass_fields__)
        try:
            fields = {k: v for k, v in data.items() if k in names}
            ints = {k: int(v) for k, v in fields.items() if k != "op"}
            if any(not isinstance(v, int | float) for k, v in fields.items() if k != "op"):
                raise TypeError("sizes must be numbers")
            return cls(op=str(data["op"]), **ints)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed layer spec {dict(data)!r}: {exc}") from exc


def kind(spec: LayerSpec) -> str:
    """The layer's kind: conv (k > 1, dense), pointwise (1x1), depthwise, linear, pool, ..."""
    if spec.op == "conv2d":
        if spec.groups > 1 and spec.groups == spec.cin:
            return "depthwise"
        return "pointwise" if spec.k == 1 else "conv"
    return OPS[spec.op]


def in_elements(spec: LayerSpec) -> int:
    return spec.cin * spec.h * spec.w


def out_elements(spec: LayerSpec) -> int:
    oh, ow = spec.out_hw
    return spec.channels_out * oh * ow


def param_count(spec: LayerSpec) -> int:
    """Weights + biases + buffers the layer reads."""
    if spec.op == "conv2d":
        return spec.cout * (spec.cin // spec.groups) * spec.k * spec.k + spec.cout
    if spec.op == "linear":
        return spec.cin * spec.cout + spec.cout
    if spec.op == "batchnorm":
        return 4 * spec.cin
    if spec.op == "layernorm":
        return 2 * spec.cin
    return 0


def counted_flops(spec: LayerSpec) -> float:
    """FLOPs as the planner's profile counts them (FlopCounterMode: conv and matmul only)."""
    if spec.op == "conv2d":
        return 2.0 * out_elements(spec) * (spec.cin // spec.groups) * spec.k * spec.k
    if spec.op == "linear":
        return 2.0 * spec.h * spec.w * spec.cin * spec.cout
    return 0.0


def work(spec: LayerSpec) -> float:
    """A rough operation count for every op (counted FLOPs, or elements touched)."""
    if spec.op in ("maxpool2d", "avgpool2d"):
        return float(out_elements(spec) * spec.k * spec.k)
    return max(counted_flops(spec), float(in_elements(spec) + out_elements(spec)))


def layer_bytes(spec: LayerSpec) -> tuple[int, int, int]:
    """(input, output, parameter) bytes in float32; ``add`` reads two inputs."""
    inputs = in_elements(spec) * (2 if spec.op == "add" else 1)
    return (inputs * FLOAT_BYTES, out_elements(spec) * FLOAT_BYTES, param_count(spec) * FLOAT_BYTES)


# -- the default sweep ---------------------------------------------------------------------
CHANNELS = (8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 576, 960)
SIZES = (4, 6, 7, 9, 10, 12, 14, 16, 18, 28, 30, 32, 56, 58, 112)  # incl. tile + halo sizes
ROWS = (1, 4, 16, 49, 64, 128, 196)
MAX_WORK = 120e6  # per layer: ~12 ms on a 10 GFLOP/s board, so repeats stay short


def _draw(rng: random.Random, op: str) -> LayerSpec:
    c = rng.choice(CHANNELS)
    s = rng.choice(SIZES)
    if op == "conv":
        k = rng.choice((3, 3, 5))
        return LayerSpec("conv2d", c, s, s, rng.choice(CHANNELS), k, rng.choice((1, 2)), k // 2)
    if op == "pointwise":
        return LayerSpec("conv2d", c, s, s, rng.choice(CHANNELS), 1)
    if op == "depthwise":
        k = rng.choice((3, 3, 5))
        return LayerSpec("conv2d", c, s, s, c, k, rng.choice((1, 2)), k // 2, c)
    if op == "linear":
        return LayerSpec(
            "linear",
            rng.choice((64, 128, 256, 512, 768, 1024, 1280)),
            rng.choice(ROWS),
            1,
            rng.choice((64, 128, 256, 512, 1000, 2048)),
        )
    if op in ("maxpool2d", "avgpool2d"):
        k = rng.choice((2, 3))
        return LayerSpec(op, c, max(s, k), max(s, k), 0, k, 2, 1 if k == 3 else 0)
    if op in ("layernorm", "gelu") and rng.random() < 0.5:  # transformer-shaped: rows x dim
        return LayerSpec(op, rng.choice((64, 128, 256, 512, 768)), rng.choice(ROWS))
    return LayerSpec(op, c, s, s)


# how many layers of each op the default sweep draws (weighted to where time goes)
MIX: dict[str, int] = {
    "conv": 80,
    "pointwise": 80,
    "depthwise": 72,
    "linear": 48,
    "maxpool2d": 16,
    "avgpool2d": 12,
    "gavgpool": 12,
    "batchnorm": 32,
    "layernorm": 20,
    "relu": 20,
    "hardtanh": 16,
    "gelu": 16,
    "add": 24,
}


def sweep_set(seed: int = 0, scale: float = 1.0, max_work: float = MAX_WORK) -> list[LayerSpec]:
    """The default sweep: ``scale`` x :data:`MIX` distinct layers, seeded, each under
    ``max_work`` operations (a draw over the limit is redrawn), in a shuffled order (so
    a sweep cut short by its time budget still covers every kind)."""
    rng = random.Random(seed)
    chosen: dict[LayerSpec, None] = {}
    for op, count in MIX.items():
        want, tries = max(1, round(count * scale)), 0
        have = 0
        while have < want and tries < 50 * want:
            tries += 1
            try:
                spec = _draw(rng, op)
            except ValueError:
                continue
            if work(spec) > max_work or spec in chosen:
                continue
            chosen[spec] = None
            have += 1
    specs = list(chosen)
    rng.shuffle(specs)
    return specs
