"""Training with the negative ELBO: ``elbo`` and ``fit`` (one process, or several under torchrun).

``fit`` trains a wrapped model (loss: the negative ELBO) or a plain one (loss:
cross-entropy, for dense pre-training, or the caller's ``loss_fn``), with optimizer
groups (gate parameters may take their own learning rate), a linear warm-up of the
KL weight, a progress bar, checkpoints after every epoch and resume, and a fixed
seed. Its data are arrays (x, y) or any iterable of ``(inputs, targets)`` batches
(a DataLoader), each behind a batch source (:class:`ArrayBatches`,
:class:`IterableBatches`). Under ``torchrun`` it trains with
DistributedDataParallel (gloo on CPU, NCCL on GPU): each rank sees its own slice of
every epoch (arrays: of the epoch's permutation; a DataLoader: through a
DistributedSampler). Its options are :class:`~onnxprune.bayes.fit_config.FitConfig`'s
fields; each epoch's summary line goes to this module's logger (INFO).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from onnxprune.bayes.batches import BatchSource, batch_length, batch_source, training_set_size
from onnxprune.bayes.checkpoint import load_training_state, save_training_state
from onnxprune.bayes.evaluation import (
    call_model,
    evaluate,
    evaluate_batches,
    ieee_float32,
    is_classification,
    predict,
    recalibrate_norms,
)
from onnxprune.bayes.fit_config import FitConfig
from onnxprune.bayes.schedule import LR_SCHEDULES, kl_warmup_factor, lr_factor, reach_warning, step_lr_factor
from onnxprune.bayes.wrapper import BayesianModel
from onnxprune.errors import InputError

if TYPE_CHECKING:
    pass

__all__ = [
    "elbo", "fit", "FitConfig", "EpochStats", "History", "finish_distributed",
    # kept importable from here for existing callers
    "evaluate", "predict", "recalibrate_norms", "ieee_float32", "LR_SCHEDULES", "lr_factor", "step_lr_factor",
    "reach_warning",
]

logger = logging.getLogger(__name__)

LossFunction = Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Any]]  # (inputs, targets, kl_weight) -> (loss, outputs)


def elbo(logits: torch.Tensor, targets: torch.Tensor, model: BayesianModel, n_train: int, kl_weight: float = 1.0) -> torch.Tensor:
    """Negative ELBO: ``n_train * mean cross-entropy + kl_weight * sum of the gates' KL``."""
    return n_train * F.cross_entropy(logits, targets) + kl_weight * model.kl()


@dataclass
class EpochStats:
    """One epoch's summary: mean loss and accuracy over the training batches (None: the outputs are not class
    logits for integer labels), the KL weight at its last step, the share of channels kept, its duration, and the
    test accuracy when evaluated."""

    epoch: int
    loss: float
    accuracy: float | None
    kl_weight: float
    kept_fraction: float
    seconds: float
    eval_accuracy: float | None = None


@dataclass
class History:
    """The epochs ``fit`` trained, resumed ones included."""

    epochs: list[EpochStats] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [asdict(e) for e in self.epochs]


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finish_distributed() -> int:
    """Under torchrun: wait for every rank, then leave the process group. Returns this process's rank
    (0 when not distributed), so that rank 0 alone can go on to export and write."""
    if not dist.is_initialized():
        return 0
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank


def _compile_by_default(device: torch.device) -> bool:
    """Compile on CUDA when Triton (torch.compile's GPU code generator) is installed."""
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


# -- setting up ------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: FitConfig, device: torch.device) -> torch.optim.Adam:
    """Adam over the weights (``lr``) and, for a wrapped model, the gates (``gate_lr``, no weight decay)."""
    bayesian = isinstance(model, BayesianModel)
    groups = [{"params": list(model.weight_parameters()) if bayesian else list(model.parameters()), "lr": cfg.lr}]
    gate_params = list(model.gate_parameters()) if bayesian else []
    if gate_params:  # Turbo-VBI's gates hold no trainable parameters
        groups.append({"params": gate_params, "lr": cfg.gate_learning_rate, "weight_decay": 0.0})
    # fused: one kernel for every parameter's update on CUDA (a small net's step is launch-bound there)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, fused=device.type == "cuda")


