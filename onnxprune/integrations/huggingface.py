"""Bayesian channel pruning with the Hugging Face ``Trainer``: a callback and an ELBO loss.

    wrapped = bayes.wrap(model, example_inputs, method="sbp")
    args = TrainingArguments("out", remove_unused_columns=False, label_names=["labels"])
    trainer = Trainer(model=wrapped, args=args, train_dataset=train, data_collator=collate,
                      compute_loss_func=elbo_loss(wrapped, n_train=len(train)),
                      callbacks=[BayesianPruningCallback(wrapped)])
    trainer.train(); onnxprune.compress(wrapped, example_inputs, "pruned.onnx")

:func:`elbo_loss` adds the gates' KL over the training set size to the task loss (cross-entropy on the
logits by default). :class:`BayesianPruningCallback` runs the gates' hooks (``begin_epoch`` at each
epoch, ``before_step`` before and ``after_step`` + ``clip_`` after each optimizer step) and adds
``kept_fraction`` and ``kl`` to the Trainer's logs.

The Trainer calls ``wrapped(**batch)`` with the batch minus ``labels``: the collator's keys are the
original model's ``forward`` argument names (``x`` for ``forward(self, x)``). ``remove_unused_columns``
must be off (a wrapped model's forward takes ``*args, **kwargs``, so the Trainer would drop every key);
``label_names=["labels"]`` lets ``Trainer.evaluate`` compute the loss. Needs
``pip install 'onnxprune[huggingface]'``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from onnxprune.bayes.wrapper import BayesianModel

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # the opt-in extra is not installed
    raise ImportError(
        "onnxprune.integrations.huggingface needs transformers and accelerate: pip install 'onnxprune[huggingface]'"
    ) from error

__all__ = ["BayesianPruningCallback", "elbo_loss"]

logger = logging.getLogger(__name__)

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossFunc = Callable[..., torch.Tensor]


def _expect_wrapped(wrapped: Any, who: str) -> BayesianModel:
    """``wrapped``, checked to be a BayesianModel, told whether it takes the Trainer's loss kwargs.

    The Trainer passes ``num_items_in_batch`` to a model whose forward has ``**kwargs`` unless the
    model's ``accepts_loss_kwargs`` says otherwise: a wrapped model takes what the original took.
    """
    if not isinstance(wrapped, BayesianModel):
        raise TypeError(f"{who} needs the model bayes.wrap returned, got {type(wrapped).__name__}")
    parameters = inspect.signature(wrapped.model.forward).parameters.values()
    wrapped.accepts_loss_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return wrapped


def _logits(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: a tensor, a mapping (ModelOutput) with "logits", or a tuple's first."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    raise TypeError(f"elbo_loss: cannot find logits in outputs of type {type(outputs).__name__}")


def elbo_loss(wrapped: BayesianModel, n_train: int, task_loss: TaskLoss | None = None) -> LossFunc:
    """A ``compute_loss_func`` for ``Trainer``: ``task_loss(logits, labels) + wrapped.kl() / n_train``.

    ``task_loss`` is a mean over the batch (default: ``F.cross_entropy``, labels -100 ignored). When the
    Trainer passes ``num_items_in_batch`` (the labels of the whole accumulated, all-device batch), the
    loss is weighted by this batch's share of them, so gradient accumulation and several devices sum to
    the mean task loss plus one KL term per optimizer step.
    """
    _expect_wrapped(wrapped, "elbo_loss")
    if n_train < 1:
        raise ValueError(f"elbo_loss: n_train is the training set size, got {n_train}")
    task = task_loss or F.cross_entropy

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("elbo_loss: the batch has no 'labels' (the collator must add them)")
        value = task(_logits(outputs), labels) + wrapped.kl() / n_train
        if num_items_in_batch is None:
            return value
        return value * (labels.ne(-100).sum() / num_items_in_batch)

    return loss


class BayesianPruningCallback(TrainerCallback):
    """Runs ``wrapped``'s gate hooks as the Trainer trains it and logs the share of channels kept."""

    def __init__(self, wrapped: BayesianModel) -> None:
        self.wrapped = _expect_wrapped(wrapped, "BayesianPruningCallback")

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None and not any(m is self.wrapped for m in model.modules()):
            raise ValueError("BayesianPruningCallback: Trainer(model=...) must be (or contain) the wrapped model it was given")
        if args.remove_unused_columns:
            raise ValueError("BayesianPruningCallback: pass TrainingArguments(remove_unused_columns=False); a wrapped "
                             "model's forward takes *args, **kwargs, so the Trainer would drop every input of the batch")

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        epoch = int((state.epoch or 0.0) + 1e-6)  # whole at an epoch's start, fractional after a mid-epoch resume
        self.wrapped.begin_epoch(epoch, max(int(state.num_train_epochs), epoch + 1))

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        self.wrapped.before_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.wrapped.after_step()
        self.wrapped.clip_()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logger.info("epoch %.2f: %.1f%% of gated channels kept", state.epoch or 0.0, 100 * self.wrapped.kept_fraction())

    @torch.no_grad()
    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None,
               **kwargs: Any) -> None:
        """Add ``kept_fraction`` and ``kl`` to the logs (and to the entry ``Trainer.log`` just put in
        ``state.log_history``); report callbacks listed before this one do not see them."""
        extra = {"kept_fraction": round(self.wrapped.kept_fraction(), 6), "kl": float(self.wrapped.kl())}
        if logs is not None:
            logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
