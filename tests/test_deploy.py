"""onnxprune deploy: each precision on real ONNX Runtime and OpenVINO sessions, checked on data, and every refusal
leaving nothing written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import build_parser, main
from onnxprune.deploy import KeepFloat, deploy
from onnxprune.deploy.keep_float import SlowerInInt8, keep_float_for
from onnxprune.deploy.precisions import choose_int8_mode
from onnxprune.latency.target import TARGETS
from onnxprune.quantization import quantized_ops
from tests.conftest import SHARED_DATA, shared_file

ROOT = Path(__file__).resolve().parents[1]
LENET5 = ROOT / "benchmarks" / "results" / "paper-table" / "mnist-lenet5-sbp.pruned.onnx"
# The model was trained on MNIST; 256 training images calibrate, 1000 test images check.
FAST = dict(calibration="mnist", data_dir=SHARED_DATA, calibration_samples=256, check_samples=1000, timing_budget_s=0.05,
            keep_float=KeepFloat())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["deploy", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """deploy results by (runtime, precision), made once for the module."""
    made = {}

    def get(runtime: str, precision: str):
        shared_file("mnist", "t10k-images-idx3-ubyte.gz")
        if (runtime, precision) not in made:
            out = tmp_path_factory.mktemp("deploy") / f"{runtime}-{precision}"
            made[runtime, precision] = deploy(LENET5, out, runtime=runtime, precision=precision, **FAST)
        return made[runtime, precision]

    return get


def tied_logits_model() -> onnx.ModelProto:
    """A Gemm whose ten logits differ by 1e-4 of their size: int8 cannot keep their order."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 1)) + 1e-4 * rng.standard_normal((16, 10))).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "tied",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("precision", ["int8", "fp16", "fp32"])
def test_each_precision_on_ort_writes_onnx_ort_and_operator_config_that_agree(deployed, precision):
    result = deployed("ort", precision)
    names = sorted(f.name for f in result.files)
    assert names == ["deploy.json", "model.onnx", "model.ort", "required_operators.config"]
    rows = {row["label"]: row for row in result.report["rows"]}
    assert list(rows) == ["input", "model.onnx", "model.ort"]
    assert rows["model.onnx"]["agreement_with_input"] >= 0.99
    assert rows["model.ort"]["agreement_with"]["model.onnx"] >= 0.99
    assert result.report["data"]["check_samples"] == 1000
    model = onnx.load(result.out_dir / "model.onnx")
    assert bool(quantized_ops(model)) == (precision == "int8")
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) == (precision == "fp16")


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_converted_models_leave_out_the_training_metadata_and_keep_the_version(deployed, precision):
    result = deployed("ort", precision)
    source = {p.key for p in onnx.load(LENET5, load_external_data=False).metadata_props}
    assert {"onnxprune.gates", "onnxprune.removed", "onnxprune.version"} <= source
    written = {p.key for p in onnx.load(result.out_dir / "model.onnx").metadata_props}
    assert not written & {"onnxprune.gates", "onnxprune.removed"} and "onnxprune.version" in written
    assert sorted(result.report["conversion"]["metadata_dropped"]) == ["onnxprune.gates", "onnxprune.removed"]


def test_the_ort_file_loads_in_onnx_runtime_and_computes_what_model_onnx_computes(deployed):
    out = deployed("ort", "int8").out_dir
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    ort_format = onnxruntime.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    onnx_format = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert (ort_format.run(None, {"input": x})[0].argmax(1) == onnx_format.run(None, {"input": x})[0].argmax(1)).all()
    config = (out / "required_operators.config").read_text()
    assert "QLinearConv" in config and str(out) not in config


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_openvino_ir_is_written_checked_and_run_at_the_precision_reported(deployed, precision):
    result = deployed("openvino", precision)
    assert sorted(f.name for f in result.files) == ["deploy.json", "model.bin", "model.xml"]
    rows = {row["label"]: row for row in result.report["rows"]}
    assert list(rows) == ["input", "input on OpenVINO", "model.xml"]
    assert rows["model.xml"]["agreement_with_input"] >= 0.99
    details = rows["model.xml"]["runtime_details"]
    assert details["inference_precision"] == "f32"
    kernels = {types for counts in details["layer_precisions"].values() for types in counts}
    if precision == "int8":
        assert any("i8 weights" in k for k in kernels)
    else:
        assert kernels == {"f32 activations, f32 weights"}  # fp32 stays fp32: no f16 weights in the IR


def test_the_report_holds_settings_data_rows_versions_and_machine(deployed):
    result = deployed("ort", "int8")
    report = json.loads((result.out_dir / "deploy.json").read_text())
    assert {"input", "output", "files", "settings", "conversion", "data", "check", "rows", "timing",
            "runtime_details", "versions", "machine"} <= set(report)
    assert report["settings"]["threads"] == [1, 2]
    assert report["conversion"]["mode"] == "static" and report["conversion"]["settings"]["format"] == "QDQ"
    assert report["conversion"]["layers_kept_float"] == []
    assert report["data"] == {**report["data"], "kind": "dataset", "source": "mnist", "calibration_samples": 256}
    assert {"onnxruntime", "onnx", "onnxprune"} <= set(report["versions"])
    row = report["rows"][1]
    assert {"size_bytes", "latency_ms", "agreement_with_input", "error"} <= set(row)
    assert set(row["latency_ms"]) == {"1", "2"} and row["latency_ms"]["1"]["median_ms"] > 0
    assert "model.onnx (int8)" in result.table()


