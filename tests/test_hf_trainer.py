"""Bayesian pruning in other people's loops: the Hugging Face Trainer adapter and ``bayes.step_hooks``."""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
import onnxprune
from onnxprune import bayes
from onnxprune.bayes.wrapper import BayesianModel
from onnxprune.data import load_dataset
from onnxprune.runtime import make_session
from tests.vision import import_transformers

N_TRAIN = 512
EPOCHS = 2
BATCH = 64
HOOKS = ("begin_epoch", "before_step", "after_step", "clip_")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def transformers():
    return import_transformers()


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_dataset("digits", split="train")
    return torch.from_numpy(x[:N_TRAIN]), torch.from_numpy(y[:N_TRAIN])


@pytest.fixture(scope="module")
def _wrapped_once(digits) -> BayesianModel:
    torch.manual_seed(0)
    return bayes.wrap(models.build("lenet5"), (digits[0][:1],), method="sbp")


@pytest.fixture
def wrapped(_wrapped_once) -> BayesianModel:
    """A fresh copy of LeNet5 wrapped with SBP gates (wrapping once per module: it exports the model)."""
    return copy.deepcopy(_wrapped_once)


def record_hooks(wrapped: BayesianModel, monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every call of ``wrapped``'s gate hooks from now on, in order: ``(name, *args)``."""
    calls: list[tuple] = []

    def recording(name: str, original: Callable) -> Callable:
        def hook(*args):
            calls.append((name, *args))
            return original(*args)
        return hook

    for name in HOOKS:
        monkeypatch.setattr(wrapped, name, recording(name, getattr(wrapped, name)))
    return calls


def assert_pruned_model_matches(wrapped: BayesianModel, x: torch.Tensor, path) -> None:
    """``compress`` writes a model ONNX Runtime runs, computing what ``wrapped`` computes in eval mode."""
    onnxprune.compress(wrapped, (x[:1],), path, target="none")
    session = make_session(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x[:16].numpy()})
    with torch.no_grad():
        expected = wrapped.eval()(x[:16]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def make_trainer(transformers, wrapped: BayesianModel, x: torch.Tensor, y: torch.Tensor, tmp_path, **overrides):
    from onnxprune.integrations.huggingface import BayesianPruningCallback, elbo_loss

    options = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=BATCH,
                   num_train_epochs=EPOCHS, learning_rate=3e-3, save_strategy="no", logging_steps=2,
                   remove_unused_columns=False, label_names=["labels"], disable_tqdm=True, seed=0)
    options.update(overrides)
    train = [{"x": xi, "labels": yi} for xi, yi in zip(x, y)]  # "x": lenet5's forward argument
    return transformers.Trainer(model=wrapped, args=transformers.TrainingArguments(**options), train_dataset=train,
                                data_collator=transformers.default_data_collator,
                                compute_loss_func=elbo_loss(wrapped, n_train=len(train)),
                                callbacks=[BayesianPruningCallback(wrapped)])


def test_the_trainer_trains_the_gates_runs_their_hooks_and_logs_the_kept_fraction(transformers, digits, wrapped, tmp_path,
                                                                                  monkeypatch):
    x, y = digits
    kl_before = float(wrapped.kl().detach())
    trainer = make_trainer(transformers, wrapped, x, y, tmp_path)
    calls = record_hooks(wrapped, monkeypatch)
    trainer.train()

    steps = trainer.state.global_step
    assert steps == EPOCHS * (N_TRAIN // BATCH)
    assert [c for c in calls if c[0] == "begin_epoch"] == [("begin_epoch", e, EPOCHS) for e in range(EPOCHS)]
    assert [c[0] for c in calls if c[0] != "begin_epoch"] == ["before_step", "after_step", "clip_"] * steps
    assert float(wrapped.kl().detach()) < kl_before
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(0.0 < entry["kept_fraction"] <= 1.0 and "kl" in entry for entry in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert_pruned_model_matches(wrapped, x, tmp_path / "pruned.onnx")


def test_elbo_loss_reads_logits_from_any_output_and_scales_by_the_batch_share(transformers, wrapped):
    from transformers.modeling_outputs import SequenceClassifierOutput

    from onnxprune.integrations.huggingface import elbo_loss

    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = elbo_loss(wrapped, n_train=100)
    expected = F.cross_entropy(logits, labels) + wrapped.kl() / 100
    for outputs in (logits, {"logits": logits}, SequenceClassifierOutput(logits=logits), (logits,)):
        torch.testing.assert_close(loss(outputs, labels), expected)
    # a quarter of an accumulated batch of 32 labels: a quarter of the loss
    torch.testing.assert_close(loss(logits, labels, num_items_in_batch=torch.tensor(32)), expected / 4)
    mse = elbo_loss(wrapped, n_train=100, task_loss=lambda out, target: (out.sum(1) - target).pow(2).mean())
    torch.testing.assert_close(mse(logits, labels.float()), (logits.sum(1) - labels).pow(2).mean() + wrapped.kl() / 100)


def test_the_callback_refuses_a_trainer_that_would_drop_the_inputs(transformers, digits, wrapped, tmp_path):
    from onnxprune.integrations.huggingface import BayesianPruningCallback

    x, y = digits
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        make_trainer(transformers, wrapped, x[:64], y[:64], tmp_path, remove_unused_columns=True)
    with pytest.raises(TypeError, match="bayes.wrap"):
        BayesianPruningCallback(models.build("lenet5"))


def test_a_missing_transformers_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "onnxprune.integrations.huggingface", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'onnxprune\[huggingface\]'"):
        importlib.import_module("onnxprune.integrations.huggingface")


def test_step_hooks_run_the_gate_hooks_once_per_optimizer_step(digits, wrapped, monkeypatch):
    x, y = digits
    calls = record_hooks(wrapped, monkeypatch)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    hooks = bayes.step_hooks(wrapped, optimizer, epochs=2, steps_per_epoch=3)
    assert calls == [("begin_epoch", 0, 2)]
    for step in range(6):
        batch = slice(16 * step, 16 * (step + 1))
        loss = F.cross_entropy(wrapped(x[batch]), y[batch]) + wrapped.kl() / len(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_step = [("before_step",), ("after_step",), ("clip_",)]
    assert calls == [("begin_epoch", 0, 2), *per_step * 3, ("begin_epoch", 1, 2), *per_step * 3]
    assert hooks.steps == 6
    hooks.remove()
    optimizer.step()
    assert len(calls) == 1 + 6 * 3 + 1


def test_step_hooks_want_both_epochs_and_steps_per_epoch_or_neither(wrapped):
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="both"):
        bayes.step_hooks(wrapped, optimizer, epochs=3)
    with bayes.step_hooks(wrapped, optimizer) as hooks:  # no schedule: no begin_epoch
        optimizer.step()
    optimizer.step()
    assert hooks.steps == 1
