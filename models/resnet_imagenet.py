"""ImageNet ResNet-50 (He et al. 2016) in torchvision's layout (v1.5: stride on the 3x3 conv)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, make_normalize, scaled


class Bottleneck(nn.Module):
    """1x1 (in->w)-BN-ReLU, 3x3 stride s (w->w)-BN-ReLU, 1x1 (w->4w)-BN, add, ReLU.

    ``downsample`` (1x1 conv stride s + BN) projects the shortcut when the shape changes.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetImageNet(nn.Module):
    """7x7/2 stem + 3x3/2 max-pool, four bottleneck stages, GAP, ``fc``.

    ``width`` scales the stem and every stage's bottleneck width (64/128/256/512).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width: float = 1.0,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        self.in_ch = scaled(64, width)
        self.conv1 = nn.Conv2d(3, self.in_ch, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.in_ch)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(scaled(64, width), layers[0], 1)
        self.layer2 = self._make_layer(scaled(128, width), layers[1], 2)
        self.layer3 = self._make_layer(scaled(256, width), layers[2], 2)
        self.layer4 = self._make_layer(scaled(512, width), layers[3], 2)
        self.fc = nn.Linear(self.in_ch, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = []
        for s in [stride] + [1] * (blocks - 1):
            out.append(Bottleneck(self.in_ch, planes, s))
            self.in_ch = planes * Bottleneck.expansion
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50(num_classes: int = 1000, width: float = 1.0, normalize: bool = True) -> ResNetImageNet:
    """ResNet-50 (3-4-6-3 bottlenecks), 25.6 M parameters at width 1.0, 224x224 input."""
    return ResNetImageNet((3, 4, 6, 3), num_classes=num_classes, width=width, normalize=normalize)


def resnet50_small(num_classes: int = 1000, width: float = 0.25, normalize: bool = True) -> ResNetImageNet:
    """ResNet-50 topology at a fraction of the width (default 1/4), for fast tests on 64x64 inputs."""
    return ResNetImageNet((3, 4, 6, 3), num_classes=num_classes, width=width, normalize=normalize)