def test_fp32_without_data_is_checked_on_random_inputs_and_says_so(tmp_path):
    result = deploy(LENET5, tmp_path / "out", precision="fp32", timing_budget_s=0.05)
    assert result.report["data"]["kind"] == "random"
    assert all(row["error"] is None for row in result.report["rows"])


def test_named_layers_stay_float32_in_int8(tmp_path):
    shared_file("mnist", "t10k-images-idx3-ubyte.gz")
    first_gemm = next(n.name for n in onnx.load(LENET5).graph.node if n.op_type == "Gemm")
    result = deploy(LENET5, tmp_path / "out", **{**FAST, "keep_float": [first_gemm]})
    model = onnx.load(result.out_dir / "model.onnx")
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    node = next(n for n in model.graph.node if n.name == first_gemm)
    assert node.input[1] not in dequantized
    assert result.report["conversion"]["layers_kept_float"] == [first_gemm]


def test_a_fixed_batch_model_that_fails_per_channel_int8_is_quantized_per_tensor_and_says_so(tmp_path):
    zoo = shared_file("pretrained", "onnx-zoo-mnist", "mnist-8.onnx")  # batch fixed at 1, biases as separate Adds
    result = deploy(zoo, tmp_path / "out", **{**FAST, "calibration_samples": 16, "check_samples": 50})
    conversion = result.report["conversion"]
    assert conversion["settings"]["per_channel"] is False and "per_channel_failed" in conversion
    assert conversion["calibration_batch_size"] == 1 and result.report["timing"]["batch"] == 1
    assert result.report["check"]["samples"] == 50


def test_the_cli_prints_a_table_and_writes_the_report_where_asked(tmp_path, capsys):
    code, out, err = run_cli(capsys, str(LENET5), "-o", str(tmp_path / "out"), "--precision", "fp16",
                             "--calibration", "digits", "--check-samples", "100", "--timing-budget", "0.05",
                             "--report", str(tmp_path / "r.json"), "--threads", "1")
    assert code == 0, err
    assert "ms, 1 thread" in out and "model.ort (fp16)" in out and "wrote" in out and "timed at batch 1 on" in out
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["precision"] == "fp16"


def refused(capsys, tmp_path: Path, *args: str, model: Path = LENET5) -> str:
    """Run deploy expecting a refusal: exit 2, one line on stderr, no output folder, the input untouched."""
    before = sha(model)
    code, _, err = run_cli(capsys, str(model), "-o", str(tmp_path / "out"), *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("onnxprune: error:")
    assert not (tmp_path / "out").exists()
    assert sha(model) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxprune-deploy-")]
    return err


def test_an_already_quantized_model_is_refused(deployed, tmp_path, capsys):
    err = refused(capsys, tmp_path, "--precision", "fp32", model=deployed("ort", "int8").out_dir / "model.onnx")
    assert "already quantized" in err


def test_calibration_data_of_the_wrong_shape_is_refused(tmp_path, capsys):
    np.savez(tmp_path / "small.npz", x=np.zeros((20, 1, 14, 14), np.float32))
    err = refused(capsys, tmp_path, "--calibration", str(tmp_path / "small.npz"))
    assert "(1, 14, 14)" in err and "(?, 1, 28, 28)" in err


@pytest.mark.parametrize("args, words", [
    (("--calibration", "mnist", "--data-dir", "/no/such/folder"), "MNIST not found"),
    (("--calibration", "missing.npz"), "no such file"),
    (("--calibration", "imagenet"), "unknown calibration data"),
    ((), "int8 needs --calibration"),
    (("--calibration", "digits", "--keep-float", "no_such_node"), "no_such_node"),
])
def test_bad_data_arguments_are_refused(tmp_path, capsys, args, words):
    assert words in refused(capsys, tmp_path, *args)


def test_below_min_agreement_nothing_is_written_and_the_numbers_are_on_stderr(tmp_path, capsys):
    model = tmp_path / "tied.onnx"
    onnx.save(tied_logits_model(), model)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(1).random((200, 16), dtype=np.float32))
    err = refused(capsys, tmp_path, "--calibration", str(tmp_path / "data.npz"), model=model)
    assert "below --min-agreement 99.00%" in err and "of 40 held-out samples" in err


def test_an_output_folder_that_is_the_input_or_holds_it_is_refused(tmp_path, capsys):
    inside = tmp_path / "out"
    inside.mkdir()
    model = inside / "model.onnx"
    model.write_bytes(LENET5.read_bytes())
    code, _, err = run_cli(capsys, str(model), "-o", str(inside), "--precision", "fp32")
    assert code == 2 and "would overwrite the input" in err and sha(model) == sha(LENET5)
    code, _, err = run_cli(capsys, str(model), "-o", str(model), "--precision", "fp32")
    assert code == 2 and "is the input model" in err and sha(model) == sha(LENET5)


