"""Where ``fit``'s batches come from: arrays through :class:`~onnxprune.data.ArrayLoader`, or any iterable
of ``(inputs, targets)`` batches (a DataLoader), sharded per rank under torchrun; and N of the ELBO."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from onnxprune.bayes.evaluation import recalibrate_norms, recalibrate_norms_on_batches, split_batch, to_device
from onnxprune.bayes.fit_config import FitConfig
from onnxprune.errors import InputError

if TYPE_CHECKING:
    from onnxprune.data import ArrayLoader

logger = logging.getLogger(__name__)


class BatchSource(Protocol):
    """Where an epoch's batches come from: arrays (:class:`ArrayBatches`) or an iterable (:class:`IterableBatches`)."""

    @property
    def steps(self) -> int | None:
        """Batches per epoch on this rank (None: unknown)."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields."""

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """The epoch's ``(inputs, targets)`` batches, on the device."""

    def recalibrate(self, model: nn.Module, cfg: FitConfig, device: torch.device) -> None:
        """Re-estimate ``model``'s BatchNorm statistics over the training inputs."""


@dataclass
class ArrayBatches:
    """Arrays (x, y) through :class:`~onnxprune.data.ArrayLoader`: shuffled per epoch, sharded by rank, ``augment``."""

    loader: ArrayLoader
    x: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)

    def recalibrate(self, model: nn.Module, cfg: FitConfig, device: torch.device) -> None:
        recalibrate_norms(model, self.x, batch_size=max(cfg.batch_size, 256), device=device)


@dataclass
class IterableBatches:
    """Any iterable of ``(inputs, targets)`` batches (a DataLoader), iterated afresh every epoch, moved to the device."""

    data: Iterable[Any]  # what the epochs iterate: the caller's, or its DataLoader over a DistributedSampler
    given: Iterable[Any]  # the caller's: the BatchNorm re-estimation reads it whole
    device: torch.device

    @property
    def steps(self) -> int | None:
        try:
            return len(self.data)  # type: ignore[arg-type]
        except TypeError:  # no len(), or a DataLoader over an IterableDataset without one
            return None

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.data, DataLoader) and isinstance(self.data.sampler, DistributedSampler):
            self.data.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        empty = True
        for batch in self.data:
            inputs, targets = split_batch(batch)
            empty = False
            yield to_device(inputs, self.device), to_device(targets, self.device)
        if empty:
            raise InputError(f"fit's data (a {type(self.data).__name__}) yielded no batch this epoch: give something it "
                             f"can iterate again every epoch (a DataLoader, a list of batches), not an iterator")

    def recalibrate(self, model: nn.Module, cfg: FitConfig, device: torch.device) -> None:
        if isinstance(self.given, Iterator):  # used up by training: the statistics stay as training left them
            logger.warning("fit: BatchNorm statistics not re-estimated: the data was an iterator, used up by training")
            return
        recalibrate_norms_on_batches(model, (split_batch(batch)[0] for batch in self.given), device=device)


def sharded(data: Iterable[Any], cfg: FitConfig, rank: int, world: int) -> Iterable[Any]:
    """Under torchrun, a DataLoader not sampling with a DistributedSampler rebuilt over this rank's share of its
    dataset (shuffled, seeded with ``cfg.seed``); anything else as it is."""
    if world <= 1 or (isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler)):
        return data
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset) or data.batch_size is None:
        logger.warning("fit: every rank trains on all of this %s; shard it per rank (e.g. a DataLoader with a "
                       "DistributedSampler)", type(data).__name__)
        return data
    sampler = DistributedSampler(data.dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
                      collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last, timeout=data.timeout,
                      worker_init_fn=data.worker_init_fn, multiprocessing_context=data.multiprocessing_context,
                      generator=data.generator, prefetch_factor=data.prefetch_factor, persistent_workers=data.persistent_workers)


def batch_source(data: Any, y: Any, cfg: FitConfig, device: torch.device, rank: int, world: int) -> BatchSource:
    """fit's data as a batch source: arrays x (with y), or an iterable of ``(inputs, targets)`` batches."""
    from onnxprune.data import ArrayLoader

    if y is not None:
        if isinstance(data, DataLoader):
            raise TypeError("fit got a DataLoader and y: its batches hold the targets, leave y out")
        loader = ArrayLoader(data, y, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device, augment=cfg.augment,
                             drop_last=True, rank=rank, world_size=world, class_labels=cfg.loss_fn is None)
        return ArrayBatches(loader, data)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        raise TypeError("fit(model, x, y): the targets y are missing (or give an iterable of (inputs, targets) batches)")
    if not isinstance(data, Iterable):
        raise TypeError(f"fit's data must be arrays x, y or an iterable of (inputs, targets) batches, not {type(data).__name__}")
    if cfg.augment is not None:
        raise ValueError("augment applies to arrays (x, y); augment an iterable's batches in its Dataset or collate_fn")
    if isinstance(data, Iterator) and cfg.epochs > 1:
        raise InputError(f"fit got an iterator ({type(data).__name__}), which its first epoch would use up: give "
                         f"something it can iterate every epoch (a DataLoader, a list of batches)")
    return IterableBatches(sharded(data, cfg, rank, world), data, device)


def training_set_size(data: Any, y: Any, cfg: FitConfig, bayesian: bool) -> int | None:
    """N of the ELBO: ``n_train``, else len(x), else the DataLoader's whole dataset (every rank's share); None for a
    plain model that has no N; a TypeError when a wrapped model's N cannot be known."""
    if cfg.n_train is not None:
        return cfg.n_train
    if y is not None:
        return len(data)
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:  # an IterableDataset without len()
            pass
    if not bayesian:
        return None
    raise TypeError(f"fit cannot tell the number of training examples N (the ELBO weighs the KL term by 1/N) from a "
                    f"{type(data).__name__}: pass n_train=N")


def batch_length(obj: Any) -> int | None:
    """The first dimension of the first tensor (of one dimension or more) in ``obj`` (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() > 0 else None
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        n = batch_length(item)
        if n is not None:
            return n
    return None
