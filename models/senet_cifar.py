"""Small squeeze-and-excitation ResNet for CIFAR (Hu et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ThreeStageCifarNet


class SqueezeExcite(nn.Module):
    """``x * sigmoid(expand(relu(reduce(avgpool(x)))))``.

    ``linear=False``: reduce/expand are 1x1 convs on the N,C,1,1 tensor.
    ``linear=True``: they are ``nn.Linear`` on the flattened vector, reshaped back
    with ``s.view(s.size(0), -1, 1, 1)``.
    """

    def __init__(self, channels: int, reduction: int = 4, linear: bool = False) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.linear = linear
        self.reduce: nn.Module
        self.expand: nn.Module
        if linear:
            self.reduce = nn.Linear(channels, hidden)
            self.expand = nn.Linear(hidden, channels)
        else:
            self.reduce = nn.Conv2d(channels, hidden, 1)
            self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        if self.linear:
            s = torch.flatten(s, 1)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))
        if self.linear:
            s = s.view(s.size(0), -1, 1, 1)
        return x * s


class SEBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, SE, add shortcut (identity or 1x1 conv + BN), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, se_linear: bool, reduction: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, reduction, linear=se_linear)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class SENetCifar(ThreeStageCifarNet):
    """3x3 stem (16), three stages of SE basic blocks (16/32/64), GAP, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        blocks_per_stage: int = 2,
        reduction: int = 4,
        se_linear: bool = False,
        normalize: bool = True,
    ) -> None:
        def block(stage: int, in_ch: int, out_ch: int, stride: int) -> nn.Module:
            return SEBasicBlock(in_ch, out_ch, stride, se_linear, reduction)

        super().__init__(16, (16, 32, 64), blocks_per_stage, block, num_classes, normalize)


def senet_cifar(
    num_classes: int = 10,
    blocks_per_stage: int = 2,
    reduction: int = 4,
    se_linear: bool = False,
    normalize: bool = True,
) -> SENetCifar:
    """SE-ResNet-14-style CIFAR net; ``se_linear=True`` uses Linear layers in the SE branch."""
    return SENetCifar(
        num_classes=num_classes,
        blocks_per_stage=blocks_per_stage,
        reduction=reduction,
        se_linear=se_linear,
        normalize=normalize,
    )
