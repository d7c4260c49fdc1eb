"""fit(): determinism, checkpoints and resume, DistributedDataParallel; the `onnxprune train` pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import models  # noqa: E402
from onnxprune import bayes  # noqa: E402
from onnxprune.bayes.training import evaluate, fit, recalibrate_norms  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.data import load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", split="train")
    xt, yt = load_dataset("digits", split="test")
    return x[:512], y[:512], xt, yt


def wrapped_lenet(seed=0):
    torch.manual_seed(seed)
    model = models.build("lenet5")
    return bayes.wrap(model, (torch.zeros(1, 1, 28, 28),))


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_fit_is_deterministic_with_a_seed(digits):
    x, y, _, _ = digits
    a, b = wrapped_lenet(), wrapped_lenet()
    ha = fit(a, x, y, epochs=2, batch_size=64, gate_lr=0.03, seed=3, progress=False)
    hb = fit(b, x, y, epochs=2, batch_size=64, gate_lr=0.03, seed=3, progress=False)
    assert [e.loss for e in ha.epochs] == [e.loss for e in hb.epochs]
    assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))


def test_resume_from_checkpoint_equals_uninterrupted_training(tmp_path, digits):
    x, y, _, _ = digits
    straight = wrapped_lenet()
    fit(straight, x, y, epochs=3, batch_size=64, gate_lr=0.03, seed=1, progress=False)
    ckpt = tmp_path / "c.pt"
    first = wrapped_lenet()
    fit(first, x, y, epochs=2, batch_size=64, gate_lr=0.03, seed=1, checkpoint=ckpt, progress=False)
    resumed = wrapped_lenet()
    history = fit(resumed, x, y, epochs=3, batch_size=64, gate_lr=0.03, seed=1, checkpoint=ckpt, progress=False)
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    for p, q in zip(params(straight), params(resumed)):
        torch.testing.assert_close(p, q)


def _conv_bn_net(method: str, **gate_kwargs) -> bayes.BayesianModel:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10),
    )
    return bayes.wrap(net, (torch.zeros(1, 1, 28, 28),), method=method, **gate_kwargs)


class _Interrupted(Exception):
    pass


def _stop_after(batches: int):
    """An identity augmentation that interrupts training at batch ``batches`` (as a killed run stops)."""
    seen = []

    def augment(xb, generator):
        seen.append(1)
        if len(seen) > batches:
            raise _Interrupted
        return xb

    return augment


@pytest.mark.parametrize("method, gate_kwargs", [("rbp", {}), ("turbo-vbi", {"update_every": 3})])
@pytest.mark.filterwarnings("ignore:RBP. 2 of 2 gates:RuntimeWarning")
def test_resume_restores_every_gates_state_from_a_weights_only_checkpoint(tmp_path, digits, method, gate_kwargs):
    """RBP's schedule state and Turbo-VBI's buffers and step count come back through torch.load(weights_only=True):
    a run interrupted in its third epoch and resumed ends where an uninterrupted one does."""
    x, y, _, _ = digits
    opts = dict(epochs=3, batch_size=64, gate_lr=0.03, seed=1, progress=False, compile_step=False)
    straight = _conv_bn_net(method, **gate_kwargs)
    fit(straight, x, y, augment=_stop_after(10**6), **opts)
    ckpt = tmp_path / "c.pt"
    with pytest.raises(_Interrupted):
        fit(_conv_bn_net(method, **gate_kwargs), x, y, checkpoint=ckpt, augment=_stop_after(2 * 8 + 3), **opts)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed = _conv_bn_net(method, **gate_kwargs)
    history = fit(resumed, x, y, checkpoint=ckpt, augment=_stop_after(10**6), **opts)
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():  # Turbo-VBI's extra state is a dict of numbers
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected[key], msg=key)
        else:
            assert value == expected[key] and value, key


class _PlantedPayload:
    """Unpickling this with a full unpickler would create ``marker``: what a planted checkpoint could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_nothing_in_it_runs(tmp_path, digits):
    from onnxprune.errors import InputError

    x, y, _, _ = digits
    ckpt, marker = tmp_path / "planted.pt", tmp_path / "marker"
    torch.save({"model": _PlantedPayload(str(marker)), "optimizer": {}, "epoch": 1, "history": [], "rng": None}, ckpt)
    with pytest.raises(InputError, match=r"planted\.pt: refused to load this training checkpoint"):
        fit(wrapped_lenet(), x, y, epochs=1, batch_size=64, progress=False, checkpoint=ckpt)
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_an_input_error_naming_it(tmp_path, digits):
    from onnxprune.errors import InputError

    x, y, _, _ = digits
    ckpt = tmp_path / "junk.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pt: not a readable training checkpoint"):
        fit(wrapped_lenet(), x, y, epochs=1, batch_size=64, progress=False, checkpoint=ckpt)
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(InputError, match=r"junk\.pt: not a training checkpoint written by fit"):
        fit(wrapped_lenet(), x, y, epochs=1, batch_size=64, progress=False, checkpoint=ckpt)


