"""Block-wise verification (onnxprune/cuts.py, onnxprune/verify_blocks.py) and the run's progress bars.

Cuts are found on small hand-built graphs; the check itself runs on real ONNX Runtime sessions: a residual MLP
with external data pruned by the CLI passes block by block, a candidate with a live neuron deleted by hand
fails, the input's folder is left byte for byte as it was, and `--verify` picks the method."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.prune_at_scale import MlpShape, build_model
from onnxprune import verify_blocks
from onnxprune.checked_write import write_checked
from onnxprune.cli import main
from onnxprune.cuts import GraphIndex, common_cuts, find_cuts, plan_blocks
from onnxprune.errors import VerificationError
from onnxprune.report import RunReport
from onnxprune.verify import compare_models
from onnxprune.verify_blocks import choose_method, compare_blockwise, verify_model

SHAPE = MlpShape(blocks=3, hidden=32, ffn=64, dtype="float32", seq=4, dead=16)


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder``: relative path -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_model(nodes, inits, *, elem=TensorProto.FLOAT, width=8, outputs=("out",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["batch", width])],
                              [helper.make_tensor_value_info(o, elem, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def residual_chain(layers: int = 2, width: int = 8) -> onnx.ModelProto:
    """x -> (h = x + W2 relu(W1 x)) per layer -> out."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], {}, "x"
    for i in range(layers):
        inits[f"w1_{i}"] = rng.standard_normal((width, 2 * width)).astype(np.float32)
        inits[f"w2_{i}"] = rng.standard_normal((2 * width, width)).astype(np.float32)
        nodes += [helper.make_node("MatMul", [x, f"w1_{i}"], [f"fc1_{i}"]),
                  helper.make_node("Relu", [f"fc1_{i}"], [f"act_{i}"]),
                  helper.make_node("MatMul", [f"act_{i}", f"w2_{i}"], [f"fc2_{i}"]),
                  helper.make_node("Add", [x, f"fc2_{i}"], [f"h_{i}"])]
        x = f"h_{i}"
    nodes.append(helper.make_node("Identity", [x], ["out"]))
    return make_model(nodes, inits, width=width)


# -- cuts ---------------------------------------------------------------------------------------------------------


def test_a_residual_mlp_chain_is_cut_at_its_streams():
    index = GraphIndex.of(residual_chain())
    single = [sorted(c.names) for c in find_cuts(index) if len(c.names) == 1]
    assert ["h_0"] in single and ["h_1"] in single
    # inside a layer the stream is live beside the branch: {x-stream, activation}, never the activation alone
    assert ["act_1"] not in single and ["act_1", "h_0"] in [sorted(c.names) for c in find_cuts(index)]
    # graph inputs and initializers are never part of a cut (the input is fed to every block)
    assert all("x" not in c.names and not c.names & {"w1_0", "w2_0"} for c in find_cuts(index))


def test_a_branch_that_skips_a_point_makes_it_no_cut():
    """h0 -> relu -> tanh -> add(., h0): h0 is live across the relu and the tanh, so neither output alone is a cut."""
    w = np.eye(8, dtype=np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h0"]), helper.make_node("Relu", ["h0"], ["h1"]),
                        helper.make_node("Tanh", ["h1"], ["h2"]), helper.make_node("Add", ["h2", "h0"], ["out"])],
                       {"w": w})
    cuts = find_cuts(GraphIndex.of(model), max_tensors=1)
    assert [sorted(c.names) for c in cuts] == [["h0"]]
    assert [sorted(c.names) for c in find_cuts(GraphIndex.of(model))] == [["h0"], ["h0", "h1"], ["h0", "h2"]]


