"""What ``fit`` is told to do: :class:`FitConfig`, one field per option."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnxprune.bayes.schedule import LR_SCHEDULES

__all__ = ["FitConfig"]


@dataclass
class FitConfig:
    """The options of :func:`onnxprune.bayes.training.fit` (see its docstring for what each does).

    ``fit(model, x, y, epochs=5, lr=1e-3)`` and ``fit(model, x, y, FitConfig(epochs=5, lr=1e-3))``
    are the same call; options given beside a config replace its fields.
    """

    epochs: int
    batch_size: int = 128  # arrays' batches (and their BatchNorm re-estimation); a DataLoader keeps its own
    lr: float = 1e-3
    gate_lr: float | None = None  # None: lr
    weight_decay: float = 0.0
    kl_warmup_epochs: float = 0.0
    kl_scale: float = 1.0
    seed: int = 0
    device: str | torch.device = "cpu"
    augment: Callable | None = None  # arrays only: augment(x_batch, generator) on the device
    checkpoint: str | os.PathLike[str] | None = None
    eval_data: tuple[np.ndarray, np.ndarray] | Iterable[Any] | None = None  # (x, y) arrays, or batches of (inputs, targets)
    progress: bool = True
    lr_schedule: str = "constant"
    desc: str = "train"
    amp: bool = False
    compile_gates: bool | None = None  # None: on CUDA when Triton is installed
    compile_step: bool | None = None  # None: on CUDA when Triton is installed, one process
    betas: tuple[float, float] = (0.9, 0.999)
    decay_start: float = 0.5
    recalibrate: bool = True
    restart_per_stage: bool = True
    # loss_fn(outputs, targets) -> a 0-dim tensor (the mean over the batch); None: cross-entropy on class labels
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    # N of the ELBO (a Bayesian model's loss is loss_fn + kl_weight * KL / N); None: len(x), or len(loader.dataset)
    n_train: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay_start < 1.0:
            raise ValueError(f"decay_start must be in [0, 1), got {self.decay_start}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not self.kl_scale > 0:
            raise ValueError(f"kl_scale must be positive, got {self.kl_scale}")
        if self.n_train is not None and not self.n_train >= 1:
            raise ValueError(f"n_train must be a positive number of training examples, got {self.n_train}")

    @property
    def gate_learning_rate(self) -> float:
        """The gates' learning rate: ``gate_lr``, or ``lr`` when that is unset."""
        return self.gate_lr or self.lr

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint`` as a Path (None: no checkpoints)."""
        return Path(self.checkpoint) if self.checkpoint else None

    @classmethod
    def from_options(cls, config: FitConfig | None, options: Mapping[str, Any]) -> FitConfig:
        """``config`` with ``options`` (FitConfig's fields by name) replacing its fields, or a new one from
        ``options`` alone; an unknown option or a missing ``epochs`` is a TypeError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [name for name in options if name not in known]
        if unknown:
            raise TypeError(f"fit() got an unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if config is None:
            if "epochs" not in options:
                raise TypeError("fit() needs the option 'epochs' (or a FitConfig)")
            return cls(**options)
        if not isinstance(config, cls):
            raise TypeError(f"fit()'s config must be a FitConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **options)
