"""benchmarks/prune_at_scale.py end to end at its --quick sizes (20 and 60 MB): the result file has what the
scaling issue needs (baseline and prune wall and RSS, phases, uncovered time, ratios, a profile), and the prune
deleted exactly the dead FFN neurons. About 20 s on 2 cores: opt-in with `pytest -m slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.prune_at_scale import parse_size, shape_for

ROOT = Path(__file__).resolve().parents[1]


def test_sizes_read_and_pick_the_issues_shape():
    assert parse_size("1.6G") == 1_600_000_000 and parse_size("512MiB") == 512 * 2**20 and parse_size("100MB") == 10**8
    shape = shape_for(parse_size("1.6G"), blocks=12, ffn_ratio=4, dtype="float32", seq=16, dead_share=0.25)
    assert (shape.hidden, shape.ffn, shape.dead) == (2048, 8192, 2048)
    assert abs(shape.weight_bytes - 1.6e9) < 0.02e9


@pytest.mark.slow
def test_quick_run_writes_the_scaling_result_and_deletes_the_dead_neurons(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.prune_at_scale", "--quick", "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "prune-at-scale-quick.json").read_text())
    assert {"machine", "config", "interpreter_floor", "sizes", "profile"} <= set(result)
    assert [e["size"] for e in result["sizes"]] == ["20M", "60M"]
    for entry in result["sizes"]:
        assert entry["model_bytes"] > 0.8 * entry["target_bytes"] and entry["params"] > 0
        assert entry["baseline"]["wall_s"] > 0 and entry["baseline"]["peak_rss"] > 0
        for key in ("prune", "prune_no_verify"):
            run = entry[key]
            assert run["wall_s"] > 0 and run["peak_rss"] > 0
            assert {"load", "analysis+rewrite", "save"} <= set(run["phases_s"])
            assert run["uncovered_s"] == pytest.approx(run["wall_s"] - sum(run["phases_s"].values()))
            # every dead neuron went: its W1 column, b1 entry and W2 row, a quarter of the FFN's parameters
            shape = entry["shape"]
            assert run["removed_params"] == entry["expected_removed_params"] == shape["blocks"] * shape["dead"] * (2 * shape["hidden"] + 1)
            assert run["params_before"] == entry["params"] and run["removed_every_dead_neuron"]
            ffn_params = shape["blocks"] * (2 * shape["hidden"] * shape["ffn"] + shape["ffn"])
            assert run["removed_params"] / ffn_params == pytest.approx(0.25, abs=0.01)
        assert "verify" in entry["prune"]["phases_s"] and "verify" not in entry["prune_no_verify"]["phases_s"]
        assert {"prune_wall_over_baseline", "prune_rss_over_baseline", "prune_no_verify_wall_over_baseline"} <= set(entry["ratios"])
    profile = result["profile"]
    assert profile["size"] == "20M" and profile["rss_rises"] and profile["command_s"] > 0
    text = (tmp_path / profile["file"]).read_text()
    assert "top 25 by cumulative" in text and "top 25 by tottime" in text and "RSS rises" in text
