"""RegNetX (Radosavovic et al. 2020) in torchvision's layout: residual bottlenecks with grouped 3x3 convs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, ConvBNAct, make_normalize


class ResBottleneckBlock(nn.Module):
    """``f`` = a (1x1) -> b (grouped 3x3, stride) -> c (1x1, no act); ``proj`` (1x1 + BN) if shape changes.

    Output ``relu(proj(x) + f(x))``. Bottleneck width ``w_b = w_out * bottleneck_ratio``
    is rounded to a multiple of the group width.
    """

    def __init__(
        self, w_in: int, w_out: int, stride: int, group_width: int, bottleneck_ratio: float = 1.0
    ) -> None:
        super().__init__()
        w_b = int(round(w_out * bottleneck_ratio))
        g = min(group_width, w_b)
        w_b = int(round(w_b / g) * g)
        self.proj: nn.Module | None = None
        if w_in != w_out or stride != 1:
            self.proj = ConvBNAct(w_in, w_out, 1, stride=stride, activation=None)
        self.f = nn.Sequential(
            OrderedDict(
                a=ConvBNAct(w_in, w_b, 1),
                b=ConvBNAct(w_b, w_b, 3, stride=stride, groups=w_b // g),
                c=ConvBNAct(w_b, w_out, 1, activation=None),
            )
        )
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    """``stem`` (3x3/2 conv-BN-ReLU), ``trunk_output`` (stages ``block1..``, stride 2 each), GAP, ``fc``."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        group_width: int,
        bottleneck_ratio: float = 1.0,
        stem_width: int = 32,
        num_classes: int = 1000,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"{len(widths)} widths but {len(depths)} depths")
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        self.stem = ConvBNAct(3, stem_width, 3, stride=2)
        stages: list[tuple[str, nn.Module]] = []
        w_in = stem_width
        for i, (w_out, depth) in enumerate(zip(widths, depths), start=1):
            stage = nn.Sequential()
            for j in range(depth):
                block = ResBottleneckBlock(w_in, w_out, 2 if j == 0 else 1, group_width, bottleneck_ratio)
                stage.add_module(f"block{i}-{j}", block)
                w_in = w_out
            stages.append((f"block{i}", stage))
        self.trunk_output = nn.Sequential(OrderedDict(stages))
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(self.normalize(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def regnet_x_400mf(num_classes: int = 1000, normalize: bool = True) -> RegNet:
    """RegNetX-400MF: stem 32, widths 32/64/160/400, depths 1/2/7/12, group width 16 (5.50 M params)."""
    return RegNet(
        widths=(32, 64, 160, 400),
        depths=(1, 2, 7, 12),
        group_width=16,
        bottleneck_ratio=1.0,
        stem_width=32,
        num_classes=num_classes,
        normalize=normalize,
    )
