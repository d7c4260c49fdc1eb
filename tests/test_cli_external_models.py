"""`onnxprune train --model torchvision:NAME / timm:NAME`: building, checkpoints, --input-size, the whole pipeline.

torchvision and timm are imported through tests/vision.py first (its shim lets them import beside the CPU torch
wheel); the library's plain import then finds them already imported. The pipeline runs use tiny convnets and one
training step (a full run of a real ResNet-18 takes minutes on a small CPU).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnxprune.cli import main
from tests.vision import import_timm, import_torchvision

QUICK = ("--data", "digits", "--epochs", "1", "--pretrain-epochs", "0", "--train-limit", "32", "--batch-size", "32",
         "--target", "none")


@pytest.fixture(scope="module", autouse=True)
def vision():
    import_torchvision()
    import_timm()


def train(*args: str, capsys) -> tuple[int, str, str]:
    code = main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def input_dims(path: Path) -> list:
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def run_on_ort(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# -- build_architecture --------------------------------------------------------------------------------------------


def test_models_names_build_as_before():
    import models
    from onnxprune.architectures import build_architecture

    torch.manual_seed(3)
    expected = models.build("lenet5").state_dict()
    built = build_architecture("lenet5", num_classes=10, in_channels=1, seed=3).state_dict()
    assert expected.keys() == built.keys() and all(torch.equal(expected[k], built[k]) for k in expected)


def test_torchvision_model_on_one_channel_repeats_it(caplog):
    from onnxprune.architectures import ChannelRepeat, build_architecture

    with caplog.at_level(logging.INFO, logger="onnxprune"):
        model = build_architecture("torchvision:squeezenet1_1", num_classes=7, in_channels=1, seed=0).eval()
    assert isinstance(model[0], ChannelRepeat) and "repeated 3 times" in caplog.text
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.model(x.expand(-1, 3, -1, -1)))
        assert model(x).shape == (2, 7)


def test_channel_repeat_exports_to_onnx_and_matches():
    from onnxprune.architectures import ChannelRepeat
    from onnxprune.torch_export import export_onnx

    torch.manual_seed(0)
    model = torch.nn.Sequential(ChannelRepeat(3), torch.nn.Conv2d(3, 4, 3)).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    proto = export_onnx(model, x[:1])
    assert "Expand" in {n.op_type for n in proto.graph.node}
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_three_channel_torchvision_model_and_timm_take_the_channels_as_they_are():
    from onnxprune.architectures import ChannelRepeat, build_architecture

    tv = build_architecture("torchvision:squeezenet1_1", num_classes=10, in_channels=3, seed=0)
    assert not any(isinstance(m, ChannelRepeat) for m in tv.modules())
    tm = build_architecture("timm:test_resnet", num_classes=4, in_channels=1, seed=0).eval()
    assert not any(isinstance(m, ChannelRepeat) for m in tm.modules())
    assert tm(torch.rand(1, 1, 28, 28)).shape == (1, 4)


def test_same_seed_same_weights():
    from onnxprune.architectures import build_architecture

    a, b = (build_architecture("timm:test_resnet", num_classes=10, in_channels=1, seed=5).state_dict() for _ in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s}, lambda s: {"model": s, "epoch": 3}])
def test_checkpoint_with_a_head_for_other_classes_loads_the_rest(tmp_path, caplog, wrap):
    from onnxprune.architectures import build_architecture

    source = build_architecture("torchvision:squeezenet1_1", num_classes=5, in_channels=3, seed=1)
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(source.state_dict()), path)
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        model = build_architecture("torchvision:squeezenet1_1", num_classes=10, in_channels=1, seed=2,
                                   pretrained=str(path))
    loaded, saved = model.model.state_dict(), source.state_dict()
    head = {k for k in saved if saved[k].shape != loaded[k].shape}
    assert head == {"classifier.1.weight", "classifier.1.bias"}
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k not in head)
    assert "head for 5 classes skipped (classifier.1.weight, classifier.1.bias)" in caplog.text


def test_rgb_checkpoint_for_a_one_channel_timm_model_sums_the_stem(tmp_path):
    from onnxprune.architectures import build_architecture, load_state

    rgb = build_architecture("timm:test_resnet", num_classes=10, in_channels=3, seed=1)
    gray = build_architecture("timm:test_resnet", num_classes=10, in_channels=1, seed=2)
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    load_state(gray, str(path), num_classes=10)
    stem = next(k for k, v in rgb.state_dict().items() if v.ndim == 4)
    assert torch.allclose(gray.state_dict()[stem], rgb.state_dict()[stem].sum(1, keepdim=True))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from onnxprune.architectures import build_architecture
    from onnxprune.errors import InputError

    path = tmp_path / "other.pt"
    torch.save(build_architecture("timm:test_resnet", num_classes=10, in_channels=1, seed=0).state_dict(), path)
    with pytest.raises(InputError, match="does not fit the model"):
        build_architecture("torchvision:squeezenet1_1", num_classes=10, in_channels=1, seed=0, pretrained=str(path))


def test_an_architecture_that_cannot_take_the_image_size_says_to_resize():
    from onnxprune.architectures import build_architecture, probe_input
    from onnxprune.errors import InputError

    vit = build_architecture("timm:test_vit", num_classes=10, in_channels=1, seed=0)
    with pytest.raises(InputError, match="cannot take 28x28 images .*--input-size"):
        probe_input(vit, "timm:test_vit", (1, 28, 28))


def test_probe_refuses_auxiliary_outputs_and_leaves_the_model_as_it_was():
    from onnxprune.architectures import probe_input
    from onnxprune.errors import InputError

    class Aux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = self.fc(self.bn(x + 1).flatten(1))
            return (y, y) if self.training else y

    model = Aux()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="returns tuple in training mode, not a tensor of logits"):
        probe_input(model, "x", (1, 2, 2))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- bad --model: one line, exit 2, nothing written ------------------------------------------------------------------


@pytest.mark.parametrize("model, message", [
    ("torchvision:resnet19", "unknown torchvision model 'resnet19'; close: torchvision:resnet18"),
    ("timm:resnet10x", "unknown timm model 'resnet10x'; close: timm:resnet10t"),
    ("keras:resnet18", "unknown model 'keras:resnet18': give a models/ name, torchvision:NAME or timm:NAME"),
    ("torchvision:", "unknown model 'torchvision:'"),
    ("resnet19", "unknown model 'resnet19'; known: lenet300"),
])
def test_unknown_models_are_one_line_and_exit_2(tmp_path, capsys, model, message):
    out = tmp_path / "run"
    code, _, err = train("--model", model, "-o", str(out), "-q", capsys=capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_library_that_does_not_import_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    out = tmp_path / "run"
    code, _, err = train("--model", "timm:resnet10t", "-o", str(out), "-q", capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--model timm:resnet10t needs timm (pip install 'onnxprune[vision]')" in err
    assert not out.exists()


def test_bad_input_size_and_deploy_with_input_size_are_refused(tmp_path, capsys):
    code, _, err = train("--model", "torchvision:squeezenet1_1", "--input-size", "0", "-o", str(tmp_path / "a"),
                         capsys=capsys)
    assert code == 2 and "--input-size must be a positive" in err
    code, _, err = train("--input-size", "32", "--model", "lenet5", "-o", str(tmp_path / "b"), capsys=capsys)
    assert code == 2 and "takes inputs (1, 28, 28) but dataset 'digits' has (1, 32, 32)" in err
    code, _, err = train("--model", "timm:test_resnet", "--input-size", "32", "--deploy", "int8", "-o",
                         str(tmp_path / "c"), capsys=capsys)
    assert code == 2 and "--deploy does not take --input-size" in err


def test_default_output_folder_has_no_colon():
    from onnxprune.cli import _default_train_folder, build_parser

    args = build_parser().parse_args(["train", "--model", "torchvision:resnet18", "--data", "mnist"])
    assert _default_train_folder(args) == "out/torchvision-resnet18-mnist-sbp"


# -- the whole pipeline ----------------------------------------------------------------------------------------------


def test_torchvision_model_trains_prunes_and_runs_on_ort_at_a_new_input_size(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = train("--model", "torchvision:squeezenet1_1", "--input-size", "32", *QUICK, "-q", "-o",
                              str(out), capsys=capsys)
    assert code == 0, err
    assert "torchvision:squeezenet1_1 on digits" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"] == "torchvision:squeezenet1_1" and report["config"]["input_size"] == 32
    assert report["data"]["input_shape"] == [1, 32, 32]
    for name in ("dense.onnx", "pruned.onnx"):
        assert input_dims(out / name)[1:] == [1, 32, 32], name
    assert run_on_ort(out / "pruned.onnx", (1, 32, 32)).shape == (2, 10)
    assert report["pruned"]["agreement_with_wrapped"] >= 0.99


def test_timm_model_with_one_input_channel_from_a_checkpoint_for_other_classes(tmp_path, capsys):
    from onnxprune.architectures import build_architecture

    ckpt = tmp_path / "five-classes.pt"
    torch.save(build_architecture("timm:test_resnet", num_classes=5, in_channels=1, seed=7).state_dict(), ckpt)
    out = tmp_path / "run"
    code, stdout, err = train("--model", "timm:test_resnet", "--pretrained", str(ckpt), *QUICK, "-o", str(out),
                              capsys=capsys)
    assert code == 0, err
    assert "head for 5 classes skipped" in stdout  # logged at INFO: the rest of the checkpoint was loaded
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["pretrained"] == str(ckpt) and report["config"]["pretrain_epochs"] == 0
    assert input_dims(out / "pruned.onnx")[1:] == [1, 28, 28]
    assert "Expand" not in {n.op_type for n in onnx.load(out / "dense.onnx").graph.node}  # in_chans=1: no repeat
    assert run_on_ort(out / "pruned.onnx", (1, 28, 28)).shape == (2, 10)
