"""Zagoruyko's VGG-like CIFAR-10 net (cifar.torch ``vgg_bn_drop``) with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, make_normalize, scaled

#: Conv widths; "M" is a 2x2 max-pool.
VGG_CIFAR_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip

# Dropout after these conv indices in vgg_bn_drop (0-based over the conv layers).
_DROPOUT_AFTER: dict[int, float] = {0: 0.3, 2: 0.4, 4: 0.4, 5: 0.4, 7: 0.4, 8: 0.4, 10: 0.4, 11: 0.4}


class VGGCifar(nn.Module):
    """``features`` (conv3x3-BN-ReLU blocks and max-pools), flatten, ``classifier``.

    ``classifier`` = Linear(512w, 512w), BatchNorm1d, ReLU, Linear(512w, num_classes).
    ``width`` scales every conv and hidden width. ``dropout=True`` adds the
    original Dropout layers (identity in ``eval()``; off by default so the
    training-mode forward is deterministic too).
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        normalize: bool = True,
        dropout: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        layers: list[nn.Module] = []
        in_ch, conv_idx = 3, 0
        for item in VGG_CIFAR_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            assert isinstance(item, int)
            out_ch = scaled(item, width)
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
            ]
            if dropout and conv_idx in _DROPOUT_AFTER:
                layers.append(nn.Dropout(_DROPOUT_AFTER[conv_idx]))
            in_ch, conv_idx = out_ch, conv_idx + 1
        self.features = nn.Sequential(*layers)
        hidden = scaled(512, width)
        head: list[nn.Module] = [nn.Dropout(0.5)] if dropout else []
        head += [nn.Linear(in_ch, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        head += [nn.Dropout(0.5)] if dropout else []
        head += [nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(x, 1))


def vgg_cifar(
    num_classes: int = 10, width: float = 1.0, normalize: bool = True, dropout: bool = False
) -> VGGCifar:
    """VGG-16-style CIFAR net (13 conv + 2 fc), optionally width-scaled."""
    return VGGCifar(num_classes=num_classes, width=width, normalize=normalize, dropout=dropout)
