"""The baseline users would otherwise pick: Torch-Pruning's L2-magnitude channel pruning.

``prune_to_macs`` prunes a dense model with a uniform per-layer ratio (classifier
excluded), searching the ratio so the result has the requested MACs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _macs(model: nn.Module, example: torch.Tensor) -> float:
    import torch_pruning as tp

    return float(tp.utils.count_ops_and_params(model, example)[0])


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


def prune_to_macs(
    model: nn.Module, example: torch.Tensor, target_macs: float, *, ignore: tuple[str, ...] = (), steps: int = 14
) -> nn.Module:
    """The model pruned by Torch-Pruning to about ``target_macs`` (measured in the same units as onnxprune's
    cost model: the ratio of Torch-Pruning's own counts is matched to the requested reduction).

    ``ignore``: regular expressions of module names Torch-Pruning must leave alone (it cannot follow
    the CIFAR ResNets' parameter-free option-A shortcut, so their stream convs are excluded).
    """
    from onnxprune.api import inspect_model
    from onnxprune.torch_export import export_onnx

    model = model.cpu().eval()
    dense_ours = inspect_model(export_onnx(model, example))[2].macs
    want = target_macs / dense_ours  # fraction of MACs to keep
    base = _macs(model, example)
    lo, hi = 0.0, 0.99
    best = model
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = _pruned(model, example, mid, ignore)
        if _macs(candidate, example) / base > want:
            lo = mid
        else:
            hi, best = mid, candidate
    return best if best is not model else _pruned(model, example, hi, ignore)
