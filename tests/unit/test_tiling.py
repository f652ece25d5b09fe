"""Tiled blocks: every tile's program gives the whole model's values on its output box."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import Tensor, nn

from edgeslice.broker.protocol.boxes import (
    Box,
    assemble,
    crop,
    full_box,
    intersect,
    volume,
)
from edgeslice.broker.protocol.errors import PlanningError
from edgeslice.planner.models.mobilenetv2 import build_mobilenetv2
from edgeslice.planner.models.resnet import build_resnet18
from edgeslice.planner.models.vgg import build_vgg
from edgeslice.planner.profile import ModelProfile, count_flops, profile_model
from edgeslice.planner.tiling import (
    STRATEGIES,
    block,
    boundary_nodes,
    grid_shape,
    input_box,
    tile_boxes,
    tile_flops,
    tile_module,
    tile_param_bytes,
    tileable,
)
from edgeslice.planner.tracing import reference_run

SHARES = {"outc": [1.0, 2.5, 1.5], "inh": [1.0, 2.5, 1.5], "inw": [2.0, 1.0, 1.0]}
SHARES["grid"] = [1.0, 2.0, 3.0, 1.5]  # 2 x 2, rows of unequal weight

# odd input sizes on purpose: stride-2 layers and pools then leave ragged borders
MODELS = {
    "mobilenetv2": lambda: build_mobilenetv2(99),
    "resnet18": lambda: build_resnet18(75),
    "vgg": lambda: build_vgg(99),
}
# (start, end) segment ranges, what each must contain, and which strategies it allows
BLOCKS = {
    "mobilenetv2": [
        ((0, 6), {"conv", "bn", "unary"}, set(STRATEGIES)),  # stride-2 stem + depthwise, fused
        ((8, 17), {"conv", "binary"}, set(STRATEGIES)),  # stride-2 depthwise, then a residual
        ((69, 73), {"adapool", "flatten", "linear"}, {"outc"}),
    ],
    "resnet18": [
        ((0, 4), {"conv", "bn", "unary", "maxpool"}, set(STRATEGIES)),
        ((8, 10), {"conv", "binary"}, set(STRATEGIES)),  # downsampling residual block
        ((20, 23), {"adapool", "flatten", "linear"}, {"outc"}),
    ],
    "vgg": [
        ((0, 8), {"conv", "maxpool"}, set(STRATEGIES)),  # two conv stages fused
        ((11, 15), {"conv", "maxpool"}, set(STRATEGIES)),
        ((29, 35), {"adapool", "linear", "unary"}, {"outc"}),  # two linears
    ],
}


def _whole(build) -> tuple[ModelProfile, dict]:
    """Profile plus the whole model's value of every tensor crossing a cut."""
    model, inputs = build()
    profile = profile_model(model, inputs, name="m")
    n = len(profile.segments)
    crossing = {node for b in range(n + 1) for node in boundary_nodes(profile, b)}
    values = reference_run(profile.graph, inputs, keep=crossing, count_flops=False).values
    values.update(zip(profile.graph.placeholders, inputs, strict=True))
    return profile, values


@pytest.fixture(scope="module")
def whole() -> dict:
    return {}


def _model(whole: dict, name: str) -> tuple[ModelProfile, dict]:
    if name not in whole:
        whole[name] = _whole(MODELS[name])
    return whole[name]


def _tiles(profile, values, start, end, strategy, shares) -> list[tuple[Box, Box, Tensor]]:
    """Run every tile of the block on the crop of the whole input; (out box, in box, out)."""
    x = values[boundary_nodes(profile, start)[0]]
    y = values[boundary_nodes(profile, end)[0]]
    out = []
    for box in tile_boxes(y.shape, strategy, shares):
        in_box = input_box(profile, start, end, box)
        with torch.no_grad():
            (got,) = tile_module(profile, start, end, box)(crop(x, full_box(x.shape), in_box))
        out.append((box, in_box, got))
    return out


def _check_tiles(profile, values, start, end, strategy, shares) -> None:
    y = values[boundary_nodes(profile, end)[0]]
    tiles = _tiles(profile, values, start, end, strategy, shares)
    assert len(tiles) == len(shares)
    for box, _, got in tiles:
        want = crop(y, full_box(y.shape), box)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{strategy} {box}")
    torch.testing.assert_close(assemble([(b, t) for b, _, t in tiles], full_box(y.shape)), y)


@pytest.mark.parametrize(("name", "which"), [(m, i) for m in MODELS for i in range(len(BLOCKS[m]))])
def test_tiles_equal_the_whole_model(whole, name: str, which: int) -> None:
    profile, values = _model(whole, name)
    (start, end), kinds, strategies = BLOCKS[name][which]
    assert kinds <= {op.kind for op in block(profile, start, end).ops}
    assert tileable(profile, start, end) == strategies
    for strategy in sorted(strategies):
        _check_tiles(profile, values, start, end, strategy, SHARES[strategy])


