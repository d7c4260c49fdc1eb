"""The command line and file handling: bad input, external data, atomic writes, metadata."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from tests.conftest import shared_file
from tests.prune_helpers import layer_widths, same_outputs


def tiny_model(dead=(1, 3), channels=6, opset=17, ir=8, big=False) -> onnx.ModelProto:
    """Conv(3->C) -> Relu -> Conv(C->4): channels ``dead`` of the first conv are zero."""
    rng = np.random.default_rng(0)
    k = 64 if big else 3
    w1 = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(channels).astype(np.float32)
    w1[list(dead)] = 0
    b1[list(dead)] = 0
    w2 = rng.standard_normal((4, channels, k, k)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[(k - 1) // 2] * 2 + [k // 2] * 2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


PRUNE = ("prune", "--target", "none")  # exact widths; the latency-aware default has its own tests


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(tiny_model(), path)
    return path


def test_prune_command_writes_smaller_model_and_prints_table(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(*PRUNE, str(model_file), "-o", str(out), capsys=capsys)
    assert code == 0, err
    assert "conv1" in stdout and "6 -> 4" in stdout and "MACs" in stdout
    assert "verification: outputs match" in stdout
    pruned = onnx.load(out)
    assert layer_widths(pruned) == {"conv1": (3, 4), "conv2": (4, 4)}
    assert same_outputs(onnx.load(model_file), pruned)


def test_prune_records_what_was_removed_in_metadata(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert run_cli(*PRUNE, str(model_file), "-o", str(out), capsys=capsys)[0] == 0
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    removed = json.loads(props["onnxprune.removed"])
    assert removed["conv1"]["removed"] == [1, 3]
    assert removed["conv1"]["channels"] == 6


def test_input_file_is_never_modified(model_file, tmp_path, capsys):
    before = sha(model_file)
    run_cli(*PRUNE, str(model_file), "-o", str(tmp_path / "out.onnx"), capsys=capsys)
    assert sha(model_file) == before


def test_explain_and_report(model_file, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, stdout, _ = run_cli(
        *PRUNE, str(model_file), "-o", str(tmp_path / "o.onnx"), "--explain", "--report", str(report), capsys=capsys
    )
    assert code == 0
    assert "why kept" in stdout and "live" in stdout
    data = json.loads(report.read_text())
    assert data["before"]["macs"] > data["after"]["macs"]
    assert {"load", "analysis+rewrite", "verify", "save"} <= set(data["timings_s"])
    group = next(g for g in data["groups"] if g["group"] == "conv1")
    assert group["removed"] == 2 and group["removed_index"] == [1, 3]


def test_explain_names_a_graph_output_that_keeps_dead_channels(tmp_path, capsys):
    model = tiny_model()
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 6, 8, 8]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, stdout, _ = run_cli(*PRUNE, str(path), "-o", str(tmp_path / "o.onnx"), "--explain", capsys=capsys)
    assert code == 0
    assert "2 dead kept: reaches graph output 'r'" in stdout


def test_round_to_keeps_dead_channels_to_reach_a_multiple(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_model(dead=(0, 1, 2, 3, 4), channels=8), path)
    out = tmp_path / "o.onnx"
    assert run_cli(*PRUNE, str(path), "-o", str(out), "--round-to", "2", capsys=capsys)[0] == 0
    assert layer_widths(onnx.load(out))["conv1"] == (3, 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("this is not a model\n"), "not an ONNX model"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(tiny_model(big=True).SerializeToString()[:20000]), "truncated"),
        (lambda p: onnx.save(tiny_model(opset=30, ir=10), p), "opset 30 cannot be loaded by onnxruntime"),
    ],
    ids=["missing", "text", "empty", "truncated", "opset"],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, make, message):
    path = tmp_path / "bad.onnx"
    make(path)
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(*PRUNE, str(path), "-o", str(out), capsys=capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad.onnx"] if path.exists() else [])


def test_output_equal_to_input_is_refused(model_file, capsys):
    before = sha(model_file)
    code, _, err = run_cli(*PRUNE, str(model_file), "-o", str(model_file), capsys=capsys)
    assert code == 2 and "would overwrite the input" in err
    assert sha(model_file) == before


def test_output_in_missing_folder_is_refused(model_file, tmp_path, capsys):
    code, _, err = run_cli(*PRUNE, str(model_file), "-o", str(tmp_path / "nope" / "o.onnx"), capsys=capsys)
    assert code == 2 and "does not exist" in err


def save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)


def test_external_data_is_read_and_written(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    save_external(tiny_model(big=True), src, "m.weights")
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    code, _, err = run_cli(*PRUNE, str(src), "-o", str(out), capsys=capsys)
    assert code == 0, err
    assert (out.parent / "p.onnx.data").exists()
    pruned = onnx.load(out)  # loads the weights from p.onnx.data
    assert layer_widths(pruned)["conv1"] == (3, 4)
    assert same_outputs(onnx.load(src), pruned)


def test_missing_external_data_is_reported(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    save_external(tiny_model(), src, "m.weights")
    (tmp_path / "m.weights").unlink()
    code, _, err = run_cli(*PRUNE, str(src), "-o", str(tmp_path / "o.onnx"), capsys=capsys)
    assert code == 2 and "external data file 'm.weights'" in err and "missing" in err
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_external_data_is_reported(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    save_external(tiny_model(), src, "m.weights")
    data = tmp_path / "m.weights"
    data.write_bytes(data.read_bytes()[:100])
    code, _, err = run_cli(*PRUNE, str(src), "-o", str(tmp_path / "o.onnx"), capsys=capsys)
    assert code == 2 and "truncated" in err


def test_external_data_outside_the_model_folder_is_refused(tmp_path, capsys):
    inner = tmp_path / "models"
    inner.mkdir()
    src = inner / "m.onnx"
    save_external(tiny_model(), src, "m.weights")
    os.replace(inner / "m.weights", tmp_path / "secret.bin")
    model = onnx.load(src, load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(model, src)
    code, _, err = run_cli(*PRUNE, str(src), "-o", str(tmp_path / "o.onnx"), capsys=capsys)
    assert code == 2 and "outside the model's folder" in err


def test_passes_command_lists_every_pass(capsys):
    code, stdout, _ = run_cli("passes", capsys=capsys)
    assert code == 0
    for name in ("prune-channels", "fold-batchnorm", "remove-identity", "fold-constants", "infer-shapes", "cleanup"):
        assert name in stdout


def test_run_command_applies_a_pass_sequence(tmp_path, capsys):
    """fold-batchnorm then remove-identity on a Conv -> BN -> Identity model."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bn = [rng.random(4).astype(np.float32) + 0.5 for _ in range(4)]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Identity", ["n"], ["i"], name="id"),
        helper.make_node("Relu", ["i"], ["y"], name="relu"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in zip([w, *bn], ["w", "s", "b", "m", "v"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    code, stdout, err = run_cli("run", "--passes", "fold-batchnorm,remove-identity", str(src), "-o", str(out), capsys=capsys)
    assert code == 0, err
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv", "Relu"]
    assert same_outputs(model, onnx.load(out))


def test_run_command_rejects_unknown_pass(model_file, tmp_path, capsys):
    code, _, err = run_cli("run", "--passes", "nope", str(model_file), "-o", str(tmp_path / "o.onnx"), capsys=capsys)
    assert code == 2 and "unknown pass 'nope'" in err and "prune-channels" in err


def test_inspect_lists_groups_and_dead_channels(model_file, capsys):
    code, stdout, _ = run_cli("inspect", str(model_file), capsys=capsys)
    assert code == 0
    assert "conv1" in stdout and "2 dead channel(s)" in stdout and "would remove 2" in stdout


def test_module_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "onnxprune", "prune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--round-to" in result.stdout and "--explain" in result.stdout


def test_mnist8_from_the_model_zoo_prunes_after_zeroing_channels(tmp_path, capsys):
    """CNTK export, opset 8, IR 3: weights are also graph inputs, bias is a separate Add."""
    src = shared_file("pretrained", "onnx-zoo-mnist", "mnist-8.onnx")
    model = onnx.load(src)
    inits = {t.name: t for t in model.graph.initializer}

    def zero(name, idx):
        a = numpy_helper.to_array(inits[name]).copy()
        a[idx] = 0
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    zero("Parameter5", [2, 6])  # conv1 (8 channels) weights
    zero("Parameter6", [2, 6])  # and its bias Add
    zero("Parameter87", [0, 3, 5])  # conv2 (16 channels), read through Reshape -> MatMul
    zero("Parameter88", [0, 3, 5])
    dead = tmp_path / "mnist-dead.onnx"
    onnx.save(model, dead)
    out = tmp_path / "mnist-pruned.onnx"
    code, stdout, err = run_cli(*PRUNE, str(dead), "-o", str(out), capsys=capsys)
    assert code == 0, err
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == 3 and pruned.opset_import[0].version == 8
    widths = layer_widths(pruned)
    assert widths["Convolution28"] == (1, 6)
    assert widths["Convolution110"] == (6, 13)
    assert widths["Times212"] == (13 * 16, 10)
    inputs = [i.name for i in pruned.graph.input]
    assert inputs[0] == "Input3" and set(t.name for t in pruned.graph.initializer) <= set(inputs)
    assert same_outputs(model, pruned)


def test_ir_version_newer_than_the_runtime_is_lowered_not_refused(tmp_path, capsys):
    from onnxprune.runtime import max_loadable_ir

    newest = max_loadable_ir(tiny_model(ir=50))  # what the installed onnxruntime loads (1.31: 13, 1.32: 14)
    too_new = newest + 1
    src = tmp_path / f"ir{too_new}.onnx"
    onnx.save(tiny_model(ir=too_new), src)
    out = tmp_path / "o.onnx"
    code, stdout, err = run_cli(*PRUNE, str(src), "-o", str(out), capsys=capsys)
    assert code == 0, err
    assert f"IR version lowered from {too_new}" in stdout
    pruned = onnx.load(out)
    assert pruned.ir_version < too_new and layer_widths(pruned)["conv1"] == (3, 4)
    assert onnx.load(src).ir_version == too_new  # the input file is untouched


def test_a_warning_during_a_command_reads_as_one_line_for_the_user():
    from onnxprune.cli import format_warning_line

    line = format_warning_line(RuntimeWarning("RBP: 2 of 2 gates train for too few steps"), RuntimeWarning, "x.py", 1)
    assert line == "onnxprune: warning: RBP: 2 of 2 gates train for too few steps\n"
