"""Both PyTorch ONNX exporters (dynamo, the default, and TorchScript): the engine prunes what each emits.

For every case: some BatchNorm channels are zeroed (weight and bias; layer rows where a net has no
BatchNorm), the net is exported with each exporter and pruned with ``--target none``. The pruned
model must match its export on ONNX Runtime, and the dynamo export must prune to no more float
parameters than the TorchScript one (their shape vectors differ: ReduceMean's axes and a Reshape
target are int64 initializers in the dynamo export, attributes in the TorchScript one).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import models  # noqa: E402
import onnxprune  # noqa: E402
from onnxprune.api import RunResult  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402
from onnxprune.torch_export import EXPORTERS, export_onnx  # noqa: E402
from tests.prune_helpers import layer_widths, prune_checked, same_outputs  # noqa: E402
from tests.vision import import_torchvision  # noqa: E402

Builder = Callable[[], nn.Module]


def _zoo(name: str, **kwargs) -> tuple[Builder, tuple[int, ...]]:
    shape = models.REGISTRY[name].input_shape
    return (lambda: models.build(name, **kwargs)), ((3, 64, 64) if shape == (3, 224, 224) else shape)


def _torchvision(name: str) -> tuple[Builder, tuple[int, ...]]:
    return (lambda: getattr(import_torchvision().models, name)(num_classes=10)), (3, 32, 32)


# Representative: an MLP head after Reshape, option-A shortcuts (Slice, Pad), attention (MatMul, LayerNorm,
# Erf), a residual ImageNet net, depthwise convs with squeeze-excitation and HardSwish.
CASES: dict[str, tuple[Builder, tuple[int, ...]]] = {
    "lenet5": _zoo("lenet5"),
    "resnet20": _zoo("resnet20"),
    "transformer_block": _zoo("transformer_block"),
    "torchvision-resnet18": _torchvision("resnet18"),
    "torchvision-mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
}
SLOW_CASES: dict[str, tuple[Builder, tuple[int, ...]]] = {
    **{name: _zoo(name) for name in models.names() if name not in CASES and name not in ("vgg_cifar", "resnet50_small")},
    "vgg_cifar": _zoo("vgg_cifar", width=0.25),
    "resnet50_small": _zoo("resnet50_small", width=0.125, num_classes=10),
    "senet_cifar-se_linear": _zoo("senet_cifar", se_linear=True),
    "torchvision-efficientnet_b0": _torchvision("efficientnet_b0"),
    "torchvision-densenet121": _torchvision("densenet121"),
}
ALL_CASES = {**CASES, **SLOW_CASES}
ALL_IDS = list(CASES) + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW_CASES]


def zero_channels(model: nn.Module, fraction: float = 0.4, seed: int = 0) -> None:
    """Zero weight and bias of ``fraction`` of every BatchNorm's channels (of every layer's but the last
    when the net has no BatchNorm), after giving the BatchNorms non-trivial statistics."""
    gen = torch.Generator().manual_seed(seed)
    models.randomize_batchnorm(model, seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    targets = norms or [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    with torch.no_grad():
        for m in targets:
            n = m.weight.shape[0]
            idx = torch.randperm(n, generator=gen)[: int(fraction * n)]
            m.weight[idx] = 0
            if m.bias is not None:
                m.bias[idx] = 0


@functools.cache
def _net(case: str) -> tuple[nn.Module, torch.Tensor]:
    build, shape = ALL_CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    zero_channels(model)
    return model, torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))


@functools.cache
def _pruned(case: str, exporter: str) -> tuple[onnx.ModelProto, RunResult]:
    """The case's export and its pruning (every dead channel), computed once per session."""
    model, x = _net(case)
    dense = export_onnx(model, x, exporter=exporter)
    return dense, prune_checked(dense)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", ALL_IDS)
def test_pruned_export_is_exact(case, exporter):
    model, x = _net(case)
    dense, result = _pruned(case, exporter)
    assert result.report.after.params < result.report.before.params, "nothing was pruned"
    assert same_outputs(dense, result.model, seed=3, rtol=1e-4)
    with torch.no_grad():
        ref = model(x).numpy()
    got = make_session(result.model).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("case", ALL_IDS)
