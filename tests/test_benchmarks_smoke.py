"""The benchmark scripts run end to end (slow: opt-in with `pytest -m slow`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_engine_benchmark_runs_quick_variant(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "prune_resnet50.py"), "--quick", "--repeats", "1",
           "--latency-runs", "3", "--results", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "prune-resnet50-quick" / "result.json").read_text())
    assert result["torch_pruning"]["same_widths_as_onnxprune"]
    assert result["macs"]["onnxprune"] == result["macs"]["torch_pruning"] < result["macs"]["dense"]
