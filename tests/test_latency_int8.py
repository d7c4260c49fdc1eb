"""The int8 latency target: widths chosen and checked on int8 kernels, float32 written (real ORT sessions)."""

from __future__ import annotations

import json

import onnx
import pytest

from onnxprune.api import inspect_model, prune_model
from onnxprune.cli import main
from onnxprune.latency import int8
from onnxprune.latency.cache import LatencyCache, cache_dir
from onnxprune.latency.layers import layer_specs
from onnxprune.latency.measure import measure
from onnxprune.latency.target import TARGETS, Int8Target, Target, make_target
from onnxprune.quantization import quantized_ops
from tests.prune_helpers import same_outputs

torch = pytest.importorskip("torch")
import models  # noqa: E402
from onnxprune.kill import kill_channels  # noqa: E402
from onnxprune.torch_export import export_onnx  # noqa: E402

LAYER_OPS = ("Conv", "Gemm", "MatMul")


@pytest.fixture(scope="module")
def dead_lenet5() -> onnx.ModelProto:
    """LeNet5 with 40 % of every prunable group's channels dead (batch dimension symbolic)."""
    torch.manual_seed(0)
    net = models.build("lenet5").eval()
    # TorchScript: its Flatten keeps the model's initializers all float32, which a test below relies on.
    return kill_channels(export_onnx(net, torch.rand(1, 1, 28, 28), exporter="torchscript"), 0.4, seed=1)[0]


def test_int8_target_is_listed_and_runs_the_model_quantized_on_the_cpu():
    target = make_target("ort-cpu-int8", threads=1, batch=2)
    assert "ort-cpu-int8" in TARGETS
    assert isinstance(target, Int8Target) and target.precision == "int8"
    assert target.providers == ("CPUExecutionProvider",)
    assert target.float_counterpart() == Target("ort-cpu", threads=1, batch=2)
    assert target.precision_info()["quantization"]["format"] == "QDQ"


def test_float_targets_run_the_model_as_given_and_the_int8_target_quantizes_it(dead_lenet5):
    assert Target("ort-cpu", threads=1).prepare(dead_lenet5) is dead_lenet5
    quantized = Int8Target("ort-cpu-int8", threads=1).prepare(dead_lenet5)
    assert "QuantizeLinear" in quantized_ops(quantized)
    assert Int8Target("ort-cpu-int8", threads=1).prepare(quantized) is quantized  # never quantized twice
    assert not quantized_ops(dead_lenet5)  # the input is left alone


def test_int8_layer_measurements_are_cached_apart_from_float32_ones(tmp_path, dead_lenet5):
    int8_target, float_target = Int8Target("ort-cpu-int8", threads=1), Target("ort-cpu", threads=1)
    assert int8_target.cache_id != float_target.cache_id
    specs = layer_specs(inspect_model(dead_lenet5)[0].graph)
    requests = [(s, s.in_width, s.out_width) for s in specs]
    int8_cache = LatencyCache(int8_target, tmp_path / "int8.json")
    assert measure(requests, int8_target, int8_cache) == len(specs)
    int8_cache.save()
    for spec in specs:
        entry = int8_cache.get(spec.key(spec.in_width, spec.out_width, 1))
        assert entry["us"] > 0 and entry["in_us"] >= 0 and entry["out_us"] >= 0
    assert measure(requests, int8_target, LatencyCache(int8_target, tmp_path / "int8.json")) == 0  # reused
    assert not LatencyCache(float_target, tmp_path / "int8.json").entries  # another fingerprint: never reused
    assert LatencyCache(float_target).path != LatencyCache(int8_target).path


def test_prune_for_int8_is_verified_and_writes_the_float32_model(tmp_path, dead_lenet5):
    out = tmp_path / "pruned.onnx"
    result = prune_model(dead_lenet5, output=out, target="ort-cpu-int8", threads=1)
    assert result.report.verification.ok
    assert same_outputs(dead_lenet5, result.model, seed=2)
    written = onnx.load(out)
    assert not quantized_ops(written)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in written.graph.initializer if t.dims)
    latency = result.report.latency
    assert latency["target"] == "ort-cpu-int8" and latency["precision"] == "int8"
    assert len([a for a in latency["attempts"] if a["accepted"]]) == 1


