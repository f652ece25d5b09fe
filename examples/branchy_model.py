"""A small branchy model: the shapes a real user model has and a plain chain does not.

It has two model inputs (an image and a metadata vector), residual adds, a
``torch.cat`` of two branches, a block that takes two tensors, and Python
control flow on an input shape, which ``torch.fx.symbolic_trace`` cannot
trace (``torch.export`` specialises it away). Use it as::

    edgeslice profile --model examples/branchy_model.py:build

It doubles as a template for your own spec: a zero-argument callable that
returns ``(module, example_inputs)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class Residual(nn.Module):
    """conv-bn-relu-conv-bn plus the input: a cut inside it would have to carry two tensors."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class TwoBranch(nn.Module):
    """A 3×3 and a 1×1 branch over the same input, concatenated on channels."""

    def __init__(self, cin: int, cout_each: int) -> None:
        super().__init__()
        self.wide = nn.Conv2d(cin, cout_each, 3, padding=1)
        self.narrow = nn.Conv2d(cin, cout_each, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.relu(self.wide(x)), F.relu(self.narrow(x))], dim=1)


class Fuse(nn.Module):
    """A block with two tensor inputs: image features modulated by a metadata embedding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, side: Tensor) -> Tensor:
        scale = torch.sigmoid(side)[:, :, None, None]
        return F.relu(self.conv(x) * scale + x)


class BranchyNet(nn.Module):
    """image ``1×3×H×W`` + metadata ``1×8`` → logits ``1×10``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.res1 = Residual(16)
        self.branch = TwoBranch(16, 16)
        self.res2 = Residual(32)
        self.side_proj = nn.Linear(8, 32)
        self.fuse = Fuse(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, image: Tensor, meta: Tensor) -> Tensor:
        if image.shape[-1] > 96:  # shape-dependent control flow: symbolic_trace fails here
            image = F.avg_pool2d(image, 2)
        x = F.relu(self.stem(image))
        x = self.res1(x)
        x = self.branch(x)
        x = self.res2(x)
        side = self.side_proj(meta)
        x = self.fuse(x, side)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(image_size: int = 64) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Seeded model in eval mode plus deterministic example inputs (image, metadata)."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BranchyNet().eval()
    image = torch.randn(1, 3, image_size, image_size, generator=gen)
    meta = torch.randn(1, 8, generator=gen)
    return model, (image, meta)
