"""Layers stop reading zero input features their producer cannot drop (a graph input times a gate)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.prune_helpers import prune_checked, same_outputs


def gated_mlp(rejected, features=16, op="MatMul"):
    rng = np.random.default_rng(0)
    g = np.ones(features, np.float32)
    g[list(rejected)] = 0
    g[0] = 0.5
    w1 = rng.standard_normal((features, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    first = (helper.make_node("MatMul", ["xg", "w1"], ["h"], name="fc1") if op == "MatMul"
             else helper.make_node("Gemm", ["xg", "w1"], ["h"], name="fc1"))
    nodes = [helper.make_node("Mul", ["x", "g"], ["xg"], name="gate"), first,
             helper.make_node("Relu", ["h"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((g, "g"), (w1, "w1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def weight_shape(model, name):
    return next(list(t.dims) for t in model.graph.initializer if t.name == name)


def test_rejected_input_features_are_not_read_by_the_first_layer():
    for op in ("MatMul", "Gemm"):
        model = gated_mlp([1, 3, 5, 7, 9, 11], op=op)
        out = prune_checked(model).model
        ops = [n.op_type for n in out.graph.node]
        assert ops.index("Gather") < ops.index(op)
        assert weight_shape(out, "w1") == [10, 8]
        assert same_outputs(model, out)


def test_a_few_zero_features_are_not_worth_a_gather():
    model = gated_mlp([5])  # 1 of 16: below the 10 % threshold
    out = prune_checked(model).model
    assert "Gather" not in [n.op_type for n in out.graph.node]
    assert weight_shape(out, "w1") == [16, 8]
