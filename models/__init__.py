"""Reference PyTorch architectures for testing and benchmarking onnxprune.

``REGISTRY`` maps a name to a :class:`ModelSpec`; ``build(name, **kwargs)``
constructs a fresh, randomly initialised model (pass ``torch.manual_seed`` first
for reproducible weights). Image models take inputs in [0, 1]; normalisation,
where enabled, is the model's first op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .common import Normalize, layer_call_order, randomize_batchnorm
from .densenet_cifar import densenet_cifar
from .lenet import lenet5, lenet300, lenet500
from .mnasnet import mnasnet
from .mobilenetv2 import mobilenetv2, mobilenetv2_cifar
from .regnet import regnet_x_400mf
from .resnet_cifar import resnet20, resnet32, resnet44, resnet56
from .resnet_imagenet import resnet50, resnet50_small
from .resnext_cifar import resnext_cifar
from .senet_cifar import senet_cifar
from .transformer import transformer_block
from .vgg_cifar import vgg_cifar
from .vit import vit_cifar

__all__ = ["REGISTRY", "ModelSpec", "Normalize", "build", "layer_call_order", "names", "randomize_batchnorm"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one reference model and what it expects.

    ``input_shape`` is one sample without the batch axis (CHW, or (T, D) for sequences).
    ``dataset`` is the default dataset family: "mnist", "cifar10", "imagenet" or "sequence".
    """

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    description: str


_MNIST = (1, 28, 28)
_CIFAR = (3, 32, 32)
_IMAGENET = (3, 224, 224)

_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec("lenet300", lenet300, _MNIST, 10, "mnist", "LeNet-300-100 MLP (784-300-100-10, ReLU)"),
    ModelSpec("lenet500", lenet500, _MNIST, 10, "mnist", "LeNet-500-300 MLP (784-500-300-10, ReLU)"),
    ModelSpec("lenet5", lenet5, _MNIST, 10, "mnist", "LeNet5-Caffe: conv20-pool-conv50-pool-fc500-fc10"),
    ModelSpec(
        "vgg_cifar", vgg_cifar, _CIFAR, 10, "cifar10",
        "Zagoruyko's VGG-16-BN CIFAR net (13 conv + BN, fc 512 + BN1d); width multiplier",
    ),
    ModelSpec("resnet20", resnet20, _CIFAR, 10, "cifar10", "CIFAR ResNet-20, option-A shortcuts"),
    ModelSpec("resnet32", resnet32, _CIFAR, 10, "cifar10", "CIFAR ResNet-32, option-A shortcuts"),
    ModelSpec("resnet44", resnet44, _CIFAR, 10, "cifar10", "CIFAR ResNet-44, option-A shortcuts"),
    ModelSpec("resnet56", resnet56, _CIFAR, 10, "cifar10", "CIFAR ResNet-56, option-A shortcuts"),
    ModelSpec(
        "mobilenetv2_cifar", mobilenetv2_cifar, _CIFAR, 10, "cifar10",
        "MobileNetV2 for 32x32: 9 inverted residuals (first with expansion 1), 1x1 conv to 256",
    ),
    ModelSpec(
        "densenet_cifar", densenet_cifar, _CIFAR, 10, "cifar10",
        "DenseNet-BC, growth 12, three 4-layer dense blocks, compression 0.5",
    ),
    ModelSpec(
        "resnext_cifar", resnext_cifar, _CIFAR, 10, "cifar10",
        "ResNeXt bottlenecks, grouped 3x3 (cardinality 4), 1x1 conv+BN projection shortcuts",
    ),
    ModelSpec(
        "senet_cifar", senet_cifar, _CIFAR, 10, "cifar10",
        "ResNet-14-style with squeeze-and-excitation (1x1 convs, or Linear with se_linear=True)",
    ),
    ModelSpec(
        "vit_cifar", vit_cifar, _CIFAR, 10, "cifar10",
        "ViT for 32x32: patch 4 (64 tokens + class token), dim 192, depth 6, 6 heads of 32, MLP 384 (GELU), pre-norm",
    ),
    ModelSpec(
        "transformer_block", transformer_block, (16, 64), 10, "sequence",
        "One pre-norm transformer encoder block (4 heads, hand-written MHA, GELU MLP), mean-pool, linear",
    ),
    ModelSpec(
        "resnet50_small", resnet50_small, (3, 64, 64), 1000, "imagenet",
        "ResNet-50 topology at width 0.25 for 64x64 inputs (fast tests)",
    ),
    ModelSpec("resnet50", resnet50, _IMAGENET, 1000, "imagenet", "ResNet-50, torchvision layout"),
    ModelSpec("mobilenetv2", mobilenetv2, _IMAGENET, 1000, "imagenet", "MobileNetV2 1.0, torchvision layout"),
    ModelSpec("mnasnet", mnasnet, _IMAGENET, 1000, "imagenet", "MNASNet 1.0, torchvision layout"),
    ModelSpec(
        "regnet_x_400mf", regnet_x_400mf, _IMAGENET, 1000, "imagenet",
        "RegNetX-400MF, torchvision layout (widths 32/64/160/400, depths 1/2/7/12, group width 16)",
    ),
)  # fmt: skip

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def names() -> list[str]:
    """Registered model names, in registry order."""
    return list(REGISTRY)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a fresh model by registry name; ``kwargs`` go to its constructor.

    Raises ``KeyError`` listing the known names when ``name`` is not registered.
    """
    try:
        spec = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None
    return spec.build(**kwargs)