def test_an_existing_folder_keeps_other_files_and_new_ones_respect_the_umask(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    old = os.umask(0o027)
    try:
        deploy(LENET5, out, precision="fp32", timing_budget_s=0.05)
        fresh = deploy(LENET5, tmp_path / "fresh", precision="fp32", timing_budget_s=0.05)
    finally:
        os.umask(old)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.ort").exists()
    assert (fresh.out_dir.stat().st_mode & 0o777) == 0o750
    assert all((f.stat().st_mode & 0o777) == 0o640 for f in fresh.files)


def test_int8_mode_is_dynamic_for_matmul_models_without_conv_and_static_otherwise():
    assert choose_int8_mode(tied_logits_model(), "auto", "ort") == "dynamic"
    assert choose_int8_mode(tied_logits_model(), "auto", "openvino") == "static"
    assert choose_int8_mode(onnx.load(LENET5), "auto", "ort") == "static"
    assert choose_int8_mode(onnx.load(LENET5), "dynamic", "ort") == "dynamic"


def test_keep_float_defaults_to_measured_layers_on_ort_and_none_elsewhere(monkeypatch):
    assert isinstance(keep_float_for(None, runtime="ort", threads=2), SlowerInInt8)
    assert type(keep_float_for(None, runtime="openvino", threads=2)) is KeepFloat
    monkeypatch.setattr("onnxprune.deploy.keep_float.MEASURING_MODULE", "onnxprune.latency.not_written_yet")
    keep = SlowerInInt8(threads=1)
    assert keep.layers(tied_logits_model()) == [] and "not available" in keep.describe()



def gemm_model(batch: int | str = "batch") -> onnx.ModelProto:
    """One Gemm, 16 features to 10 well-separated logits; ``batch`` fixes the batch size where it is an int."""
    w = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_deploy_at_batch_8_measures_keep_float_and_times_rows_at_batch_8(tmp_path):
    model = tmp_path / "gemm.onnx"
    onnx.save(gemm_model(), model)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(1).random((20, 16), dtype=np.float32))  # 4 held out
    result = deploy(model, tmp_path / "out", calibration=tmp_path / "data.npz", batch=8, threads=1, min_agreement=0.0,
                    timing_budget_s=0.05)
    assert result.report["timing"]["batch"] == 8 and "at batch 8" in result.report["timing"]["method"]
    assert "batch 8" in result.report["conversion"]["keep_float"]
    assert keep_float_for(None, runtime="ort", threads=1, batch=8).describe().endswith("batch 8)")


def test_batch_0_is_refused_before_anything_is_written(tmp_path, capsys):
    assert "--batch 0" in refused(capsys, tmp_path, "--precision", "fp32", "--batch", "0")


def test_a_fixed_batch_model_is_timed_at_its_batch_and_refuses_another(tmp_path, capsys):
    model = tmp_path / "fixed.onnx"
    onnx.save(gemm_model(batch=2), model)
    result = deploy(model, tmp_path / "ok", precision="fp32", check_samples=10, timing_budget_s=0.05)
    assert result.report["timing"]["batch"] == 2
    assert "fixed at 2" in refused(capsys, tmp_path, "--precision", "fp32", "--batch", "4", model=model)

def test_target_choices_come_from_the_latency_targets():
    parser = build_parser()
    for target in TARGETS:
        assert parser.parse_args(["prune", "in.onnx", "-o", "out.onnx", "--target", target]).target == target


def test_the_api_refuses_an_unknown_runtime_or_precision_and_the_cli_offers_every_runtime(tmp_path):
    from onnxprune.deploy import options
    from onnxprune.deploy.api import RUNTIMES
    from onnxprune.errors import InputError

    assert set(RUNTIMES) == set(options.RUNTIME_NAMES)
    for settings in ({"runtime": "tflite"}, {"precision": "int4"}):
        with pytest.raises(InputError, match="unknown"):
            deploy(LENET5, tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_an_int8_model_slower_than_its_input_on_ort_is_pointed_to_the_int8_target(deployed):
    from onnxprune.deploy.report import deploy_notes

    report = json.loads(json.dumps(deployed("ort", "int8").report))
    for row in report["rows"]:  # the int8 rows timed slower than the input, whatever this machine measured
        for timing in row["latency_ms"].values():
            timing["median_ms"] = 1.0 if row["label"].startswith("input") else 2.0
    hints = [n for n in deploy_notes(report) if "--target ort-cpu-int8" in n]
    assert len(hints) == 1 and f"--batch {report['timing']['batch']}" in hints[0]
    for row in report["rows"]:
        for timing in row["latency_ms"].values():
            timing["median_ms"] = 1.0
    assert not any("--target ort-cpu-int8" in n for n in deploy_notes(report))
