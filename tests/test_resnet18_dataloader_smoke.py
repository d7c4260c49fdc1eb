"""The ResNet-18 DataLoader benchmark (benchmarks/resnet18_dataloader.py) runs end to end as `--quick` on CPU and the
report renders its section. About two minutes on a 2-core machine (CIFAR-10 decoded into the tests' own cache
included): opt-in with `pytest -m slow`; Torch-Pruning is a benchmark extra (`pip install -e '.[bench]'`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxprune.data import CIFAR10_ARCHIVE

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"dense", "sbp", "torch_pruning"}


def script(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m benchmarks.NAME ARGS`` from the repository's root (as tests/test_benchmarks_smoke.py runs them)."""
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.data
def test_resnet18_dataloader_quick_trains_prunes_and_times_three_models(tmp_path, shared):
    """--quick: dense, SBP and Torch-Pruning trained one epoch each on the augmenting DataLoader, exported to ONNX
    (SBP pruned, Torch-Pruning at most SBP's MACs), tested and timed on ONNX Runtime; the report's table reads it."""
    from benchmarks.report.dataloader import LABELS, resnet18_dataloader

    shared("cifar10-jpeg", CIFAR10_ARCHIVE)
    pytest.importorskip("torch_pruning")
    done = script("resnet18_dataloader", "--quick", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "resnet18-dataloader-quick.json").read_text())
    models, config = result["models"], result["config"]
    assert set(models) == MODELS and config["quick"] and config["epochs"] == 1
    assert config["train_images"] == 128 and config["test_images"] == 256 and config["steps_per_epoch"] == 2
    for m in models.values():
        assert 0 <= m["error_pct"] <= 100 and m["macs"] > 0 and m["params"] > 0
        assert (tmp_path / "work" / Path(m["file"]).name).exists()
    # --tp-rule at-most: Torch-Pruning never gets more MACs than the model SBP ships
    assert models["torch_pruning"]["macs"] <= models["sbp"]["macs"] <= models["dense"]["macs"]
    assert result["sbp"]["agreement_pruned_onnx_with_torch"] >= 0.99  # 256 test images: two flips at most
    assert {len(result["history"][k]) for k in ("dense", "sbp", "torch_pruning")} == {1}
    for threads in (1, 2):
        for batch in (1, 64):
            timings = result["latency_cpu"][f"threads{threads}"][f"batch{batch}"]
            assert set(timings) == MODELS and all(t["median_ms"] > 0 for t in timings.values())
    assert "skipped" in result["latency_cuda"] or set(result["latency_cuda"]) == {"batch1", "batch256"}
    section = resnet18_dataloader("resnet18-dataloader-quick", result)
    assert all(label in section["table"] for label in LABELS.values()) and section["epochs"] == 1