def test_a_value_a_subgraph_reads_from_outside_stays_live():
    """If(cond) whose then-branch reads h0 from the outer graph: h0 is live until the If, so h1 alone is no cut;
    the model checks against itself block by block (the If runs inside its block)."""
    then_branch = helper.make_graph([helper.make_node("Identity", ["h0"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["h1"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"]), helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("If", ["cond"], ["out"], then_branch=then_branch, else_branch=else_branch)]
    model = make_model(nodes, {"w": np.eye(8, dtype=np.float32)})
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    index = GraphIndex.of(model)
    assert [sorted(c.names) for c in find_cuts(index)] == [["h0"], ["h0", "h1"]]
    assert [sorted(c.names) for c in find_cuts(index, max_tensors=1)] == [["h0"]]
    result = compare_blockwise(model, model, budget=1)
    assert result.ok and result.blocks == 2 and "out" in result.max_relative_error  # weightless segments merge


def test_a_cut_whose_tensor_changed_shape_is_not_common():
    """The candidate's p is narrower (two of its channels pruned): no common cut there, blocks merge across it."""
    def chain(width: int) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "wa"], ["p"]), helper.make_node("MatMul", ["p", "wb"], ["q"]),
                 helper.make_node("Relu", ["q"], ["out"])]
        return make_model(nodes, {"wa": np.ones((8, width), np.float32), "wb": np.ones((width, 8), np.float32)})

    ref, cand = GraphIndex.of(chain(8)), GraphIndex.of(chain(6))
    assert [sorted(c.names) for c in find_cuts(cand)] == [["p"], ["q"]]
    assert [(sorted(a.names), sorted(b.names)) for a, b in common_cuts(ref, cand)] == [(["q"], ["q"])]
    assert len(plan_blocks(ref, cand, budget=1)) == 2


def test_blocks_group_segments_within_the_weight_budget():
    index = GraphIndex.of(residual_chain(layers=3))
    layer_bytes = 2 * 8 * 16 * 4
    assert len(plan_blocks(index, index, budget=10**9)) == 1
    per_layer = plan_blocks(index, index, budget=layer_bytes)
    assert len(per_layer) >= 3 and all(b.weight_bytes <= layer_bytes for b in per_layer)
    assert [b.number for b in per_layer] == list(range(1, len(per_layer) + 1))


# -- the check on ONNX Runtime --------------------------------------------------------------------------------------


@pytest.fixture
def pruned(tmp_path) -> tuple[Path, Path]:
    """A residual MLP with external data and its prune by the CLI (no verification: the tests check it)."""
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    build_model(src, SHAPE, seed=2)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    assert main(["prune", str(src), "-o", str(out), "--target", "none", "--no-verify", "-q"]) == 0
    return src, out


def test_blockwise_check_passes_on_a_pruned_model_and_leaves_its_folders_as_they_were(pruned):
    src, out = pruned
    before_in, before_out = files_of(src.parent), files_of(out.parent)
    result = compare_blockwise(src, out, budget=1)  # every segment a block of its own
    assert result.ok and result.method == "blocks" and result.blocks >= 6
    assert {"block0.out", "block1.out", "block2.out", "output"} <= set(result.max_relative_error)
    assert max(result.max_relative_error.values()) < 1e-5
    assert files_of(src.parent) == before_in and files_of(out.parent) == before_out


def _delete_live_neuron(out: Path, folder: Path) -> Path:
    """A wrong candidate: block 1's most active live FFN neuron deleted (W1 column, b1 entry, W2 row)."""
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[f"block1.{k}"]) for k in ("w1", "b1", "w2"))
    live = int(np.argmax(np.abs(w1).sum(axis=0)))
    for name, value in (("w1", np.delete(w1, live, 1)), ("b1", np.delete(b1, live)), ("w2", np.delete(w2, live, 0))):
        inits[f"block1.{name}"].CopyFrom(numpy_helper.from_array(value, f"block1.{name}"))
    del model.graph.value_info[:]  # the shapes recorded for the right widths
    folder.mkdir()
    bad = folder / "bad.onnx"
    onnx.save(model, str(bad), save_as_external_data=True, location="bad.onnx.data")
    return bad


