"""Building blocks shared by the reference architectures.

Everything here exports to plain ONNX ops (Sub/Div, Conv, BatchNormalization,
Relu/Clip) with ``torch.onnx.export(..., dynamo=False, opset_version=17)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The same numbers are used for ImageNet and CIFAR models (the pretrained CIFAR
# ResNet checkpoints were trained with exactly these).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MNIST_MEAN: tuple[float] = (0.1307,)
MNIST_STD: tuple[float] = (0.3081,)


class Normalize(nn.Module):
    """Per-channel input normalisation ``(x - mean) / std`` on NCHW tensors.

    ``mean`` and ``std`` are non-persistent buffers: they move with ``.to()``
    and become ONNX constants, but stay out of ``state_dict()`` so that
    checkpoints trained with normalisation in the data pipeline load as is.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} entries but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"


def make_normalize(
    enabled: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> nn.Module:
    """A :class:`Normalize` when ``enabled``, else ``nn.Identity`` (exports to nothing)."""
    return Normalize(mean, std) if enabled else nn.Identity()


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest int, at least 1."""
    if width <= 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    return max(1, int(round(channels * width)))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never going down by more than 10 %.

    Same rule as torchvision's ``_make_divisible`` (MobileNet / MnasNet widths).
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvBNAct(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> activation`` as a Sequential.

    Indices 0/1/2 match torchvision's ``Conv2dNormActivation`` so state-dict keys
    follow the torchvision layout. ``activation=None`` leaves out the activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: type[nn.Module] | None = nn.ReLU,
        bn_momentum: float = 0.1,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, momentum=bn_momentum),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are near identity).

    Used by tests and benchmarks so that constants and folded biases are really non-zero.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def layer_call_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of Conv2d/Linear modules in the order forward() calls them.

    The ONNX exporter emits one Conv/Gemm/MatMul per call in the same order, so
    this maps ONNX layers back to modules.
    """
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return order


class ThreeStageCifarNet(nn.Module):
    """A CIFAR net: 3x3 stem, three stages of ``blocks_per_stage`` blocks (the 2nd and 3rd start with stride 2),
    global average pool, linear. ``make_block(stage, in_channels, out_channels, stride)`` builds each block."""

    def __init__(
        self,
        stem_width: int,
        widths: Sequence[int],
        blocks_per_stage: int,
        make_block: Callable[[int, int, int, int], nn.Module],
        num_classes: int = 10,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        self.conv1 = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_ch = stem_width
        stages = []
        for i, out_ch in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(make_block(i, in_ch, out_ch, 2 if (i > 0 and j == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