def test_the_ladder_times_the_quantized_input_beside_quantized_candidates(monkeypatch, dead_lenet5):
    timed: list[list[str]] = []
    original = Target.session

    def recording_session(self, model, *, profile=False):
        timed.append(quantized_ops(onnx.load_from_string(model)))
        return original(self, model, profile=profile)

    monkeypatch.setattr(Int8Target, "session", recording_session)
    result = prune_model(dead_lenet5, target="ort-cpu-int8", threads=1)
    attempts = [a for a in result.report.latency["attempts"] if "input_ms" in a]
    assert attempts, "the pruned candidates were timed against the input"
    assert len(timed) >= 2 and all("QuantizeLinear" in ops for ops in timed)  # every timed model ran in int8
    assert all(a["input_ms"] > 0 and a["output_ms"] > 0 for a in attempts)


def test_layers_slower_in_int8_are_named_as_in_the_given_model(monkeypatch, dead_lenet5):
    model = onnx.ModelProto()
    model.CopyFrom(dead_lenet5)
    layers = [n for n in model.graph.node if n.op_type in LAYER_OPS]
    layers[-1].name = ""  # an unnamed node cannot be excluded by name
    monkeypatch.setattr(int8, "SLOWER_MARGIN", 0.0)  # every layer counts as slower: checks the names, not speeds
    named = int8.layers_slower_in_int8(model, threads=1, batch=1, confirm=False)
    assert named == [n.name for n in layers[:-1]]


def test_layers_slower_in_int8_returns_a_subset_of_the_models_layers(dead_lenet5):
    names = {n.name for n in dead_lenet5.graph.node if n.op_type in LAYER_OPS}
    assert set(int8.layers_slower_in_int8(dead_lenet5, threads=1, batch=2)) <= names


def test_calibrate_measures_int8_kernels_into_the_int8_targets_cache(tmp_path, dead_lenet5, capsys):
    path = tmp_path / "dead.onnx"
    onnx.save(dead_lenet5, path)
    assert main(["calibrate", str(path), "--target", "ort-cpu-int8", "--threads", "1", "--batch", "3"]) == 0
    cache = LatencyCache(make_target("ort-cpu-int8", threads=1, batch=3))
    assert cache.path.parent == cache_dir() and cache.path.name.startswith("latency-ort-cpu-int8-")
    entries = json.loads(cache.path.read_text())["entries"]
    assert entries and all("in_us" in e for e in entries.values())


def test_report_section_of_an_int8_run_names_its_script_options_and_times_the_float32_input_beside():
    from benchmarks.report.sections import latency_targets

    timed = {k: {"median_ms": v} for k, v in
             {"input": 2.0, "input_again": 2.0, "none": 1.0, "round16": 1.5, "target": 1.0, "input_float32": 1.0}.items()}
    row = {"latency": timed, "noise_floor": 0.01, "attempts": [{"attempt": "latency model", "accepted": True}],
           "calibration_s": 1.0, "checks": {"target <= input": True, "target <= none": True, "target <= round16": True}}
    config = {"target": "ort-cpu-int8", "threads": 1, "batch": [1], "dead_fraction": 0.4, "rounds": 10,
              **Int8Target("ort-cpu-int8", threads=1).precision_info()}
    values = latency_targets("run", {"machine": {}, "config": config, "models": [{"model": "m", "batch1": row}]})
    assert values["script_args"] == " --target ort-cpu-int8 --threads 1"
    assert "int8 activations" in values["int8"]
    table = values["batches"][0]["table"]
    assert "float32 input" in table and "| m | 1 ms (0.50x) | 2 ms |" in table