@pytest.mark.slow  # torch.compile of the gates' float64 numerics: about 4 min on 2 CPU cores
def test_compiled_step_trains_like_the_eager_step(digits):
    x, y, xt, yt = digits
    eager, compiled = wrapped_lenet(), wrapped_lenet()
    he = fit(eager, x, y, epochs=3, batch_size=64, gate_lr=0.03, seed=2, progress=False)
    hc = fit(compiled, x, y, epochs=3, batch_size=64, gate_lr=0.03, seed=2, progress=False, compile_step=True, compile_gates=True)
    # the compiled graph draws its own random numbers: the same training, not the same samples
    for a, b in zip(he.epochs, hc.epochs):
        assert b.loss == pytest.approx(a.loss, rel=0.05)
    assert evaluate(compiled, xt, yt) == pytest.approx(evaluate(eager, xt, yt), abs=0.05)


def test_kl_scale_weighs_the_kl_term_and_must_be_positive(digits):
    x, y, _, _ = digits
    plain = fit(wrapped_lenet(), x, y, epochs=1, batch_size=64, gate_lr=0.03, seed=4, progress=False)
    tempered = fit(wrapped_lenet(), x, y, epochs=1, batch_size=64, gate_lr=0.03, seed=4, progress=False, kl_scale=4.0)
    assert tempered.epochs[0].loss > plain.epochs[0].loss
    with pytest.raises(ValueError, match="kl_scale"):
        fit(wrapped_lenet(), x, y, epochs=1, batch_size=64, progress=False, kl_scale=0.0)


def _noisy_conv_bn_net() -> bayes.BayesianModel:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10),
    )
    model = bayes.wrap(net, (torch.zeros(1, 1, 28, 28),))
    with torch.no_grad():  # wide posteriors: noise of the order of the signal, channels still kept
        for gate in model.gates.values():
            gate.log_sigma.fill_(-0.5)
            gate.mu.fill_(-0.5)
    return model