def _resume(checkpoint: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device) -> tuple[int, History]:
    """(the first epoch to train, the history so far): from ``checkpoint`` when it exists, else from scratch."""
    if checkpoint is None or not checkpoint.exists():
        return 0, History()
    epoch, rows = load_training_state(checkpoint, model, optimizer, device)
    return epoch, History([EpochStats(**row) for row in rows])


def _parallel(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``model`` itself, or wrapped in DistributedDataParallel when there are several ranks."""
    if world <= 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Gates on a schedule (RBP's dormant and frozen stages) leave some parameters without gradient.
    unused = isinstance(model, BayesianModel) and model.leaves_parameters_unused()
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def _checked_loss(loss: Any) -> torch.Tensor:
    """``loss`` when it is one number (a 0-dim tensor); an InputError otherwise."""
    if isinstance(loss, torch.Tensor) and loss.dim() == 0:
        return loss
    what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
    raise InputError(f"loss_fn returned {what}: it must return one number (a 0-dim tensor); reduce it over the batch, "
                     f"e.g. with .mean()")


def _loss_function(train_model: nn.Module, model: nn.Module, cfg: FitConfig, device: torch.device,
                   n_train: int | None) -> LossFunction:
    """``(inputs, targets, kl_weight) -> (loss, outputs)``: for a wrapped model the negative ELBO over ``n_train``,
    ``(N * loss_fn + kl_weight * KL) / N``, else ``loss_fn`` (default: cross-entropy)."""
    bayesian = isinstance(model, BayesianModel)
    autocast = cfg.amp and device.type == "cuda"
    data_loss = cfg.loss_fn or F.cross_entropy

    def forward_loss(inputs: Any, targets: Any, kl_w: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = call_model(train_model, inputs)
        if isinstance(outputs, torch.Tensor) and outputs.is_floating_point():
            outputs = outputs.float()
        loss = _checked_loss(data_loss(outputs, targets))
        if bayesian:  # the same operations as elbo(...) / n_train
            return (n_train * loss + kl_w * model.kl()) / n_train, outputs
        return loss, outputs

    return forward_loss


def _compiled(forward_loss: LossFunction, model: nn.Module) -> LossFunction:
    """``forward_loss`` compiled into one graph (its backward too)."""
    # (other code that changes with the schedule still gets its own graph: allow several)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if isinstance(model, BayesianModel):  # RBP's gates then read their stage as data: one graph for all stages
        model.read_states_as_data(True)
    return torch.compile(forward_loss, dynamic=False)


# -- one epoch ---------------------------------------------------------------------


@dataclass
class _TrainingRun:
    """The parts of one ``fit`` call that every epoch uses."""

    cfg: FitConfig
    model: nn.Module  # the model being trained (not the DDP wrapper)
    train_model: nn.Module  # the module the forward pass runs (DDP under torchrun)
    optimizer: torch.optim.Optimizer
    source: BatchSource
    forward_loss: LossFunction
    kl_weight: torch.Tensor  # on the device: a compiled step reads it as data
    device: torch.device
    rank: int
    world: int

    @property
    def bayesian(self) -> bool:
        return isinstance(self.model, BayesianModel)

    @property
    def steps_per_epoch(self) -> int | None:
        steps = self.source.steps
        return None if steps is None else max(1, steps)


@dataclass
class _Sums:
    """An epoch's running sums; the tensors stay on the device (reading them every step would wait for the GPU)."""

    loss: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    scored: int = 0  # examples of batches with class labels (the accuracy's)

    @classmethod
    def zeros(cls, device: torch.device) -> _Sums:
        return cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def add(self, loss: torch.Tensor, outputs: Any, targets: Any) -> None:
        n = batch_length(targets) or batch_length(outputs) or 1
        if is_classification(outputs, targets):
            self.correct += (outputs.argmax(1) == targets).sum()
            self.scored += n
        self.seen += n
        self.loss += loss.detach().double() * n

    def reduced(self, world: int) -> tuple[float, float | None]:
        """(mean loss, accuracy or None), over every rank."""
        device = self.loss.device
        counts = torch.tensor([float(self.seen), float(self.scored)], dtype=torch.float64, device=device)
        stats = torch.cat([torch.stack([self.loss, self.correct.double()]), counts])
        if world > 1:
            dist.all_reduce(stats)
        return float(stats[0] / stats[2]), (float(stats[1] / stats[3]) if stats[3] > 0 else None)


def _apply_schedule(run: _TrainingRun, epoch: int, step: int, span: tuple[int, int] | None) -> float:
    """Set the learning rates and the KL weight for ``step`` of ``epoch``; returns the KL warm-up factor."""
    cfg = run.cfg
    if cfg.lr_schedule != "constant":  # gates trained stage by stage (span): once within each stage
        factor = step_lr_factor(cfg.lr_schedule, epoch, step, run.steps_per_epoch, cfg.epochs, span, cfg.decay_start)
        for group, base_lr in zip(run.optimizer.param_groups, [cfg.lr, cfg.gate_learning_rate]):
            group["lr"] = base_lr * factor
    if not (run.bayesian and cfg.kl_warmup_epochs > 0):
        return 1.0
    kl_w = kl_warmup_factor(epoch * run.steps_per_epoch + step + 1, cfg.kl_warmup_epochs, run.steps_per_epoch)
    run.kl_weight.fill_(kl_w * cfg.kl_scale)
    return kl_w


def _check_schedule(run: _TrainingRun) -> None:
    """A ValueError when the schedules need the number of batches per epoch and the data does not tell it."""
    warmup = run.bayesian and run.cfg.kl_warmup_epochs > 0
    if run.steps_per_epoch is None and (run.cfg.lr_schedule != "constant" or warmup):
        raise ValueError("lr_schedule and kl_warmup_epochs need the number of batches per epoch: give data with a len() "
                         "(e.g. a DataLoader over a Dataset that has one)")


def _train_step(run: _TrainingRun, inputs: Any, targets: Any) -> tuple[torch.Tensor, Any]:
    """One optimizer step on a batch, with the gates' hooks around it; returns (loss, outputs)."""
    loss, outputs = run.forward_loss(inputs, targets, run.kl_weight)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.bayesian:
        run.model.before_step()
    run.optimizer.step()
    if run.bayesian:
        run.model.after_step()
        run.model.clip_()
    return loss, outputs


def _progress_bar(run: _TrainingRun, epoch: int):
    """A tqdm bar for the epoch (rank 0 with ``progress``), else None."""
    if not (run.cfg.progress and run.rank == 0):
        return None
    from tqdm import tqdm

    return tqdm(total=run.steps_per_epoch, desc=f"{run.cfg.desc} {epoch + 1}/{run.cfg.epochs}", leave=False, dynamic_ncols=True)


def _show_progress(run: _TrainingRun, bar, step: int, sums: _Sums) -> None:
    """Advance the bar; every 10th step, show the running loss, accuracy (and share of channels kept)."""
    bar.update(1)
    if step % 10 == 0:
        post = {"loss": f"{float(sums.loss) / sums.seen:.4f}"}
        if sums.scored:
            post["acc"] = f"{int(sums.correct) / sums.scored:.3f}"
        if run.bayesian:
            post["kept"] = f"{run.model.kept_fraction():.2f}"
        bar.set_postfix(post)


def _train_epoch(run: _TrainingRun, epoch: int) -> EpochStats:
    """Train one epoch; its statistics, summed over the ranks (without the test accuracy)."""
    run.source.set_epoch(epoch)
    run.train_model.train()
    span = None
    if run.bayesian:
        run.model.begin_epoch(epoch, run.cfg.epochs)
        span = run.model.stage_span(epoch, run.cfg.epochs) if run.cfg.restart_per_stage else None
    t0 = time.perf_counter()
    bar = _progress_bar(run, epoch)
    sums = _Sums.zeros(run.device)
    kl_w = 1.0
    for step, (inputs, targets) in enumerate(run.source):
        kl_w = _apply_schedule(run, epoch, step, span)
        loss, outputs = _train_step(run, inputs, targets)
        sums.add(loss, outputs, targets)
        if bar is not None:
            _show_progress(run, bar, step, sums)
    if bar is not None:
        bar.close()
    loss, accuracy = sums.reduced(run.world)
    kept = run.model.kept_fraction() if run.bayesian else 1.0
    return EpochStats(epoch + 1, loss, accuracy, kl_w, kept, time.perf_counter() - t0)


def epoch_line(desc: str, epochs: int, record: EpochStats, bayesian: bool) -> str:
    """The epoch's summary: ``"sbp 3/20: loss 0.1234, train acc 0.9876, test acc 0.9812, channels kept 41.0% (2.5 s)"``
    (no accuracy where there is none: outputs that are not class logits)."""
    line = f"{desc} {record.epoch}/{epochs}: loss {record.loss:.4f}"
    if record.accuracy is not None:
        line += f", train acc {record.accuracy:.4f}"
    if record.eval_accuracy is not None:
        line += f", test acc {record.eval_accuracy:.4f}"
    if bayesian:
        line += f", channels kept {record.kept_fraction:.1%}"
    return line + f" ({record.seconds:.1f} s)"


def _eval_accuracy(model: nn.Module, eval_data: Any, device: torch.device) -> float | None:
    """Test accuracy on ``eval_data``: (x, y) arrays, or batches of (inputs, targets) (None: not classification)."""
    arrays = isinstance(eval_data, (tuple, list)) and len(eval_data) == 2
    if arrays and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in eval_data):
        return evaluate(model, *eval_data, device=device)
    return evaluate_batches(model, eval_data, device=device)


