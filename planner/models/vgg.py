"""A VGG-style plain CNN (Simonyan & Zisserman, 2015): the built-in model without shortcuts.

VGG-11's layout (conv 3×3 + BatchNorm + ReLU stacks, five 2×2 max-pools) with every
width halved, then a global average pool and a two-layer classifier instead of VGG's
7×7×512→4096 head, so it profiles as quickly as ResNet-18 (~1.9 GFLOP multiply-adds at
224×224, 3.0 M parameters). A plain chain of wide convolutions is the case intra-layer
(tiled) execution is made for, next to MobileNetV2's depthwise and ResNet-18's residual
blocks. Random weights from a fixed seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SEED = 0

# output channels of each 3×3 conv; "M" is a 2×2 max-pool (VGG-11 "A" at half width)
LAYOUT: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")


class VGG(nn.Module):
    """Conv/BN/ReLU stacks with max-pools, global average pool, two linear layers."""

    def __init__(self, layout: tuple[int | str, ...] = LAYOUT, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = int(item)
            layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(cin, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_vgg(image_size: int = 224) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """Seeded VGG-style CNN in eval mode and a deterministic ``1×3×S×S`` example input."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = VGG().eval()
    example = torch.randn(1, 3, image_size, image_size, generator=gen)
    return model, (example,)
