"""The passes run before channel analysis: subnormal weights zeroed, input scales folded into weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.api import prune_model, run_passes
from passes.flush_subnormals import FlushSubnormalsPass, subnormal_mask
from passes.fold_input_scale import FoldInputScalePass
from tests.graphs import GraphBuilder, nodes_of
from tests.prune_helpers import layer_widths, prune_checked, same_outputs

SUBNORMAL = np.float32(1e-40)


def mlp(w1: np.ndarray, scale: np.ndarray | None = None, *, trans_b: bool = True) -> onnx.ModelProto:
    """x [n, K] (* scale) -> Gemm -> Relu -> Gemm."""
    b = GraphBuilder()
    x = b.input("x", ["n", w1.shape[1] if trans_b else w1.shape[0]])
    if scale is not None:
        x = b.node("Mul", [x, b.const("scale", scale)], name="gate")
    h = b.node("Gemm", [x, b.const("w1", w1)], name="fc1", transB=int(trans_b))
    width = w1.shape[0] if trans_b else w1.shape[1]
    w2 = b.rng.standard_normal((width, 3)).astype(np.float32)
    b.node("Gemm", [b.node("Relu", [h], name="relu"), b.const("w2", w2)], name="fc2", outputs=["y"])
    b.output("y")
    return b.build()


def test_subnormal_mask_finds_only_nonzero_subnormals():
    values = np.array([0.0, SUBNORMAL, -SUBNORMAL, np.finfo(np.float32).tiny, 1.0], np.float32)
    assert subnormal_mask(values).tolist() == [False, True, True, False, False]


def test_flush_subnormals_zeroes_them_and_keeps_the_function():
    w1 = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    w1[2, 3] = SUBNORMAL
    w1[4, :] = -SUBNORMAL
    result = run_passes(mlp(w1), [FlushSubnormalsPass()])
    out = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}["w1"]
    assert not subnormal_mask(out).any()
    assert out[2, 3] == 0 and not out[4].any()
    assert result.report.passes[-1].result.summary.startswith("9 subnormal")


def test_a_row_of_subnormal_weights_becomes_a_deleted_channel():
    w1 = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    w1[4, :] = SUBNORMAL
    out = prune_checked(mlp(w1)).model
    assert layer_widths(out)["fc1"] == (8, 5)


@pytest.mark.parametrize("trans_b", [True, False])
def test_input_scale_folds_into_gemm_weights(trans_b):
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((6, 8) if trans_b else (8, 6)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, (1, 8)).astype(np.float32)
    model = mlp(w1, scale, trans_b=trans_b)
    result = run_passes(model, [FoldInputScalePass()])
    assert not nodes_of(result.model, "Mul")
    assert same_outputs(model, result.model)


def test_scalar_scale_folds_into_matmul():
    b = GraphBuilder()
    x = b.node("Mul", [b.input("x", [2, 5, 8]), b.const("s", np.float32(1 / 255))], name="norm")
    b.node("MatMul", [x, b.const("w", b.rng.standard_normal((8, 4)))], name="mm", outputs=["y"])
    b.output("y")
    model = b.build()
    result = run_passes(model, [FoldInputScalePass()])
    assert not nodes_of(result.model, "Mul") and same_outputs(model, result.model)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_per_channel_scale_folds_into_padded_and_grouped_conv(group):
    b = GraphBuilder()
    scale = b.rng.uniform(0.1, 3.0, (1, 8, 1, 1)).astype(np.float32)
    scale[0, 3] = 0.0
    x = b.node("Mul", [b.input("x", [1, 8, 6, 6]), b.const("s", scale)], name="scale")
    w = b.rng.standard_normal((8, 8 // group, 3, 3)).astype(np.float32)
    b.node("Conv", [x, b.const("w", w)], name="conv", outputs=["y"], pads=[1, 1, 1, 1], group=group)
    b.output("y")
    model = b.build()
    result = run_passes(model, [FoldInputScalePass()])
    assert not nodes_of(result.model, "Mul") and same_outputs(model, result.model)


def test_scale_read_by_two_layers_or_broadcasting_the_input_is_left_alone():
    b = GraphBuilder()
    x = b.node("Mul", [b.input("x", [2, 8]), b.const("s", b.rng.random((1, 8)))], name="scale")
    b.node("MatMul", [x, b.const("w", b.rng.standard_normal((8, 4)))], name="a", outputs=["y"])
    b.node("Relu", [x], name="other", outputs=["z"])
    b.output("y", "z")
    assert not run_passes(b.build(), [FoldInputScalePass()]).report.passes[-1].result.modified

    b = GraphBuilder()
    x = b.node("Mul", [b.input("x", [2, 1]), b.const("s", b.rng.random((1, 8)))], name="widen")
    b.node("MatMul", [x, b.const("w", b.rng.standard_normal((8, 4)))], name="a", outputs=["y"])
    b.output("y")
    assert not run_passes(b.build(), [FoldInputScalePass()]).report.passes[-1].result.modified


def test_folded_input_gate_still_stops_the_layer_reading_rejected_pixels():
    rng = np.random.default_rng(2)
    gate = np.ones((1, 20), np.float32)
    gate[0, :8] = 0.0
    out = prune_checked(mlp(rng.standard_normal((6, 20)).astype(np.float32), gate)).model
    assert not nodes_of(out, "Mul")
    assert [n.op_type for n in out.graph.node][0] == "Gather"
    assert layer_widths(out)["fc1"] == (12, 6)


def test_target_times_the_choice_without_its_gather_too():
    rng = np.random.default_rng(3)
    gate = np.ones((1, 64), np.float32)
    gate[0, :24] = 0.0
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    w1[:8] = 0.0
    result = prune_model(mlp(w1, gate), target="ort-cpu", threads=1)
    names = [a["attempt"] for a in result.report.latency["attempts"]]
    assert any(n.endswith("every input read") for n in names), names
    assert same_outputs(mlp(w1, gate), result.model)


def test_a_gate_inside_the_graph_is_not_folded_so_its_zero_channels_are_deleted_upstream():
    b = GraphBuilder()
    h = b.node("Conv", [b.input("x", [1, 3, 8, 8]), b.const("w1", b.rng.standard_normal((8, 3, 3, 3)))], name="conv1")
    gate = np.ones((1, 8, 1, 1), np.float32)
    gate[0, [1, 5]] = 0.0
    g = b.node("Mul", [h, b.const("gate_values", gate)], name="gate")
    b.node("Conv", [g, b.const("w2", b.rng.standard_normal((4, 8, 3, 3)))], name="conv2", outputs=["y"])
    b.output("y")
    out = prune_checked(b.build()).model
    assert layer_widths(out)["conv1"] == (3, 6)


def test_scale_of_a_flattened_image_folds_into_the_first_gemm():
    b = GraphBuilder()
    flat = b.node("Flatten", [b.input("x", [2, 1, 4, 4])], name="flatten", axis=1)
    gate = b.rng.uniform(0.5, 2.0, (1, 16)).astype(np.float32)
    gate[0, :5] = 0.0
    x = b.node("Mul", [flat, b.const("gate", gate)], name="gate_mul")
    b.node("Gemm", [x, b.const("w", b.rng.standard_normal((6, 16)))], name="fc", outputs=["y"], transB=1)
    b.output("y")
    model = b.build()
    result = run_passes(model, [FoldInputScalePass()])
    assert not nodes_of(result.model, "Mul") and same_outputs(model, result.model)


def test_scale_before_a_gather_of_kept_features_folds_with_the_gathered_features():
    b = GraphBuilder()
    flat = b.node("Flatten", [b.input("x", [2, 1, 4, 4])], name="flatten", axis=1)
    x = b.node("Mul", [flat, b.const("gate", b.rng.uniform(0.5, 2.0, (1, 16)))], name="gate_mul")
    kept = b.node("Gather", [x, b.const("kept", np.array([1, 4, 9, -1], np.int64))], name="gather_kept", axis=1)
    b.node("Gemm", [kept, b.const("w", b.rng.standard_normal((6, 4)))], name="fc", outputs=["y"], transB=1)
    b.output("y")
    model = b.build()
    result = run_passes(model, [FoldInputScalePass()])
    assert not nodes_of(result.model, "Mul") and nodes_of(result.model, "Gather")
    assert same_outputs(model, result.model)


def test_scale_behind_a_layer_or_a_gather_across_the_batch_is_left_alone():
    b = GraphBuilder()
    h = b.node("Gemm", [b.input("x", [2, 8]), b.const("w0", b.rng.standard_normal((8, 8)))], name="fc0")
    x = b.node("Mul", [h, b.const("s", b.rng.random((1, 8)))], name="scale_mul")
    b.node("Gemm", [x, b.const("w", b.rng.standard_normal((8, 4)))], name="fc", outputs=["y"])
    b.output("y")
    assert not run_passes(b.build(), [FoldInputScalePass()]).report.passes[-1].result.modified

    b = GraphBuilder()
    x = b.node("Mul", [b.input("x", [2, 8]), b.const("s", b.rng.random((1, 8)))], name="scale_mul")
    rows = b.node("Gather", [x, b.const("rows", np.array([1, 0], np.int64))], name="gather_rows", axis=0)
    b.node("Gemm", [rows, b.const("w", b.rng.standard_normal((8, 4)))], name="fc", outputs=["y"])
    b.output("y")
    assert not run_passes(b.build(), [FoldInputScalePass()]).report.passes[-1].result.modified


def test_gate_left_after_a_silu_is_deleted_then_folded_into_the_next_layer():
    # x -> MatMul -> SiLU -> Mul(gate with zeros) -> MatMul: the zero-gated features go, the gate's
    # other factors move into the second MatMul's rows, and no Mul is left
    b = GraphBuilder()
    h = b.node("MatMul", [b.input("x", [2, 5, 8]), b.const("w1", b.rng.standard_normal((8, 6)))], name="fc1")
    h = b.node("Mul", [h, b.node("Sigmoid", [h])], name="silu")
    gate = np.asarray([0.0, 1.5, 0.0, 0.7, 1.1, 0.0], dtype=np.float32)
    h = b.node("Mul", [h, b.const("gate_values", gate)], name="gate")
    b.node("MatMul", [h, b.const("w2", b.rng.standard_normal((6, 4)))], name="fc2", outputs=["y"])
    b.output("y")
    model = b.build()
    result = prune_checked(model)
    assert layer_widths(result.model) == {"fc1": (8, 3), "fc2": (3, 4)}
    assert len(nodes_of(result.model, "Mul")) == 1  # the SiLU's; the gate is folded
    assert same_outputs(model, result.model)
