"""Fine-tuning the pruned network after Bayesian training, its rejected channels held at zero.

While a Bayesian model trains, its gates inject noise (a strong, dropout-like regulariser)
and its weights often learn at a small rate: the kept channels never train noise-free.
``finetune_pruned`` folds the gates into the weights (as the export does), so every
rejected channel is exactly zero, and trains the plain network with those zeros fixed:
the gradient of each zeroed parameter entry is masked, so Adam never moves it. The result
exports and prunes like the wrapped model (``onnxprune.torch_export.export_onnx`` then
``onnxprune.prune``): the same channels are deleted.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from onnxprune.bayes.weight_gates import WeightSiteInfo
from onnxprune.bayes.wrapper import BayesianModel


def _held_channels(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, mask) pairs of ``module``'s own weight and bias: 0 on the channels folding zeroed.

    A channel (an output row of ``weight``) is held when its weights are all zero; its bias
    entry too when that is zero (a gate before the bias leaves a constant channel whose bias
    may still train). Zeros elsewhere (a BatchNorm's shift that starts at 0) are not held.
    """
    return _held_rows(getattr(module, "weight", None), getattr(module, "bias", None))


def _held_rows(w: torch.Tensor | None, b: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, mask) pairs of a weight's all-zero rows and of its bias's zero entries there (see
    :func:`_held_channels`)."""
    if not isinstance(w, nn.Parameter) or not w.requires_grad or not torch.is_floating_point(w) or w.dim() == 0:
        return []
    rows = w.detach().reshape(w.shape[0], -1).abs().sum(1) == 0
    if not rows.any():
        return []
    out = [(w, (~rows).to(w.dtype).reshape(-1, *[1] * (w.dim() - 1)).expand_as(w).clone())]
    if isinstance(b, nn.Parameter) and b.requires_grad and b.shape == rows.shape:
        held = rows & (b.detach() == 0)
        if held.any():
            out.append((b, (~held).to(b.dtype)))
    return out


def freeze_rejected(module: nn.Module) -> int:
    """Hold the zeroed channels of a gate-folded module at zero while it trains; returns the entries held.

    A gate folded into a BatchNorm zeroes its scale and shift; one folded into a layer zeroes
    the layer's weight rows (and bias, unless the gate sat before the bias). Each such entry
    gets a gradient hook that multiplies its gradient by 0: Adam's moments stay zero, so the
    entry does too (weight decay adds a multiple of the entry: 0).
    """
    return _hold([pair for m in module.modules() for pair in _held_channels(m)])


def freeze_rejected_weights(module: nn.Module, sites: list[WeightSiteInfo]) -> int:
    """:func:`freeze_rejected` for the functional layers gated on their weights (``BayesianModel.weight_sites``):
    their zeroed rows (and bias entries) in the gate-folded ``module``; returns the entries held."""
    pairs = []
    for site in sites:
        if site.gated:
            bias = module.get_parameter(site.bias) if site.bias is not None else None
            pairs += _held_rows(module.get_parameter(site.weight), bias)
    return _hold(pairs)


def _hold(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Multiply each parameter's gradient by its mask (a gradient hook); returns the entries held at zero."""
    held = 0
    for p, mask in pairs:
        p.register_hook(lambda g, mask=mask: g * mask.to(g.device))
        held += int((mask == 0).sum())
    return held


def finetune_pruned(wrapped: BayesianModel, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3,
                    **fit_kwargs) -> nn.Module:
    """The gate-folded plain network of ``wrapped``, trained ``epochs`` more with its rejected channels at zero.

    ``fit_kwargs`` go to :func:`onnxprune.bayes.training.fit` (device, augment, batch_size,
    lr_schedule, checkpoint, ...); the loss is plain cross-entropy.
    """
    from onnxprune.bayes.exporting import fold_gates
    from onnxprune.bayes.training import fit

    device = next(wrapped.parameters()).device
    plain = fold_gates(wrapped).to(device)
    freeze_rejected(plain)
    freeze_rejected_weights(plain, wrapped.weight_sites)
    if epochs > 0:
        fit(plain, x, y, epochs=epochs, lr=lr, **fit_kwargs)
    return plain.eval()
