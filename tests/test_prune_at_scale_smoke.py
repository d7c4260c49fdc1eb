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


# -- the Llama-shaped decoder (--model llama) at small dims: the graph the issue names, pruned exactly ------------

SMALL = dict(hidden=256, ffn=688, heads=8, kv_heads=2, head_dim=32, seq=8)


def _small_decoder(tmp_path, **kw):
    from benchmarks.llama_decoder import LlamaShape, build_llama

    shape = LlamaShape(**{"layers": 1, **SMALL, **kw})
    src = tmp_path / "decoder.onnx"
    built = build_llama(src, shape)
    return shape, src, built


def _prune(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    out.parent.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "onnxprune", "prune", str(src), "-o", str(out), "--target", "none",
                           *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_small_decoder_prunes_its_dead_kv_head_and_neurons_exactly_block_by_block(tmp_path):
    """One decoder layer (GQA 8/2 heads of 32, SwiGLU 688, no rotary): the dead K/V head goes with its 4 query heads,
    the neurons whose up or gate column is zero go; the block-wise check passes, and catches a wrong deletion."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from benchmarks.llama_decoder import deleted_units, verify_blockwise, weight_widths

    shape, src, built = _small_decoder(tmp_path)
    assert built["cuts"][:3] == ["input", "layers.0.post_attn", "layers.0.out"]
    out = tmp_path / "pruned" / "decoder.onnx"
    _prune(src, out)  # with the CLI's own verification (the whole model on ONNX Runtime): small enough here
    units = deleted_units(shape, weight_widths(out))["deleted"]
    up, gate, down = shape.dead_neurons()
    assert units["kv_heads"] == 1 and units["query_heads"] == shape.rep
    assert units["ffn_neurons"] == up + gate  # the down-row-zero neurons are kept (the engine reads them as live)
    check = verify_blockwise(src, out, shape.layers)
    assert check["exact"] and check["blocks"] == 3 and check["worst_branch_rel_err"] < 5e-3

    # a wrong deletion: zero one live FFN neuron's down row in a copy of the pruned model; the MLP block fails
    model = onnx.load(str(out))
    init = next(t for t in model.graph.initializer if t.name == "layers.0.mlp.down_proj.weight"
                or t.name.startswith("layers.0.mlp.down_proj"))
    w = numpy_helper.to_array(init).copy()
    w[np.argmax(np.abs(w).sum(axis=1))] = 0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad" / "decoder.onnx"
    bad.parent.mkdir()
    onnx.save(model, str(bad), save_as_external_data=True, location="decoder.onnx.data")
    wrong = verify_blockwise(src, bad, shape.layers)
    assert not wrong["exact"] and wrong["worst_block"] == "layers.0.post_attn -> layers.0.out"


def test_small_decoder_with_assume_finite_loses_every_dead_unit_exactly_block_by_block(tmp_path):
    """With --assume-finite the lone query head (o_proj rows zero; its K/V head stays for the others) and the
    neurons whose down row is zero go too: every dead unit, and the block-wise check passes."""
    from benchmarks.llama_decoder import deleted_units, verify_blockwise, weight_widths

    shape, src, _ = _small_decoder(tmp_path)
    out = tmp_path / "pruned" / "decoder.onnx"
    _prune(src, out, "--assume-finite")
    units = deleted_units(shape, weight_widths(out))["deleted"]
    assert units["kv_heads"] == 1 and units["query_heads"] == shape.rep + shape.dead_query_heads
    assert units["ffn_neurons"] == sum(shape.dead_neurons())
    assert verify_blockwise(src, out, shape.layers)["exact"]


def test_small_decoder_with_rotary_keeps_its_heads_and_says_why(tmp_path):
    """With HF's rotary embedding (rotate_half: Slice, Neg, Concat of the head dim; cos/sin tables) the engine keeps
    the dead K/V head and names the rotary nodes as barriers; the FFN neurons still go, and the result is exact."""
    from benchmarks.llama_decoder import deleted_units, verify_blockwise, weight_widths

    shape, src, _ = _small_decoder(tmp_path, rotary=True)
    out = tmp_path / "pruned" / "decoder.onnx"
    done = _prune(src, out, "--explain", "--no-verify")
    assert "rotate_half" in done.stdout and "attention heads" in done.stdout
    units = deleted_units(shape, weight_widths(out))["deleted"]
    assert units["kv_heads"] == 0 and units["query_heads"] == 0
    assert units["ffn_neurons"] == sum(shape.dead_neurons()[:2])
    assert verify_blockwise(src, out, shape.layers)["exact"]


@pytest.mark.slow
def test_llama_run_writes_its_result(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.prune_at_scale", "--model", "llama", "--layers", "1", "2",
                           *[a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))],
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "prune-at-scale-llama.json").read_text())
    assert result["config"]["model"] == "llama" and [e["layers"] for e in result["sizes"]] == [1, 2]
    for e in result["sizes"]:
        assert e["blockwise_verification"]["exact"] and e["prune"]["wall_s"] > 0
        assert e["deleted_units"]["deleted"]["kv_heads"] == e["layers"]
    from benchmarks.report.scale import prune_at_scale

    assert "| 2 |" in prune_at_scale("prune-at-scale-llama", result)["table"]
