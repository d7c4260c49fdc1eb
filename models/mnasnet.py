"""MnasNet-A1-style "MNASNet 1.0" (Tan et al. 2019) in torchvision's layout (no SE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, make_divisible, make_normalize

# torchvision's MnasNet BN momentum (TensorFlow's decay 0.9997).
_BN_MOMENTUM = 1 - 0.9997

#: (out-depth index, kernel, first stride, expansion, repeats) of the six stacks.
_STACKS: tuple[tuple[int, int, int, int, int], ...] = (
    (2, 3, 2, 3, 3),
    (3, 5, 2, 3, 3),
    (4, 5, 2, 6, 3),
    (5, 3, 1, 6, 2),
    (6, 5, 2, 6, 4),
    (7, 3, 1, 6, 1),
)


class MnasInvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, kxk depthwise-BN-ReLU, 1x1 project-BN; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.apply_residual = in_ch == out_ch and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid, momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(mid, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch, momentum=_BN_MOMENTUM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.apply_residual else out


def _stack(in_ch: int, out_ch: int, kernel: int, stride: int, expansion: int, repeats: int) -> nn.Sequential:
    blocks = [MnasInvertedResidual(in_ch, out_ch, kernel, stride, expansion)]
    blocks += [MnasInvertedResidual(out_ch, out_ch, kernel, 1, expansion) for _ in range(1, repeats)]
    return nn.Sequential(*blocks)


class MNASNet(nn.Module):
    """``layers`` (stem, separable conv, six inverted-residual stacks, 1x1 to 1280), GAP, ``classifier``."""

    def __init__(
        self, alpha: float = 1.0, num_classes: int = 1000, dropout: float = 0.0, normalize: bool = True
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        d = [make_divisible(v * alpha, 8) for v in (32, 16, 24, 40, 80, 96, 192, 320)]
        layers: list[nn.Module] = [
            nn.Conv2d(3, d[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(d[0], momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(d[0], d[0], 3, padding=1, groups=d[0], bias=False),
            nn.BatchNorm2d(d[0], momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(d[0], d[1], 1, bias=False),
            nn.BatchNorm2d(d[1], momentum=_BN_MOMENTUM),
        ]
        in_ch = d[1]
        for idx, kernel, stride, expansion, repeats in _STACKS:
            layers.append(_stack(in_ch, d[idx], kernel, stride, expansion, repeats))
            in_ch = d[idx]
        layers += [
            nn.Conv2d(in_ch, 1280, 1, bias=False),
            nn.BatchNorm2d(1280, momentum=_BN_MOMENTUM),
            nn.ReLU(),
        ]
        self.layers = nn.Sequential(*layers)
        # Dropout p=0 by default (torchvision uses 0.2): index 1 keeps torchvision's key names.
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.normalize(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mnasnet(num_classes: int = 1000, alpha: float = 1.0, normalize: bool = True) -> MNASNet:
    """MNASNet 1.0 (224x224 input), 4.38 M parameters at alpha 1.0."""
    return MNASNet(alpha=alpha, num_classes=num_classes, normalize=normalize)
