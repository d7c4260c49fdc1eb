"""Small ResNeXt for CIFAR (Xie et al. 2017): bottlenecks with a grouped (not depthwise) 3x3 conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ThreeStageCifarNet


class ResNeXtBlock(nn.Module):
    """1x1 (in->D)-BN-ReLU, grouped 3x3 (D->D, ``cardinality`` groups)-BN-ReLU, 1x1 (D->out)-BN.

    ``D = cardinality * group_width``. The shortcut is a 1x1 conv + BN when the
    shape changes (stride or width), else identity. ReLU after the add.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, cardinality: int, group_width: int) -> None:
        super().__init__()
        inner = cardinality * group_width
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXtCifar(ThreeStageCifarNet):
    """3x3 stem (32), three stages (out 64/128/256, group width doubling), GAP, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        blocks_per_stage: int = 1,
        cardinality: int = 4,
        group_width: int = 8,
        normalize: bool = True,
    ) -> None:
        if group_width < 2:
            raise ValueError("group_width must be >= 2 (group_width 1 would be a depthwise conv)")

        def block(stage: int, in_ch: int, out_ch: int, stride: int) -> nn.Module:
            return ResNeXtBlock(in_ch, out_ch, stride, cardinality, group_width * 2**stage)

        super().__init__(32, (64, 128, 256), blocks_per_stage, block, num_classes, normalize)


def resnext_cifar(
    num_classes: int = 10,
    blocks_per_stage: int = 1,
    cardinality: int = 4,
    group_width: int = 8,
    normalize: bool = True,
) -> ResNeXtCifar:
    """ResNeXt with 3 stages of ``blocks_per_stage`` bottlenecks, cardinality 4 (group width 8/16/32)."""
    return ResNeXtCifar(
        num_classes=num_classes,
        blocks_per_stage=blocks_per_stage,
        cardinality=cardinality,
        group_width=group_width,
        normalize=normalize,
    )