def test_blockwise_check_fails_where_a_live_neuron_was_deleted(pruned, tmp_path):
    src, out = pruned
    bad = _delete_live_neuron(out, tmp_path / "bad")
    result = compare_blockwise(src, bad, budget=1)
    name, err = result.worst()
    assert not result.ok and err > 1e-3
    assert name.startswith("block1.") and "block1" in result.block_of[name]
    assert result.max_relative_error["block0.out"] < 1e-5  # the blocks before it still agree
    with pytest.raises(VerificationError, match="block .*block1"):
        verify_model(src, bad, "blocks", weight_bytes=0)
    assert not compare_blockwise(src, bad).ok  # one block for the whole model: still caught


def test_a_failed_block_check_writes_nothing(pruned, tmp_path):
    src, out = pruned
    wrong = onnx.load(str(_delete_live_neuron(out, tmp_path / "bad")))
    dest = tmp_path / "dest" / "model.onnx"
    dest.parent.mkdir()
    report = RunReport(input=str(src), output=None, before=None, after=None)
    with pytest.raises(VerificationError, match="nothing was written"):
        write_checked(wrong, dest, src, report, verify="blocks", external_data=True)
    assert list(dest.parent.iterdir()) == []


def test_blocks_check_a_result_kept_in_memory(pruned):
    """Without an output the result is a ModelProto (weights in the protobuf); the input stays a path."""
    from onnxprune.api import prune_model

    src, _ = pruned
    result = prune_model(src, target="none", verify="blocks")
    check = result.report.verification
    assert check.method == "blocks" and check.ok and check.reason == "asked for (blocks)"
    assert result.report.to_dict()["verification"]["worst"]["relative_error"] < 1e-5


def fp16_residual(branch_scale: float, dead_rows: slice | None = None) -> onnx.ModelProto:
    """s0 = x + 100 (a large fp16 stream), out = s0 + W2 relu(W1 x) with a small branch; ``dead_rows``: W2's rows
    zeroed (live neurons deleted, shapes kept)."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 16)).astype(np.float16)
    w2 = (branch_scale * rng.standard_normal((16, 8))).astype(np.float16)
    if dead_rows is not None:
        w2[dead_rows] = 0
    nodes = [helper.make_node("Add", ["x", "offset"], ["s0"]), helper.make_node("MatMul", ["x", "w1"], ["fc1"]),
             helper.make_node("Relu", ["fc1"], ["act"]), helper.make_node("MatMul", ["act", "w2"], ["branch"]),
             helper.make_node("Add", ["s0", "branch"], ["out"])]
    return make_model(nodes, {"offset": np.full(8, 100, np.float16), "w1": w1, "w2": w2}, elem=TensorProto.FLOAT16)


def test_fp16_residual_branch_is_compared_on_its_own_scale():
    """The stream (about 100) rounds away a wrong deletion in a small branch: the whole-model check passes it,
    the block check compares the branch before the Add and fails it."""
    ref, bad = fp16_residual(0.01), fp16_residual(0.01, dead_rows=slice(0, 4))
    assert compare_models(ref, bad).ok  # max relative error of out: below fp16's 1e-2
    result = compare_blockwise(ref, bad)
    assert not result.ok and result.worst()[0] == "branch"
    assert compare_blockwise(ref, fp16_residual(0.01)).ok


def _peak_rss_rise(run) -> int:
    """Bytes the process's peak RSS rises above its RSS now while ``run()`` runs (Linux: VmHWM reset through
    /proc/self/clear_refs); the test is skipped where the peak cannot be reset."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        before = status("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration):
        pytest.skip("peak RSS cannot be reset here")
    run()
    return status("VmHWM:") - before


