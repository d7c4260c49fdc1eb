"""Textbook CIFAR ResNet (He et al. 2016, section 4.2) with the parameter-free option-A shortcut.

Module names (``conv1``, ``bn1``, ``layer1..3``, ``linear``; blocks with ``conv1``,
``bn1``, ``conv2``, ``bn2``, ``shortcut``) match the widely used pretrained
checkpoints (Yerlan Idelbayev's ``resnetNN-*.th``), which :func:`load_pretrained` reads.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, make_normalize


class ShortcutA(nn.Module):
    """Option-A down-sampling shortcut: ``x[:, :, ::2, ::2]`` zero-padded on the channel axis.

    Adds ``planes // 4`` zero channels on each side (16 -> 32 -> 64 in the CIFAR
    ResNet). No parameters.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError(
                    "option-A shortcut needs stride 2 and doubled width, "
                    f"got {in_planes}->{planes} stride {stride}"
                )
            self.shortcut = ShortcutA(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet-(6n+2): 3x3 stem, three stages of ``n`` basic blocks (16/32/64), GAP, linear."""

    def __init__(self, num_blocks: int, num_classes: int = 10, normalize: bool = True) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._make_layer(16, num_blocks, stride=1)
        self.layer2 = self._make_layer(32, num_blocks, stride=2)
        self.layer3 = self._make_layer(64, num_blocks, stride=2)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet20(num_classes: int = 10, normalize: bool = True) -> ResNetCifar:
    """ResNet-20 (n=3), 0.27 M parameters."""
    return ResNetCifar(3, num_classes=num_classes, normalize=normalize)


def resnet32(num_classes: int = 10, normalize: bool = True) -> ResNetCifar:
    """ResNet-32 (n=5), 0.46 M parameters."""
    return ResNetCifar(5, num_classes=num_classes, normalize=normalize)


def resnet44(num_classes: int = 10, normalize: bool = True) -> ResNetCifar:
    """ResNet-44 (n=7), 0.66 M parameters."""
    return ResNetCifar(7, num_classes=num_classes, normalize=normalize)


def resnet56(num_classes: int = 10, normalize: bool = True) -> ResNetCifar:
    """ResNet-56 (n=9), 0.85 M parameters."""
    return ResNetCifar(9, num_classes=num_classes, normalize=normalize)


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a ``{'state_dict': {'module.<key>': tensor}, 'best_prec1': float}`` checkpoint.

    Strips the ``module.`` (DataParallel) prefix. Entries the checkpoint lacks
    only because it predates them (``num_batches_tracked``) keep the model's
    values; any other missing, unexpected or wrongly shaped key raises
    ``ValueError`` naming it. Returns ``model`` (loaded in place).
    """
    # map_location: the published checkpoints hold CUDA storages.
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint dict with a 'state_dict' entry")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state) - optional)
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise ValueError(
            f"checkpoint {os.fspath(path)} does not fit {type(model).__name__}; " + "; ".join(parts)
        )
    for k in optional - set(state):
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model
