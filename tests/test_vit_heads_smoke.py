"""The ViT head-pruning benchmark (benchmarks/vit_heads.py) runs end to end as `--smoke` on CPU: dense, SBP and
Torch-Pruning trained, exported to ONNX, measured, and written as three rows. About a minute on a 2-core machine
(CIFAR-10 decoded into the tests' own cache included): opt-in with `pytest -m slow`; Torch-Pruning is a benchmark
extra (`pip install -e '.[bench]'`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxprune.data import CIFAR10_ARCHIVE

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["dense", "sbp", "torch_pruning"]


@pytest.mark.slow
@pytest.mark.data
def test_vit_heads_smoke_writes_three_rows(tmp_path, shared):
    shared("cifar10-jpeg", CIFAR10_ARCHIVE)
    pytest.importorskip("torch_pruning")
    # the at-most rule, so Torch-Pruning's MACs are bounded by its target below
    done = subprocess.run([sys.executable, "-m", "benchmarks.vit_heads", "--smoke", "--tp-rule", "at-most", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "vit-heads-smoke.json").read_text())
    config, models, rows = result["config"], result["models"], result["rows"]
    assert config["smoke"] and config["model"] == {"dim": 32, "depth": 2, "heads": 4, "mlp": 64}
    assert config["train_images"] == 512 and config["dense_epochs"] == 1
    assert [r["model"] for r in rows] == MODELS and list(models) == MODELS
    for row in rows:
        assert 0 <= row["error_pct"] <= 100 and row["params"] > 0 and row["macs"] > 0
        assert len(row["heads"]) == 2 and all(1 <= h <= 4 for h in row["heads"])
        assert len(row["mlp"]) == 2 and all(1 <= n <= 64 for n in row["mlp"])
        assert row["cpu_b1_ms"] > 0 and row["cpu_b64_ms"] > 0
        assert (tmp_path / "work" / f"{row['model']}.onnx").exists()
    assert rows[0]["heads"] == [4, 4] and rows[0]["mlp"] == [64, 64]  # dense
    # Torch-Pruning never gets more MACs than its target (SBP's, or in a smoke run where SBP rejected nothing, 3/4 of
    # the dense MACs), and its modules agree with its ONNX model on the heads
    tp = result["torch_pruning"]
    assert models["torch_pruning"]["macs"] <= tp["target_macs"] <= models["dense"]["macs"]
    assert models["torch_pruning"]["structure"]["heads_modules"] == rows[2]["heads"]
    assert models["sbp"]["macs"] <= models["dense"]["macs"]
    assert result["sbp"]["agreement_pruned_onnx_with_torch"] >= 0.99
    assert "skipped" in result["latency_cuda"] or set(result["latency_cuda"]) == {"batch1", "batch256"}
    for label in ("dense", "onnxprune SBP", "Torch-Pruning"):
        assert label in done.stdout


def test_torch_pruning_match_takes_sbps_head_count_and_its_macs():
    """The default rule: as many heads as SBP kept (spread evenly), and the MLP ratio bisected to SBP's MACs, so
    both nets end within a few neurons' MACs of each other (no training; a 2-block ViT)."""
    pytest.importorskip("torch_pruning")
    import torch

    import models
    from benchmarks import vit_heads

    torch.manual_seed(0)
    dense = models.vit_cifar(dim=32, depth=2, heads=4, mlp=64).eval()
    example = torch.rand(1, 3, 32, 32)
    s = vit_heads.settings_of(vit_heads.parse_args(["--smoke", "--tp-steps", "10"]))
    target = int(0.6 * vit_heads.count_macs(dense, example, s.tp_search_exporter))
    net, search = vit_heads.tp_match(s, dense, example, target, sbp_heads=4)
    assert vit_heads.module_heads(net) == [2, 2]
    assert abs(search["macs"] - target) <= 0.01 * target
    assert search["macs"] == vit_heads.count_macs(net, example, s.tp_search_exporter)
