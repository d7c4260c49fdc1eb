"""Evaluating a trained model: predictions and accuracy in full float32, and BatchNorm re-estimation.

Arrays of images go through :func:`predict`, :func:`evaluate` and :func:`recalibrate_norms`; batches of
``(inputs, targets)`` from any iterable (a DataLoader) through :func:`evaluate_batches` and
:func:`recalibrate_norms_on_batches`, with the helpers ``fit`` shares: :func:`split_batch`,
:func:`to_device`, :func:`call_model` and :func:`is_classification`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from onnxprune.errors import InputError

__all__ = ["ieee_float32", "predict", "evaluate", "recalibrate_norms", "unwrap_parallel", "split_batch", "to_device",
           "call_model", "is_classification", "evaluate_batches", "recalibrate_norms_on_batches"]


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wraps (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- batches of (inputs, targets) ------------------------------------------------------


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch; an InputError names anything else the data yielded."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    what = type(batch).__name__
    try:
        what += f" of length {len(batch)}"
    except TypeError:  # not sized
        pass
    raise InputError(f"fit expects batches of (inputs, targets); the data yielded a {what}")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (in tuples, lists and dicts) moved to ``device`` (non-blocking)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def is_classification(outputs: Any, targets: Any) -> bool:
    """Whether ``outputs`` are 2-D logits and ``targets`` 1-D integer labels of the same batch: accuracy has a meaning."""
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return False
    integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    return outputs.dim() == 2 and targets.dim() == 1 and integer and outputs.shape[0] == targets.shape[0]


def _float_batch(x: np.ndarray, start: int, batch_size: int, device: str | torch.device) -> torch.Tensor:
    """Images ``x[start : start + batch_size]`` as a float tensor on ``device`` (uint8 scaled to [0, 1])."""
    xb = torch.as_tensor(x[start : start + batch_size])
    xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
    return xb.to(device)


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 arithmetic while open: on CUDA, convolutions and matrix products without TF32 (PyTorch's default
    for cuDNN convolutions), so predictions compare with ONNX Runtime's float32 kernels to the rounding of the sum."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """Class predictions of ``model`` in evaluation mode for images ``x`` (numpy, float or uint8), in full float32."""
    model = unwrap_parallel(model)
    was = model.training
    model.eval()
    out = []
    try:
        with ieee_float32():
            for i in range(0, len(x), batch_size):
                out.append(model(_float_batch(x, i, batch_size, device)).argmax(dim=1).cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    """Accuracy of ``model`` in evaluation mode."""
    return float((predict(model, x, **kwargs) == y).mean())


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[Any], *, device: str | torch.device = "cpu") -> float | None:
    """Accuracy of ``model`` in evaluation mode (full float32) over batches of ``(inputs, targets)``; None when
    its outputs are not class logits for integer labels (:func:`is_classification`) or there is no batch."""
    model, device = unwrap_parallel(model), torch.device(device)
    was = model.training
    model.eval()
    correct = seen = 0
    try:
        with ieee_float32():
            for batch in batches:
                inputs, targets = (to_device(part, device) for part in split_batch(batch))
                outputs = call_model(model, inputs)
                if not is_classification(outputs, targets):
                    return None
                correct += int((outputs.argmax(1) == targets).sum())
                seen += len(targets)
    finally:
        model.train(was)
    return correct / seen if seen else None


@contextmanager
def _reestimating(model: nn.Module) -> Iterator[int]:
    """While open: ``model`` in evaluation mode but its BatchNorms in training mode, their statistics reset and
    averaged cumulatively over every batch run; yields how many there are. Restores the modes and momenta."""
    base = unwrap_parallel(model)
    norms = [m for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was = base.training
    base.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over every batch of this pass
        m.train()
    try:
        yield len(norms)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
        base.train(was)


_NOTHING = object()


def _has_norms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_norms(model: nn.Module, x: np.ndarray, *, batch_size: int = 256, device: str | torch.device = "cpu",
                      max_examples: int | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance for the network as it is evaluated.

    While a Bayesian model trains, its gates multiply channels by noise, and a BatchNorm fed by
    gated channels averages that noise into its running variance. Evaluation uses the deterministic
    gates, whose outputs vary less: the stored statistics no longer fit (the variance shift of
    dropout before BatchNorm) and accuracy can fall far below the training accuracy. This runs
    ``x`` (the training images, no augmentation; the first ``max_examples``) through the model with
    deterministic gates and BatchNorm in training mode with cumulative averaging, then restores
    the model's mode. Returns the number of BatchNorm modules re-estimated (0: nothing to do).
    """
    base = unwrap_parallel(model)
    if not _has_norms(base):
        return 0
    x = x[:max_examples] if max_examples else x
    with _reestimating(base) as count:
        for i in range(0, len(x), batch_size):
            base(_float_batch(x, i, batch_size, device))
    return count


@torch.no_grad()
def recalibrate_norms_on_batches(model: nn.Module, inputs: Iterable[Any], *, device: str | torch.device = "cpu") -> int:
    """:func:`recalibrate_norms` over an iterable of model inputs (each a tensor, tuple or dict: :func:`call_model`),
    e.g. the inputs of a DataLoader's batches. Returns the number of BatchNorm modules re-estimated (0 also when
    ``inputs`` yields nothing: the statistics are then left as they were)."""
    base = unwrap_parallel(model)
    batches = iter(inputs)
    first = next(batches, _NOTHING)
    if first is _NOTHING or not _has_norms(base):
        return 0
    with _reestimating(base) as count:
        for batch_inputs in itertools.chain([first], batches):
            call_model(base, to_device(batch_inputs, torch.device(device)))
    return count