# -- fit ---------------------------------------------------------------------------


def _warn_if_too_short(model: BayesianModel, cfg: FitConfig, steps_per_epoch: int) -> None:
    """A RuntimeWarning when some gate trains for too few steps to reject any channel (:func:`reach_warning`)."""
    short = reach_warning(model, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, gate_lr=cfg.gate_learning_rate,
                          lr_schedule=cfg.lr_schedule, decay_start=cfg.decay_start, restart_per_stage=cfg.restart_per_stage)
    if short:
        warnings.warn(short, RuntimeWarning, stacklevel=3)  # at fit's caller


def _start(model: nn.Module, data: Any, y: Any, cfg: FitConfig) -> tuple[_TrainingRun, int, History]:
    """Check the data, seed, place the model, build the optimizer, resume from the checkpoint, and make the loss:
    (the run, the first epoch to train, the history so far)."""
    device = torch.device(cfg.device)
    rank, world = _distributed(device)
    source = batch_source(data, y, cfg, device, rank, world)
    n_train = training_set_size(data, y, cfg, isinstance(model, BayesianModel))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = model.to(device)
    if isinstance(model, BayesianModel):
        model.compile_gates(_compile_by_default(device) if cfg.compile_gates is None else cfg.compile_gates)
    optimizer = make_optimizer(model, cfg, device)
    start_epoch, history = _resume(cfg.checkpoint_path, model, optimizer, device)
    train_model = _parallel(model, device, world)
    forward_loss = _loss_function(train_model, model, cfg, device, n_train)
    compile_step = (_compile_by_default(device) and world == 1) if cfg.compile_step is None else cfg.compile_step
    if compile_step:
        forward_loss = _compiled(forward_loss, model)
    kl_weight = torch.full((), float(cfg.kl_scale), device=device)
    run = _TrainingRun(cfg, model, train_model, optimizer, source, forward_loss, kl_weight, device, rank, world)
    _check_schedule(run)
    return run, start_epoch, history