def test_fused_block_recomputes_its_halo(whole) -> None:
    profile, values = _model(whole, "vgg")
    start, end = 8, 14  # two 3x3 conv + BN + ReLU, 24 x 24
    whole_flops = sum(s.flops for s in profile.segments[start:end])
    tiles = _tiles(profile, values, start, end, "inh", [1.0, 1.0])
    (top, top_in, _), (bottom, bottom_in, _) = tiles
    assert top[1] == (0, 12) and bottom[1] == (12, 24)  # the outputs meet...
    assert top_in[1] == (0, 14) and bottom_in[1] == (10, 24)  # ...the inputs overlap by 2 + 2
    flops = [tile_flops(profile, start, end, box) for box, _, _ in tiles]
    assert sum(flops) > whole_flops
    assert tile_flops(profile, start, end, full_box((1, 128, 24, 24))) == whole_flops


def test_one_segment_blocks_of_every_model(whole) -> None:
    """Exchange after every layer: a few single segments of each model, uneven shares."""
    for name, picks in [("mobilenetv2", [11, 25]), ("resnet18", [3, 12]), ("vgg", [3, 31])]:
        profile, values = _model(whole, name)
        for seg in picks:
            for strategy in sorted(tileable(profile, seg, seg + 1)):
                _check_tiles(profile, values, seg, seg + 1, strategy, SHARES[strategy])


def test_whole_block_param_bytes_and_flops_match_the_profile(whole) -> None:
    for name in MODELS:
        profile, _ = _model(whole, name)
        for (start, end), _, _ in BLOCKS[name]:
            box = full_box(block(profile, start, end).out_shape)
            segs = profile.segments[start:end]
            assert tile_param_bytes(profile, start, end, box) == sum(s.param_bytes for s in segs)
            flops = tile_flops(profile, start, end, box)
            if (name, start) == ("vgg", 0):  # 99 -> 49 -> 24: rows the 2x2 pools never read
                assert flops < sum(s.flops for s in segs)  # are not computed by the tiles
            else:
                assert flops == pytest.approx(sum(s.flops for s in segs))


def test_outc_tiles_hold_a_slice_of_the_weights(whole) -> None:
    profile, _ = _model(whole, "vgg")
    shape = block(profile, 29, 35).out_shape
    parts = [tile_param_bytes(profile, 29, 35, b) for b in tile_boxes(shape, "outc", [1, 3])]
    full = tile_param_bytes(profile, 29, 35, full_box(shape))
    first = profile.segments[31].param_bytes  # the first linear: every tile needs it whole
    assert parts[0] < parts[1] < full
    assert sum(parts) == full + first


