"""The baseline users would otherwise pick: Torch-Pruning's L2-magnitude channel pruning.

``prune_to_macs`` prunes a dense model with a uniform per-layer ratio (classifier
excluded), searching the ratio so the result has the requested MACs (onnxprune's count).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs as onnxprune's cost model counts them in the exported graph (the units the report compares)."""
    from onnxprune.api import inspect_model
    from onnxprune.torch_export import export_onnx

    return inspect_model(export_onnx(model, example))[2].macs


def _pruned(model: nn.Module, example: torch.Tensor, ratio: float, ignore: tuple[str, ...] = ()) -> nn.Module:
    import re

    import torch_pruning as tp

    m = copy.deepcopy(model)
    classifier = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    ignored = [classifier] + [mod for name, mod in m.named_modules() if any(re.fullmatch(p, name) for p in ignore)]
    pruner = tp.pruner.MagnitudePruner(
        m, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, ignored_layers=ignored
    )
    pruner.step()
    return m


# How prune_to_macs picks among the MAC counts a uniform ratio can reach
MACS_RULES = ("at-most", "nearest")


def prune_to_macs(
    model: nn.Module,
    example: torch.Tensor,
    target_macs: float,
    *,
    ignore: tuple[str, ...] = (),
    steps: int = 14,
    rule: str = "at-most",
) -> nn.Module:
    """The model pruned by Torch-Pruning to about ``target_macs``, counted by onnxprune's cost model.

    A uniform ratio moves every layer by whole channels, so few MAC counts are reachable (ResNet-56: 1.60x, then
    1.70x). ``rule``: ``at-most`` takes the nearest at or below the target (the baseline never has more MACs),
    ``nearest`` the nearest on either side.
    ``ignore``: regular expressions of module names Torch-Pruning must leave alone (it cannot follow
    the CIFAR ResNets' parameter-free option-A shortcut, so their stream convs are excluded).
    """
    if rule not in MACS_RULES:
        raise ValueError(f"rule must be one of {MACS_RULES}, not {rule!r}")
    model = model.cpu().eval()
    lo, hi = 0.0, 0.99
    below, below_macs = model, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = _pruned(model, example, mid, ignore)
        macs = _macs(candidate, example)
        if macs > target_macs:
            lo = mid
        else:
            hi, below, below_macs = mid, candidate, macs
    if below is model:
        below = _pruned(model, example, hi, ignore)
        below_macs = _macs(below, example)
    if rule == "at-most" or lo == 0.0:
        return below
    above = _pruned(model, example, lo, ignore)  # the last ratio that kept more than the target
    return above if _macs(above, example) - target_macs < target_macs - below_macs else below
