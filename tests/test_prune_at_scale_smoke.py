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
    the neurons whose up or gate column is zero go; the library's block-wise check passes (each sublayer's residual
    branch compared on its own scale), and catches a wrong deletion in the MLP's branch."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from benchmarks.llama_decoder import deleted_units, weight_widths
    from onnxprune.verify_blocks import compare_blockwise

    shape, src, built = _small_decoder(tmp_path)
    assert built["cuts"][:3] == ["input", "layers.0.post_attn", "layers.0.out"]
    out = tmp_path / "pruned" / "decoder.onnx"
    done = _prune(src, out, "--verify", "blocks")  # the CLI's block-wise verification
    assert "block by block" in done.stdout
    units = deleted_units(shape, weight_widths(out))["deleted"]
    up, gate, down = shape.dead_neurons()
    assert units["kv_heads"] == 1 and units["query_heads"] == shape.rep
    assert units["ffn_neurons"] == up + gate  # the down-row-zero neurons are kept (the engine reads them as live)
    check = compare_blockwise(src, out, budget=1)  # every segment between cuts a block of its own
    assert check.ok and check.blocks > 3
    branches = {"layers.0.self_attn.o", "layers.0.mlp.down"}  # what each sublayer adds to the residual stream
    assert branches <= set(check.max_relative_error) and max(check.max_relative_error[b] for b in branches) < 5e-3

    # a wrong deletion: zero one live FFN neuron's down row in a copy of the pruned model; the MLP's branch fails
    model = onnx.load(str(out))
    init = next(t for t in model.graph.initializer if t.name == "layers.0.mlp.down_proj.weight"
                or t.name.startswith("layers.0.mlp.down_proj"))
    w = numpy_helper.to_array(init).copy()
    w[np.argmax(np.abs(w).sum(axis=1))] = 0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad" / "decoder.onnx"
    bad.parent.mkdir()
    onnx.save(model, str(bad), save_as_external_data=True, location="decoder.onnx.data")
    wrong = compare_blockwise(src, bad, budget=1)
    assert not wrong.ok and wrong.worst()[0] == "layers.0.mlp.down"
    assert wrong.max_relative_error["layers.0.self_attn.o"] < 5e-3  # the attention sublayer still agrees


def test_small_decoder_with_assume_finite_loses_every_dead_unit_exactly_block_by_block(tmp_path):
    """With --assume-finite the lone query head (o_proj rows zero; its K/V head stays for the others) and the
    neurons whose down row is zero go too: every dead unit, and the block-wise check passes."""
    from benchmarks.llama_decoder import deleted_units, weight_widths
    from onnxprune.verify_blocks import compare_blockwise

    shape, src, _ = _small_decoder(tmp_path)
    out = tmp_path / "pruned" / "decoder.onnx"
    _prune(src, out, "--assume-finite")
    units = deleted_units(shape, weight_widths(out))["deleted"]
    assert units["kv_heads"] == 1 and units["query_heads"] == shape.rep + shape.dead_query_heads
    assert units["ffn_neurons"] == sum(shape.dead_neurons())
    assert compare_blockwise(src, out).ok


def test_small_decoder_with_rotary_prunes_its_dead_kv_head_exactly_block_by_block(tmp_path):
    """With HF's rotary embedding on q and k (rotate_half: Slice, Neg, Concat of the head dim; cos/sin tables
    [1, 1, S, D]) the dead K/V head still goes with its 4 query heads, and the FFN neurons go; no rotary node is a
    barrier, and the result is exact whole (the CLI's verification) and block by block."""
    from benchmarks.llama_decoder import deleted_units, weight_widths
    from onnxprune.verify_blocks import compare_blockwise

    shape, src, _ = _small_decoder(tmp_path, rotary=True)
    out = tmp_path / "pruned" / "decoder.onnx"
    done = _prune(src, out, "--explain")
    barriers = done.stdout.split("Barriers (channels reaching these nodes are kept):", 1)[-1]
    assert "reduces over the channel axis" in barriers and "_rope." not in barriers, barriers
    units = deleted_units(shape, weight_widths(out))["deleted"]
    assert units["kv_heads"] == 1 and units["query_heads"] == shape.rep
    assert units["ffn_neurons"] == sum(shape.dead_neurons()[:2])
    assert compare_blockwise(src, out).ok


@pytest.mark.slow
def test_llama_run_writes_its_result(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.prune_at_scale", "--model", "llama", "--layers", "1", "2",
                           *[a for k, v in SMALL.items() for a in (f"--{k.replace('_', '-')}", str(v))],
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "prune-at-scale-llama.json").read_text())
    assert result["config"]["model"] == "llama" and [e["layers"] for e in result["sizes"]] == [1, 2]
    for e in result["sizes"]:
        check = e["prune_verify_blocks"]["verification"]  # the CLI's own block-wise check, inside the timed run
        assert check["method"] == "blocks" and check["ok"] and check["blocks"] >= 1
        assert e["prune_verify_blocks"]["phases_s"]["verify"] > 0 and e["prune"]["wall_s"] > 0
        assert e["prune"]["verification"]["method"] == "whole" and "verify" not in e["prune_no_verify"]["phases_s"]
        assert e["deleted_units"]["deleted"]["kv_heads"] == e["layers"]
    from benchmarks.report.scale import prune_at_scale

    assert "| 2 |" in prune_at_scale("prune-at-scale-llama", result)["table"]