def test_a_check_session_holds_one_float32_copy_of_a_float16_weight_at_a_time():
    """ONNX Runtime computes a float16 MatMul in float32 on a copy of its weight; the check's sessions make
    each copy just before its MatMul (the default order made them all first: a chain's every weight at once)."""
    from onnxprune.runtime import lean_session_options, make_session

    n, layers = 2048, 4
    rng = np.random.default_rng(0)
    weights = {f"w{i}": (rng.standard_normal((n, n)) / 50).astype(np.float16) for i in range(layers)}
    names = ["x", *(f"h{i}" for i in range(1, layers)), "out"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(layers)]
    session = make_session(make_model(nodes, weights, elem=TensorProto.FLOAT16, width=n), options=lean_session_options())
    feed = {"x": rng.standard_normal((2, n)).astype(np.float16)}
    session.run(None, feed)  # the first run reads the weights in
    rise = _peak_rss_rise(lambda: session.run(None, feed))
    assert rise < 2 * n * n * 4  # one float32 copy (16 MiB), not four


# -- choosing the method; the command line ----------------------------------------------------------------------


def test_auto_checks_large_or_unfitting_models_block_by_block(monkeypatch):
    assert choose_method("auto", 2 * 2**30)[0] == "blocks"
    monkeypatch.setattr(verify_blocks, "available_memory", lambda: 64 * 2**30)
    assert choose_method("auto", 100 * 2**20)[0] == "whole"
    monkeypatch.setattr(verify_blocks, "available_memory", lambda: 200 * 2**20)
    method, reason = choose_method("auto", 100 * 2**20)
    assert method == "blocks" and "available" in reason
    assert choose_method("whole", 2 * 2**30)[0] == "whole"


def test_block_budget_is_an_eighth_of_the_weights_within_32_and_512_mib():
    assert verify_blocks.block_budget(354 * 2**20) == 354 * 2**20 // 8
    assert verify_blocks.block_budget(100 * 2**20) == 32 * 2**20
    assert verify_blocks.block_budget(11 * 2**30) == 512 * 2**20


@pytest.mark.parametrize("method", ["blocks", "whole", "auto"])
def test_cli_says_which_verification_it_used(pruned, tmp_path, capsys, method):
    src, _ = pruned
    before = files_of(src.parent)
    out, report = tmp_path / "v" / "model.onnx", tmp_path / "r.json"
    out.parent.mkdir()
    assert main(["prune", str(src), "-o", str(out), "--target", "none", "--verify", method,
                 "--report", str(report)]) == 0
    assert files_of(src.parent) == before
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("verification:"))
    verification = json.loads(report.read_text())["verification"]
    used = "whole" if method == "auto" else method  # a small model: auto checks it whole
    assert verification["method"] == used and verification["ok"] and verification["worst"]["relative_error"] < 1e-5
    assert ("block by block" in line) == (used == "blocks") and ("whole model" in line) == (used == "whole")
    if used == "blocks":
        assert verification["blocks"] == len(verification["per_block"]) >= 1 and "block" in verification["worst"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_on_a_terminal_for_every_phase_and_none_when_quiet(pruned, tmp_path, monkeypatch, quiet):
    src, _ = pruned
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    out = tmp_path / "p" / "model.onnx"
    out.parent.mkdir()
    assert main(["prune", str(src), "-o", str(out), "--target", "none", "--verify", "blocks"]
                + (["-q"] if quiet else [])) == 0
    text = err.getvalue()
    if quiet:
        assert text == ""
        return
    for phase in ("load", "pass prune-channels", "pass fold-constants", "save", "check", "verify, block by block"):
        assert phase in text, phase


def test_no_progress_bars_when_stderr_is_not_a_terminal(pruned, tmp_path, capsys):
    src, _ = pruned
    out = tmp_path / "p" / "model.onnx"
    out.parent.mkdir()
    assert main(["run", str(src), "-o", str(out), "--passes", "fold-constants", "--verify", "blocks"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "block by block" in captured.out
