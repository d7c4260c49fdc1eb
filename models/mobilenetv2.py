"""MobileNetV2 (Sandler et al. 2018): ImageNet (torchvision layout) and a small 32x32 CIFAR variant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, ConvBNAct, make_divisible, make_normalize

#: (expansion t, output channels c, repeats n, first stride s), from the paper / torchvision.
IMAGENET_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

#: 9 blocks for 32x32 inputs (spatial 32 -> 16 -> 8 -> 4).
CIFAR_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
    (6, 160, 1, 2),
)


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN, residual if shapes match.

    The expand conv is left out when ``expand_ratio == 1``. Layout of ``self.conv``
    follows torchvision (``conv.0`` ... ``conv.N``).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride=stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """``features`` (stem, inverted residuals, 1x1 last conv), GAP, ``classifier`` (Dropout, Linear)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        setting: Sequence[tuple[int, int, int, int]] = IMAGENET_SETTING,
        stem_channels: int = 32,
        stem_stride: int = 2,
        last_channels: int = 1280,
        round_nearest: int = 8,
        dropout: float = 0.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        in_ch = make_divisible(stem_channels * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channels * max(1.0, width_mult), round_nearest)
        layers: list[nn.Module] = [ConvBNAct(3, in_ch, 3, stride=stem_stride, activation=nn.ReLU6)]
        for t, c, n, s in setting:
            out_ch = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(ConvBNAct(in_ch, self.last_channel, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        # Dropout p=0 by default (torchvision uses 0.2): index 1 keeps torchvision's key names.
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def mobilenetv2(num_classes: int = 1000, width_mult: float = 1.0, normalize: bool = True) -> MobileNetV2:
    """ImageNet MobileNetV2 (224x224 input), torchvision layout: 3.50 M parameters at width 1.0."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, normalize=normalize)


def mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0, normalize: bool = True) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs: stride-1 stem, 9 inverted residuals, 1x1 conv to 256."""
    return MobileNetV2(
        num_classes=num_classes,
        width_mult=width_mult,
        setting=CIFAR_SETTING,
        stem_channels=32,
        stem_stride=1,
        last_channels=256,
        normalize=normalize,
    )