def fit(model: nn.Module, data: Any, y: Any = None, config: FitConfig | None = None, **options: Any) -> History:
    """Train ``model`` for ``epochs`` epochs on ``data``; see the module docstring.

    ``data`` is either an array of inputs ``x`` with its labels ``y`` (``fit(model, x, y, epochs=5)``: batches
    of ``batch_size``, shuffled every epoch, ``augment`` on the device) or, without ``y``, any iterable of
    ``(inputs, targets)`` batches, e.g. a ``torch.utils.data.DataLoader``, iterated afresh every epoch: ``inputs``
    a tensor (``model(inputs)``), a tuple (``model(*inputs)``) or a dict (``model(**inputs)``), moved to ``device``
    with the targets. Under torchrun a DataLoader without a DistributedSampler is given one (each rank its share).

    Options (:class:`~onnxprune.bayes.fit_config.FitConfig`'s fields, given by name or as ``config``):
    ``loss_fn(outputs, targets)`` returns the batch's mean loss (default: cross-entropy). A
    :class:`BayesianModel` is trained on the negative ELBO over N, ``loss_fn + kl_weight * KL / N``, with N =
    ``n_train``, else len(x) or len(loader.dataset) (the whole training set across ranks); an iterable with
    neither is a TypeError. Training accuracy is reported only for 2-D logits and 1-D integer labels.
    With ``checkpoint``, the state after every epoch is written there (atomically) and a later call with the
    same path resumes after the last finished epoch (a file holding anything but tensors and plain data is
    refused: :class:`~onnxprune.errors.InputError`). A batch that is not ``(inputs, targets)`` or a loss that
    is not one number is an InputError before any step. ``lr_schedule`` is "constant", "cosine" or
    "step-linear" (constant, then linear decay to zero from ``decay_start``). ``amp``: bfloat16 autocast on
    CUDA. ``compile_gates`` / ``compile_step``: ``torch.compile`` the gates' numerics / the whole forward pass
    and loss (default: on CUDA with Triton; the step in one process only). ``kl_scale`` multiplies the KL term
    (above 1: a tempered ELBO, more sparsity). ``recalibrate``: after the last epoch, a Bayesian model's
    BatchNorm statistics are re-estimated for its deterministic gates (:func:`recalibrate_norms`), over x or
    the iterable's inputs. ``restart_per_stage``: with gates trained stage by stage (recursive RBP), the
    learning-rate schedule restarts within each stage. With ``progress``, rank 0 shows a progress bar and logs
    each epoch's summary line (:func:`epoch_line`) at INFO.
    """
    cfg = FitConfig.from_options(config, options)
    run, start_epoch, history = _start(model, data, y, cfg)
    checkpoint = cfg.checkpoint_path
    if run.bayesian and run.rank == 0 and run.steps_per_epoch is not None:
        _warn_if_too_short(run.model, cfg, run.steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        record = _train_epoch(run, epoch)
        if cfg.eval_data is not None and run.rank == 0:
            record.eval_accuracy = _eval_accuracy(run.model, cfg.eval_data, run.device)
        history.epochs.append(record)
        if run.rank == 0 and cfg.progress:
            logger.info(epoch_line(cfg.desc, cfg.epochs, record, run.bayesian))
        if checkpoint is not None and run.rank == 0:
            save_training_state(checkpoint, run.model, run.optimizer, epoch + 1, history.to_dict(), run.device)
        if run.world > 1:
            dist.barrier()
    if run.bayesian:
        run.model.read_states_as_data(False)
        if cfg.recalibrate:
            run.source.recalibrate(run.model, cfg, run.device)
    return history
