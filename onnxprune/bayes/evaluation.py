"""Evaluating a trained model: predictions and accuracy in full float32, and BatchNorm re-estimation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

__all__ = ["ieee_float32", "predict", "evaluate", "recalibrate_norms", "unwrap_parallel"]


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module a DistributedDataParallel wraps (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
    norms = [m for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was = base.training
    base.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over every batch of this pass
        m.train()
    x = x[:max_examples] if max_examples else x
    try:
        for i in range(0, len(x), batch_size):
            base(_float_batch(x, i, batch_size, device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
        base.train(was)
    return len(norms)