class OddNet(nn.Module):
    """Odd sizes, strides, dilation, ceil-mode pool, grouped convs, a residual, and a
    strided 1×1 conv with padding 3, whose border outputs read only padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=3, dilation=2)
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.far = nn.Conv2d(12, 6, 1, stride=2, padding=3)
        self.tall = nn.Conv2d(6, 5, (5, 3), stride=(3, 1), padding=(2, 0))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        x = self.pool(x)
        x = x + torch.nn.functional.relu6(self.dw(x))
        return self.tall(self.far(self.grouped(x)))


def _odd() -> tuple[nn.Module, tuple[Tensor, ...]]:
    gen = torch.Generator().manual_seed(3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = OddNet()
    model.bn.running_mean.copy_(torch.randn(8, generator=gen))
    model.bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    return model.eval(), (torch.randn(1, 3, 65, 71, generator=gen),)


@pytest.fixture(scope="module")
def odd() -> tuple[ModelProfile, dict]:
    return _whole(_odd)


def test_odd_net_every_block_every_strategy(odd) -> None:
    profile, values = odd
    n = len(profile.segments)
    assert block(profile, 0, n).out_shape == (1, 5, 4, 11)
    blocks = [(a, b) for a in range(n) for b in range(a + 1, min(n, a + 3) + 1)] + [(0, n)]
    for start, end in blocks:
        assert tileable(profile, start, end) == set(STRATEGIES), (start, end)
        for strategy in STRATEGIES:
            _check_tiles(profile, values, start, end, strategy, SHARES[strategy])


def test_odd_net_five_tiles_and_the_padding_only_border(odd) -> None:
    profile, values = odd
    n = len(profile.segments)
    for strategy in ("inw", "grid"):  # 5 tiles: grid is 1 x 5, one row per device
        _check_tiles(profile, values, 0, n, strategy, [1.0, 0.5, 2.0, 1.0, 3.0])
    far = next(i for i, s in enumerate(profile.segments) if s.outputs[0].shape == (1, 6, 12, 13))
    top = ((0, 6), (0, 1), (0, 13))  # row 0 of `far` reads input row -3: all zero padding
    assert input_box(profile, far, far + 1, top)[1] == (0, 1)  # one row kept to crop from
    _check_tiles(profile, values, far, far + 1, "inh", [1.0, 10.0])


def test_tile_flops_are_what_the_tile_program_runs(odd) -> None:
    profile, values = odd
    n = len(profile.segments)
    x = values[profile.graph.placeholders[0]]
    for strategy in STRATEGIES:  # outc cuts the grouped conv inside its groups of 3
        for box in tile_boxes((1, 5, 4, 11), strategy, SHARES[strategy]):
            tile_in = crop(x, full_box(x.shape), input_box(profile, 0, n, box))
            counted = count_flops(tile_module(profile, 0, n, box), (tile_in,))
            assert tile_flops(profile, 0, n, box) == counted


def test_max_pool_pads_with_minus_infinity() -> None:
    model = nn.Sequential(nn.MaxPool2d(3, 2, padding=1)).eval()
    x = -torch.rand(1, 3, 9, 10) - 1.0  # all negative: zero padding would show at borders
    profile, values = _whole(lambda: (model, (x,)))
    for strategy in STRATEGIES:
        _check_tiles(profile, values, 0, 1, strategy, SHARES[strategy])
    corner = ((0, 3), (0, 1), (0, 1))
    assert input_box(profile, 0, 1, corner) == ((0, 3), (0, 2), (0, 2))


def test_tile_module_round_trips_through_torch_export(whole) -> None:
    profile, values = _model(whole, "mobilenetv2")
    x = values[boundary_nodes(profile, 8)[0]]
    shape = block(profile, 8, 17).out_shape
    box = tile_boxes(shape, "grid", [1.0, 2.0, 1.0, 1.0])[1]
    tile_in = crop(x, full_box(x.shape), input_box(profile, 8, 17, box))
    module = tile_module(profile, 8, 17, box)
    with torch.no_grad():  # no batch size is baked into the program
        (pair,) = module(torch.cat([tile_in, 2 * tile_in]))
        (one,) = module(2 * tile_in)
    torch.testing.assert_close(pair[1:], one)
    exported = torch.export.export(module, (tile_in,))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    loaded = torch.export.load(io.BytesIO(buffer.getvalue())).module()
    with torch.no_grad():
        (got,) = loaded(tile_in)
    want = values[boundary_nodes(profile, 17)[0]]
    torch.testing.assert_close(got, crop(want, full_box(want.shape), box), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shares", [[1.0], [1.0, 1.0], [3.0, 1.0, 2.0], [1, 2, 3, 4, 5, 6]])
def test_tile_boxes_partition_the_output(strategy: str, shares: list[float]) -> None:
    shape = (2, 7, 9, 13)
    boxes = tile_boxes(shape, strategy, shares)
    assert len(boxes) == len(shares)
    assert sum(volume(b) for b in boxes) == volume(full_box(shape))
    assert all(intersect(a, b) is None for a, b in itertools.combinations(boxes, 2))
    biggest = volume(boxes[shares.index(max(shares))])  # the biggest share: a biggest box
    assert all(volume(b) <= biggest for b in boxes)


def test_grid_is_near_square_and_follows_the_longer_side() -> None:
    assert grid_shape(4, 10, 10) == (2, 2)
    assert grid_shape(6, 10, 30) == (2, 3)
    assert grid_shape(6, 30, 10) == (3, 2)
    assert grid_shape(5, 10, 10) == (1, 5)
    with pytest.raises(ValueError, match="non-empty"):
        tile_boxes((1, 4, 2, 2), "inh", [1, 1, 1])
    with pytest.raises(ValueError, match="4-D"):
        tile_boxes((1, 10), "inw", [1, 1])


class TwoInputs(nn.Module):
    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(torch.relu(x) + y, dim=1)


def test_blocks_that_cannot_be_tiled() -> None:
    inputs = (torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))
    profile = profile_model(TwoInputs(), inputs)
    n = len(profile.segments)
    assert tileable(profile, 0, n) == frozenset()  # two inputs
    assert tileable(profile, n - 1, n) == frozenset()  # softmax is not supported
    with pytest.raises(PlanningError, match="softmax"):
        input_box(profile, n - 1, n, ((0, 4), (0, 3), (0, 6)))
    with pytest.raises(PlanningError, match="run of the"):
        block(profile, 0, n + 1)


def test_linear_outc_tiles_need_the_whole_input(whole) -> None:
    profile, _ = _model(whole, "resnet18")
    for box in tile_boxes((1, 1000), "outc", [1.0, 2.0]):
        assert input_box(profile, 22, 23, box) == ((0, 512),)
        assert input_box(profile, 20, 23, box) == ((0, 512), (0, 3), (0, 3))
    with pytest.raises(PlanningError, match="not a non-empty part"):
        input_box(profile, 22, 23, ((0, 1001),))