def test_recalibrated_norms_hold_the_statistics_of_the_deterministic_network(digits):
    x = digits[0][:512]
    model = _noisy_conv_bn_net()
    model.train()
    with torch.no_grad():  # statistics as training leaves them: gathered under the gates' noise
        for i in range(0, 512, 128):
            model(torch.as_tensor(x[i : i + 128]).float())
    second_bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][1]
    noisy_var = second_bn.running_var.clone()
    inputs = []
    handle = second_bn.register_forward_hook(lambda m, inp, out: inputs.append(inp[0].detach()))
    assert recalibrate_norms(model, x, batch_size=128) == 2
    handle.remove()
    assert model.training and second_bn.momentum == 0.1  # the mode and momentum it had
    seen = torch.cat(inputs)
    torch.testing.assert_close(second_bn.running_mean, seen.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert (second_bn.running_var < noisy_var).all()  # the deterministic gates add no variance


def test_recalibration_is_a_no_op_without_batchnorm(digits):
    assert recalibrate_norms(wrapped_lenet(), digits[0][:64]) == 0


def test_step_linear_schedule_is_constant_then_decays_linearly_to_zero():
    from onnxprune.bayes.training import lr_factor

    assert [lr_factor("step-linear", p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor("step-linear", 0.9, decay_start=0.8) == pytest.approx(0.5)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("constant", 0.9) == 1.0


def test_fit_refuses_an_unknown_schedule(digits):
    x, y, _, _ = digits
    with pytest.raises(ValueError, match="lr_schedule"):
        fit(wrapped_lenet(), x, y, epochs=1, lr_schedule="exponential", progress=False)


def test_fit_trains_a_plain_model_on_cross_entropy(digits):
    x, y, xt, yt = digits
    torch.manual_seed(0)
    model = models.build("lenet5")
    fit(model, x, y, epochs=3, batch_size=64, progress=False)
    assert evaluate(model, xt, yt) > 0.8


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import models
from onnxprune import bayes
from onnxprune.bayes.training import fit
from onnxprune.data import load_dataset
x, y = load_dataset("digits", split="train")
torch.manual_seed(0)
w = bayes.wrap(models.build("lenet5"), (torch.zeros(1, 1, 28, 28),))
h = fit(w, x[:512], y[:512], epochs=2, batch_size=32, gate_lr=0.03, seed=0, progress=False)
flat = torch.cat([p.detach().flatten() for p in w.state_dict().values()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
assert all(torch.equal(gathered[0], g) for g in gathered), "ranks diverged"
if dist.get_rank() == 0:
    print("OK", dist.get_world_size(), h.epochs[-1].loss)
dist.barrier()  # no rank tears gloo down while another still talks to it
dist.destroy_process_group()
# Gloo's worker threads can still hold tensors at interpreter finalisation, which then aborts
# ("terminate called without an active exception", pytorch/pytorch#179291): skip finalisation.
sys.stdout.flush()
os._exit(0)
"""


def test_fit_runs_under_torchrun_with_gloo_and_two_processes(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 2" in result.stdout


def test_train_command_runs_under_torchrun_and_rank_0_alone_writes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "onnxprune",
         "train", "--epochs", "3", "--pretrain-epochs", "1", "-o", str(out), "-q", "--target", "none"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # one report, from rank 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["agreement_with_wrapped"] >= 0.999


def test_train_command_runs_the_whole_pipeline_and_pruned_predictions_match(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "25", "--pretrain-epochs", "6", "-o", str(out), "-q", "--target", "none"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "test error" in stdout and "ORT CPU latency" in stdout
    for name in ("dense.onnx", "gated.onnx", "pruned.onnx", "report.json", "channels.png"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["agreement_with_wrapped"] >= 0.999
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert not any(p.name.startswith(".stage-") for p in out.iterdir())


def test_train_command_with_the_authors_gate_placement_and_noise_prunes_and_deploys_int8(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "12", "--pretrain-epochs", "4", "--placement", "pre-bias", "--noise", "batch",
                 "-o", str(out), "-q", "--target", "none", "--deploy", "int8"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["agreement_with_wrapped"] >= 0.999
    deployed = out / "deploy-int8"
    assert {"model.onnx", "model.ort", "required_operators.config", "deploy.json"} <= {p.name for p in deployed.iterdir()}
    assert report["deploy"]["settings"]["precision"] == "int8" and report["deploy"]["data"]["source"] == "digits"
    assert "pruned.onnx deployed (int8" in capsys.readouterr().out


def test_train_command_with_mac_weighted_kl_and_fine_tuning_prunes_the_fine_tuned_net(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "27", "--pretrain-epochs", "6", "--kl-weighting", "macs", "--kl-scale", "5",
                 "--finetune-epochs", "2", "-o", str(out), "-q", "--target", "none"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["kl_weighting"] == "macs" and report["config"]["finetune_epochs"] == 2
    assert "finetune_s" in report["timings_s"]
    assert report["pruned"]["macs"] < report["dense"]["macs"]
    assert report["pruned"]["agreement_with_wrapped"] >= 0.999  # the fine-tuned net, its rejected channels deleted


@pytest.mark.parametrize("name", ["lenet300", "lenet500", "lenet5"])
def test_trained_models_prune_to_the_same_predictions(name, digits):
    """The bar: the pruned ONNX model predicts what the wrapped model predicts in eval mode (>= 99.9 %)."""
    from onnxprune.api import prune_model
    from onnxprune.bayes.exporting import export
    from onnxprune.bayes.training import predict
    from onnxprune.pipeline import onnx_predictions

    x, y, xt, yt = digits
    torch.manual_seed(0)
    dense = models.build(name)
    fit(dense, x, y, epochs=3, batch_size=64, progress=False)
    wrapped = bayes.wrap(dense, (torch.zeros(1, 1, 28, 28),))
    fit(wrapped, x, y, epochs=15, batch_size=64, gate_lr=0.1, progress=False)
    assert wrapped.kept_fraction() < 1.0, "training rejected no channel"
    pruned = prune_model(export(wrapped, (torch.zeros(1, 1, 28, 28),)), target="none").model
    import onnx

    path = Path(os.environ["ONNXPRUNE_CACHE_DIR"]) / f"{name}-pruned.onnx"
    onnx.save(pruned, path)
    agreement = float((onnx_predictions(path, xt) == predict(wrapped, xt)).mean())
    assert agreement >= 0.999


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--data", "imagenet"], "unknown dataset 'imagenet'"),
        (["--data", "mnist", "--data-dir", "/nonexistent/folder"], "does not exist"),
        (["--model", "vgg_cifar"], "takes inputs (3, 32, 32) but dataset 'digits' has (1, 28, 28)"),
        (["--epochs", "5", "--finetune-epochs", "5"], "--finetune-epochs must be at least 0 and below the 5 epochs"),
        (["--train-limit", "0"], "--train-limit must be a positive number of images"),
    ],
)
def test_bad_train_arguments_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = main(["train", *args, "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_checkpoint_that_does_not_fit_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save(models.build("lenet300").state_dict(), bad)
    code = main(["train", "--pretrained", str(bad), "-o", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err
    assert not (tmp_path / "run" / "pruned.onnx").exists()


def test_predict_runs_in_ieee_float32_and_restores_the_precision_settings():
    """Predictions compared with ONNX Runtime's float32 must not use TF32 (PyTorch's default for cuDNN convolutions):
    inside predict both settings read "ieee", and the caller's settings come back afterwards."""
    import torch
    from torch import nn

    from onnxprune.bayes.training import predict

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return x.flatten(1)[:, :3]

    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    pred = predict(Probe(), np.eye(3, dtype=np.float32).reshape(3, 1, 1, 3), batch_size=2)
    assert pred.tolist() == [0, 1, 2]
    assert seen == [("ieee", "ieee")] * 2
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
