"""The Torch-Pruning baseline lands at the MAC count its rule asks for (Torch-Pruning itself is a benchmark extra)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.tp_baseline import prune_to_macs
from models import build
from onnxprune.api import inspect_model
from onnxprune.torch_export import export_onnx

RESNET_IGNORE = ("conv1", r"layer\d+\.\d+\.conv2")


def _macs(model: torch.nn.Module, example: torch.Tensor) -> int:
    return inspect_model(export_onnx(model, example))[2].macs


def test_prune_to_macs_refuses_a_rule_it_does_not_know():
    with pytest.raises(ValueError, match="rule must be one of"):
        prune_to_macs(torch.nn.Linear(2, 2), torch.zeros(1, 2), 1.0, rule="closest")


@pytest.mark.slow
def test_prune_to_macs_takes_the_count_at_or_below_the_target_unless_asked_for_the_nearest():
    """ResNet-20's uniform ratios reach a few MAC counts: between two of them, nearer the larger, at-most still
    takes the smaller, nearest takes the larger (`pytest -m slow` with the bench extra)."""
    pytest.importorskip("torch_pruning")
    model, example = build("resnet20").eval(), torch.zeros(1, 3, 32, 32)
    counts = sorted({_macs(prune_to_macs(model, example, _macs(model, example) * f, ignore=RESNET_IGNORE), example)
                     for f in (0.55, 0.65)})
    assert len(counts) == 2, counts  # two reachable counts, the smaller first
    target = counts[1] - (counts[1] - counts[0]) // 4  # below the larger count, nearer to it
    at_most = _macs(prune_to_macs(model, example, target, ignore=RESNET_IGNORE), example)
    nearest = _macs(prune_to_macs(model, example, target, ignore=RESNET_IGNORE, rule="nearest"), example)
    assert at_most <= target < nearest
    assert nearest - target < target - at_most
