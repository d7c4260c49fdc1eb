"""Small DenseNet-BC for CIFAR (Huang et al. 2017): bottleneck dense layers and compressing transitions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, make_normalize


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), output ``cat([x, new], 1)``."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int = 4) -> None:
        super().__init__()
        inter = bn_size * growth_rate
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(F.relu(self.bn1(x)))
        new = self.conv2(F.relu(self.bn2(new)))
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 then 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetCifar(nn.Module):
    """3x3 stem (2k channels), dense blocks separated by transitions, BN-ReLU, GAP, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        growth_rate: int = 12,
        block_layers: Sequence[int] = (4, 4, 4),
        compression: float = 0.5,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        ch = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, ch, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(block_layers):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(ch, growth_rate))
                ch += growth_rate
            stages.append(nn.Sequential(*layers))
            if i < len(block_layers) - 1:
                out = int(ch * compression)
                stages.append(Transition(ch, out))
                ch = out
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(ch)
        self.linear = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(self.normalize(x)))
        x = F.relu(self.bn(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet_cifar(
    num_classes: int = 10,
    growth_rate: int = 12,
    block_layers: Sequence[int] = (4, 4, 4),
    normalize: bool = True,
) -> DenseNetCifar:
    """DenseNet-BC with growth rate 12 and three 4-layer dense blocks (fast)."""
    return DenseNetCifar(
        num_classes=num_classes, growth_rate=growth_rate, block_layers=block_layers, normalize=normalize
    )