def test_dynamo_export_prunes_at_least_as_compactly_as_torchscript(case):
    dynamo, torchscript = _pruned(case, "dynamo")[1].report, _pruned(case, "torchscript")[1].report
    assert dynamo.after.params <= torchscript.after.params, (
        f"float parameters after pruning: dynamo {dynamo.after.params}, torchscript {torchscript.after.params}")
    assert dynamo.after.macs <= torchscript.after.macs


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_and_compress_of_a_wrapped_model_match_it(exporter, tmp_path):
    from onnxprune.bayes import wrap
    from tests.test_bayes_wrap import reject_some

    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    wrapped = wrap(models.build("lenet5").eval(), (x[:1],), method="sbp")
    reject_some(wrapped)
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(x).numpy()
    exported = onnxprune.export(wrapped, (x[:1],), exporter=exporter)
    compressed = onnxprune.compress(wrapped, (x[:1],), tmp_path / "pruned.onnx", exporter=exporter, target="none")
    assert (tmp_path / "pruned.onnx").exists()
    assert sum(w for _, w in layer_widths(compressed).values()) < sum(w for _, w in layer_widths(exported).values())
    for proto in (exported, compressed):
        got = make_session(proto).run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_unknown_exporter_is_a_value_error_naming_both():
    with pytest.raises(ValueError, match="dynamo, torchscript"):
        export_onnx(nn.Linear(3, 2), torch.zeros(1, 3), exporter="onnxscript")


class TwoInputs(nn.Module):
    """An image and a feature vector in; class scores and a per-example embedding out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 + 4, 5)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.fc(torch.cat([pooled, features], dim=1)), pooled


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_several_inputs_and_outputs_are_named_and_the_batch_is_dynamic(exporter, capfd):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    with torch.no_grad():
        model.conv.weight[2:5] = 0
        model.conv.bias[2:5] = 0
    example = (torch.rand(2, 3, 8, 8), torch.rand(2, 4))
    proto = export_onnx(model, example, exporter=exporter)
    assert capfd.readouterr() == ("", "")  # the exporter's progress and warnings go to logging
    assert [i.name for i in proto.graph.input] == ["input", "input_1"]
    assert [o.name for o in proto.graph.output] == ["logits", "output_1"]
    assert proto.ir_version <= 10
    batch = (torch.rand(5, 3, 8, 8), torch.rand(5, 4))
    with torch.no_grad():
        ref = [t.numpy() for t in model(*batch)]
    for pruned in (proto, prune_checked(proto).model):
        got = make_session(pruned).run(None, {"input": batch[0].numpy(), "input_1": batch[1].numpy()})
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    assert layer_widths(prune_checked(proto).model)  # it still has its layers
    assert capfd.readouterr() == ("", "")


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


def test_a_dynamo_failure_is_raised_with_a_note_naming_the_other_exporter(caplog):
    with caplog.at_level(logging.DEBUG, logger="onnxprune.torch_export"), pytest.raises(Exception) as info:
        export_onnx(DataDependent(), torch.rand(2, 3))
    assert any('exporter="torchscript"' in note for note in getattr(info.value, "__notes__", []))
    assert export_onnx(DataDependent(), torch.rand(2, 3), exporter="torchscript").graph.node


class ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                      nn.Conv2d(12, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)).view(x.shape[0], -1))


def test_the_unoptimised_dynamo_export_prunes_as_well():
    """``optimize=False`` keeps torchlib's patterns: a Conv's zero bias made by ``CastLike(0, x)`` and
    ``Expand``, BatchNormalization nodes, a Reshape target computed from ``Shape(x)``."""
    from onnxprune.torch_export import _quiet

    torch.manual_seed(0)
    model = ConvBnNet().eval()
    models.randomize_batchnorm(model)
    with torch.no_grad():
        for bn, dead in ((model.features[1], [0, 5, 7]), (model.features[4], [1, 2])):
            bn.weight[dead] = 0
            bn.bias[dead] = 0
    x = torch.rand(2, 3, 10, 10)
    with _quiet([]), torch.no_grad():
        proto = torch.onnx.export(model, (x,), dynamo=True, optimize=False, opset_version=18, input_names=["input"],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto
    ops = {n.op_type for n in proto.graph.node}
    assert {"CastLike", "BatchNormalization", "Shape", "Concat"} <= ops
    analysis = onnxprune.inspect_model(proto)[0]
    assert not analysis.barriers
    result = prune_checked(proto)
    assert sorted(w for _, w in layer_widths(result.model).values()) == [9, 10, 14]
    assert same_outputs(proto, result.model, seed=1)


def test_train_takes_the_exporter_and_refuses_an_unknown_one(tmp_path):
    from onnxprune.cli import build_parser
    from onnxprune.errors import InputError
    from onnxprune.pipeline import TrainConfig, run

    assert build_parser().parse_args(["train"]).exporter == "dynamo"
    assert build_parser().parse_args(["train", "--exporter", "torchscript"]).exporter == "torchscript"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--exporter", "onnxscript"])
    with pytest.raises(InputError, match="unknown exporter 'onnxscript'; known: dynamo, torchscript"):
        run(TrainConfig(exporter="onnxscript", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
