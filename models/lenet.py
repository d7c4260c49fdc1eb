"""LeNet family for 28x28 MNIST-style inputs: LeNet-300-100, LeNet-500-300, LeNet5-Caffe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import MNIST_MEAN, MNIST_STD, make_normalize


class LeNetMLP(nn.Module):
    """Fully connected LeNet: flatten, then ``Linear+ReLU`` per hidden width, then a linear head.

    ``hidden=(300, 100)`` is LeNet-300-100, ``hidden=(500, 300)`` is LeNet-500-300.
    Layers are named ``fc1``, ``fc2``, ... (the last one is the head).
    """

    def __init__(
        self,
        hidden: Sequence[int] = (300, 100),
        num_classes: int = 10,
        in_features: int = 28 * 28,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, MNIST_MEAN, MNIST_STD)
        widths = [in_features, *hidden, num_classes]
        self.num_layers = len(widths) - 1
        for i in range(self.num_layers):
            self.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.normalize(x), 1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class LeNet5(nn.Module):
    """LeNet5 as in Caffe's MNIST example: conv 20 5x5, pool, conv 50 5x5, pool, fc 500, fc 10."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, MNIST_MEAN * in_channels, MNIST_STD * in_channels)
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def lenet300(num_classes: int = 10, normalize: bool = False) -> LeNetMLP:
    """LeNet-300-100 (784-300-100-10)."""
    return LeNetMLP((300, 100), num_classes=num_classes, normalize=normalize)


def lenet500(num_classes: int = 10, normalize: bool = False) -> LeNetMLP:
    """LeNet-500-300 (784-500-300-10)."""
    return LeNetMLP((500, 300), num_classes=num_classes, normalize=normalize)


def lenet5(num_classes: int = 10, normalize: bool = False) -> LeNet5:
    """LeNet5-Caffe (20-50-500-10)."""
    return LeNet5(num_classes=num_classes, normalize=normalize)
