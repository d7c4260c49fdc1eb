"""The reference model zoo (``models``): registry, forward shapes, ONNX export parity, pretrained loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import models
from models.common import Normalize
from models.resnet_cifar import ShortcutA, load_pretrained

# Big ImageNet models: forward shape + parameter count only (no ONNX export, to keep CI fast).
# Expected counts are torchvision's for the same architectures.
BIG_PARAMS: dict[str, int] = {
    "resnet50": 25_557_032,
    "mobilenetv2": 3_504_872,
    "mnasnet": 4_383_312,
    "regnet_x_400mf": 5_495_976,
}

# Smaller widths where the constructor allows it, to keep export tests fast.
FAST_KWARGS: dict[str, dict[str, Any]] = {
    "vgg_cifar": {"width": 0.25},
    "mobilenetv2_cifar": {"width_mult": 0.5},
    "resnet50_small": {"width": 0.125, "num_classes": 10},
}

# (case id, registry name, kwargs): every small registry entry plus extra variants.
EXPORT_CASES: list[tuple[str, str, dict[str, Any]]] = [
    (name, name, FAST_KWARGS.get(name, {})) for name in models.names() if name not in BIG_PARAMS
] + [
    ("senet_cifar-se_linear", "senet_cifar", {"se_linear": True}),
    ("lenet5-normalize", "lenet5", {"normalize": True}),
    ("vgg_cifar-dropout", "vgg_cifar", {"width": 0.125, "dropout": True}),
]

PRETRAINED_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrained" / "resnet-cifar10"


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms (fresh ones are near identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _sample_input(spec: models.ModelSpec, batch: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if spec.dataset == "sequence":
        return torch.randn(batch, *spec.input_shape, generator=gen)
    return torch.rand(batch, *spec.input_shape, generator=gen)  # images in [0, 1]


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    """Relative tolerance 1e-4, with the absolute floor scaled to the output's magnitude."""
    assert got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale)


# ---------------------------------------------------------------- registry


def test_registry_entries_are_consistent() -> None:
    assert models.names() == list(models.REGISTRY)
    assert set(BIG_PARAMS) <= set(models.REGISTRY)
    for name, spec in models.REGISTRY.items():
        assert spec.name == name
        assert callable(spec.build)
        assert spec.dataset in {"mnist", "cifar10", "imagenet", "sequence"}
        assert spec.num_classes > 0 and spec.description
        assert all(isinstance(d, int) and d > 0 for d in spec.input_shape)
    spec = models.REGISTRY["resnet20"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_build_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        models.build("nope")
    message = str(info.value)
    assert "nope" in message
    for name in models.names():
        assert name in message


# ---------------------------------------------------------------- forward + ONNX parity


# The legacy exporter (dynamo=False) warns that it is deprecated, and that Slice with step 2
# (option-A shortcut) cannot be constant-folded: both expected.
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Constant folding - Only steps=1:UserWarning")
@pytest.mark.parametrize(
    ("name", "kwargs"), [c[1:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES]
)
def test_export_matches_torch(name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    spec = models.REGISTRY[name]
    torch.manual_seed(0)
    model = models.build(name, **kwargs).eval()
    _randomize_batchnorm(model)
    x = _sample_input(spec, batch=2)
    with torch.no_grad():
        ref = model(x)
        again = model(x)
    num_classes = kwargs.get("num_classes", spec.num_classes)
    assert ref.shape == (2, num_classes)
    assert torch.isfinite(ref).all()
    assert torch.equal(ref, again), "forward is not deterministic"

    path = tmp_path / f"{name}.onnx"
    _export(model, x, path)
    graph = onnx.load(str(path)).graph
    if isinstance(getattr(model, "normalize", None), Normalize):
        consumers = [n.op_type for n in graph.node if "input" in n.input]
        assert consumers == ["Sub"], f"normalisation is not the first op: {consumers}"

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _assert_close(session.run(["logits"], {"input": x.numpy()})[0], ref.numpy())
    # The batch axis is dynamic: a different batch size runs and still matches.
    x1 = _sample_input(spec, batch=3, seed=3)
    with torch.no_grad():
        ref1 = model(x1)
    _assert_close(session.run(["logits"], {"input": x1.numpy()})[0], ref1.numpy())


@pytest.mark.parametrize("name", sorted(BIG_PARAMS))
def test_big_imagenet_models_forward_shape(name: str) -> None:
    spec = models.REGISTRY[name]
    torch.manual_seed(0)
    model = models.build(name).eval()
    assert _num_params(model) == BIG_PARAMS[name]
    assert spec.input_shape == (3, 224, 224) and spec.num_classes == 1000
    with torch.no_grad():
        out = model(_sample_input(spec, batch=1))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- architecture details


def test_width_multipliers_shrink_models() -> None:
    assert _num_params(models.build("vgg_cifar", width=0.5)) < _num_params(models.build("vgg_cifar"))
    small = models.build("mobilenetv2_cifar", width_mult=0.5)
    assert _num_params(small) < _num_params(models.build("mobilenetv2_cifar"))


def test_normalize_is_first_and_stays_out_of_state_dict() -> None:
    model = models.build("resnet20")
    assert isinstance(model.normalize, Normalize)
    assert not any(k.startswith("normalize.") for k in model.state_dict())
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), (x - mean) / std)
    assert isinstance(models.build("resnet20", normalize=False).normalize, nn.Identity)
    assert isinstance(models.build("lenet300").normalize, nn.Identity)  # MNIST nets: off by default


def test_option_a_shortcut() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(32)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert len(list(ShortcutA(32).parameters())) == 0


def test_cifar_resnet_depths_and_names() -> None:
    for name, n in (("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9)):
        model = models.build(name)
        assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    block = models.build("resnet20").layer2[0]
    assert isinstance(block.shortcut, ShortcutA)
    assert {"conv1", "bn1", "conv2", "bn2", "shortcut"} <= {k for k, _ in block.named_children()}


def test_grouped_and_depthwise_convs() -> None:
    resnext = models.build("resnext_cifar")
    resnext_groups = [m for m in resnext.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert resnext_groups and all(1 < m.groups < m.in_channels for m in resnext_groups)
    mnv2 = models.build("mobilenetv2_cifar")
    depthwise = [m for m in mnv2.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    first_block = mnv2.features[1]
    assert len(first_block.conv) == 3  # expansion 1: depthwise, project conv, BN (no expand conv)


# ---------------------------------------------------------------- pretrained CIFAR ResNets


@pytest.mark.data
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_load_pretrained_cifar_resnet(name: str) -> None:
    files = sorted(PRETRAINED_DIR.glob(f"{name}-*.th")) if PRETRAINED_DIR.is_dir() else []
    if not files:
        pytest.skip(f"pretrained checkpoint {name}-*.th not found in {PRETRAINED_DIR.resolve()}")
    model = load_pretrained(models.build(name), files[0]).eval()
    state = torch.load(files[0], weights_only=True, map_location="cpu")["state_dict"]
    torch.testing.assert_close(model.conv1.weight, state["module.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.linear.bias, state["module.linear.bias"], rtol=0, atol=0)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.data
def test_load_pretrained_rejects_wrong_architecture() -> None:
    files = sorted(PRETRAINED_DIR.glob("resnet20-*.th")) if PRETRAINED_DIR.is_dir() else []
    if not files:
        pytest.skip(f"pretrained checkpoint resnet20-*.th not found in {PRETRAINED_DIR.resolve()}")
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(models.build("resnet32"), files[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained(models.build("resnet20", num_classes=100), files[0])
