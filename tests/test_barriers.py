"""Barriers: ops no rule covers (or covers only in some forms), graph outputs and non-constant weights.

A dead channel that reaches a barrier is kept; the report names the barrier node,
and the result still computes the same function.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.graphs import GraphBuilder, group_named, pin_reasons, prune_ok
from tests.prune_helpers import layer_widths

DEAD = [1, 4]


def _conv_op_conv(build_op, *, opset: int = 17, extra_opsets=None, out_shape=None, c: int = 6):
    g = GraphBuilder(opset, extra_opsets=extra_opsets)
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, c, dead=DEAD, name="conv1")
    h = build_op(g, h)
    g.output(g.conv(h, c, 5, name="conv2"), shape=out_shape)
    return g  # not built yet: a caller may add a function first


def _assert_nothing_removed(result, widths):
    assert layer_widths(result.model) == widths
    assert result.report.plan.removed_channels == 0
    assert not result.report.plan.changes_graph


def _assert_barrier(result, node: str, reason_part: str):
    barriers = result.report.plan.analysis.barriers
    assert node in barriers, f"{node} not in {barriers}"
    assert reason_part in barriers[node]


def test_lrn_has_no_rule_and_keeps_the_dead_channels_it_reads():
    model = _conv_op_conv(lambda g, h: g.node("LRN", [h], size=3, name="lrn")).build()
    result = prune_ok(model)
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "lrn", "no channel rule for LRN")
    d = group_named(result, "conv1")
    assert (d.dead, d.removed) == (2, 0)
    assert d.kept_dead == {"LRN 'lrn': no channel rule for LRN": 2}


def test_node_in_microsoft_domain_is_a_barrier():
    g = _conv_op_conv(
        lambda g, h: g.node("Gelu", [h], domain="com.microsoft", name="ms_gelu"),
        extra_opsets={"com.microsoft": 1},
        out_shape=[1, 5, 6, 6],
    )
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "ms_gelu", "no channel rule for com.microsoft.Gelu")


def test_model_local_function_in_custom_domain_is_a_barrier():
    # custom.MyRelu(x) = Relu(x) as a model-local function: maps 0 to 0, but no rule knows that.
    fn = helper.make_function(
        "custom",
        "MyRelu",
        ["X"],
        ["Y"],
        [helper.make_node("Relu", ["X"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    g = _conv_op_conv(
        lambda g, h: g.node("MyRelu", [h], domain="custom", name="my_relu"),
        extra_opsets={"custom": 1},
        out_shape=[1, 5, 6, 6],
    )
    g.functions.append(fn)
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "my_relu", "no channel rule for custom.MyRelu")


def test_dead_channel_reaching_a_graph_output_is_kept():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    feat = g.relu(g.conv(x, 3, 6, dead=DEAD, name="conv1"), name="features")
    g.output(feat, g.conv(feat, 6, 5, name="conv2"))
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    assert group_named(result, "conv1").kept_dead == {"reaches graph output 'features'": 2}
    assert result.report.plan.analysis.barriers == {}


def test_dead_channel_reaching_a_graph_output_is_kept_while_other_groups_prune():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    a = g.conv(x, 3, 4, dead=[0], name="conv_a")
    b = g.conv(x, 3, 4, dead=[2], name="conv_b")
    g.output(g.node("Concat", [a, g.relu(a)], axis=1, name="features"))  # conv_a reaches the output
    g.output(g.conv(g.relu(b), 4, 2, name="conv2"))  # conv_b does not
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv_a": (3, 4), "conv_b": (3, 3), "conv2": (3, 2)}
    assert group_named(result, "conv_a").kept_dead == {"reaches graph output 'features'": 1}


@pytest.mark.parametrize(
    "op,opset,axis",
    [("Softmax", 17, 1), ("Softmax", 11, 1), ("LogSoftmax", 17, -3), ("Softmax", 11, 0), ("Hardmax", 17, 1)],
)
def test_softmax_over_the_channel_axis_is_a_barrier(op, opset, axis):
    model = _conv_op_conv(lambda g, h: g.node(op, [h], axis=axis, name="softmax"), opset=opset).build()
    result = prune_ok(model)
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "softmax", "across the channel axis 1")


def test_softmax_over_a_spatial_axis_is_no_barrier_but_its_output_is_not_zero():
    model = _conv_op_conv(lambda g, h: g.node("Softmax", [h], axis=-1, name="softmax")).build()
    result = prune_ok(model)
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    assert result.report.plan.analysis.barriers == {}
    d = group_named(result, "conv1")
    assert (d.live, d.dead) == (6, 0)  # softmax of a zero row is 1/W, which conv2 reads


def test_layernorm_over_the_channel_axis_is_a_barrier_nchw():
    def ln(g, h):
        return g.node("LayerNormalization", [h, g.const("ln.scale", g.randn(6, 6, 6) + 1)], axis=1, name="ln")

    result = prune_ok(_conv_op_conv(ln).build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "ln", "normalises across the channel axis 1")


def test_layernorm_over_the_feature_axis_is_a_barrier_in_a_transformer_mlp():
    g = GraphBuilder()
    x = g.input("x", [2, 5, 6])
    h = g.matmul(x, 6, 8, dead=[1, 4], name="w1")
    h = g.node("LayerNormalization", [h, g.const("ln.scale", g.randn(8) + 1), g.const("ln.bias", g.randn(8))], axis=-1, name="ln")
    g.output(g.matmul(h, 8, 6, name="w2"))
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"w1": (6, 8), "w2": (8, 6)})
    _assert_barrier(result, "ln", "normalises across the channel axis 2")


def _shuffle(groups_shape: list[int]):
    def shuffle(g, h):
        h = g.node("Reshape", [h, g.ints("split_shape", groups_shape)], name="shuffle_split")
        h = g.node("Transpose", [h], perm=[0, 2, 1, 3, 4])
        return g.node("Reshape", [h, g.ints("merge_shape", [1, 6, 6, 6])], name="shuffle_merge")

    return shuffle


def test_channel_shuffle_is_followed_and_its_dead_channels_go():
    # 6 channels as 2 groups of 3; dead 1 and 4 are channel 1 of both groups: a product, so both go
    result = prune_ok(_conv_op_conv(_shuffle([1, 2, 3, 6, 6])).build())
    assert layer_widths(result.model) == {"conv1": (3, 4), "conv2": (4, 5)}


def test_channel_shuffle_keeps_dead_channels_that_would_leave_groups_unequal():
    # 3 groups of 2: dead 1 and 4 are channel 1 of group 0 and channel 0 of group 2, no product of
    # (groups, channels per group) without the live ones: both stay, and --explain says why
    result = prune_ok(_conv_op_conv(_shuffle([1, 3, 2, 6, 6])).build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    plan = result.report.plan
    assert "attention heads go whole" in {plan.reasons[r] for r in plan.keep_reason if r >= 0}


def test_reshape_with_a_shape_computed_in_a_way_not_followed_is_a_barrier():
    # target = [Shape(x)[0], Shape(x)[2] + 60]: the feature count is an Add the shape follower does not read
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 4, dead=[1], name="conv1"))
    batch = g.node("Gather", [g.node("Shape", [x]), g.ints("zero", [0])], axis=0)
    width = g.node("Gather", [g.node("Shape", [x]), g.ints("two", [2])], axis=0)
    features = g.node("Add", [width, g.ints("sixty", [60])])
    shape = g.node("Concat", [batch, features], axis=0)
    h = g.node("Reshape", [h, shape], name="flatten")
    g.output(g.gemm(h, 64, 5, name="fc"))
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 4), "fc": (64, 5)})
    _assert_barrier(result, "flatten", "target shape is computed in a way onnxprune does not follow")


@pytest.mark.parametrize("weights_as", ["conv", "matmul", "gemm"])
def test_layer_whose_weights_are_a_graph_input_is_a_barrier(weights_as):
    g = GraphBuilder()
    x = g.input("x", [1, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 6, dead=DEAD, name="conv1"))
    if weights_as == "conv":
        w = g.input("w", [5, 6, 3, 3])
        y = g.node("Conv", [h, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="layer2")
    elif weights_as == "matmul":
        w = g.input("w", [6, 5])
        channels_last = g.node("Transpose", [h], perm=[0, 2, 3, 1])
        y = g.node("MatMul", [channels_last, w], name="layer2")  # (1, 4, 4, 6) @ (6, 5): sums channels against data
    else:
        flat = g.node("Flatten", [h], axis=1)
        w = g.input("w", [5, 96])
        y = g.node("Gemm", [flat, w], transB=1, name="layer2")
    g.output(y)
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6)})
    assert "layer2" in result.report.plan.analysis.barriers


def test_conv_weights_from_graph_input_barrier_keeps_the_rest_prunable():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 6, dead=DEAD, name="conv1"))
    a = g.conv(h, 6, 4, dead=[0], name="conv2")  # conv2's dead channel 0 feeds only conv3: prunable
    w = g.input("w", [2, 6, 3, 3])
    b = g.node("Conv", [h, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="dyn_conv")
    g.output(g.conv(g.relu(a), 4, 2, name="conv3"), b)
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv1": (3, 6), "conv2": (6, 3), "conv3": (3, 2)}
    assert "dyn_conv" in result.report.plan.analysis.barriers
    assert any("dyn_conv" in r for r in pin_reasons(result, "conv1"))


def test_reduce_over_the_channel_axis_is_a_barrier():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, dead=DEAD, name="conv1")
    g.output(g.node("ReduceMean", [h], axes=[1], keepdims=1, name="mean_c"))
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6)})
    _assert_barrier(result, "mean_c", "reduces over the channel axis")


def test_gather_along_the_channel_axis_is_a_barrier():
    model = _conv_op_conv(lambda g, h: g.node("Gather", [h, g.ints("perm", [5, 4, 3, 2, 1, 0])], axis=1, name="gather")).build()
    result = prune_ok(model)
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "gather", "gathers along the channel axis")


def test_dropout_whose_mask_is_used_is_a_barrier():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, dead=DEAD, name="conv1")
    y, mask = g.node("Dropout", [h], outputs=2, name="dropout")
    g.output(g.conv(y, 6, 5, name="conv2"))
    g.output(g.node("Cast", [mask], to=TensorProto.FLOAT, name="mask_float"))
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "dropout", "extra outputs")


def test_maxpool_whose_indices_are_used_is_a_barrier():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, dead=DEAD, name="conv1")
    y, idx = g.node("MaxPool", [h], outputs=2, kernel_shape=[2, 2], strides=[2, 2], name="pool")
    g.output(g.conv(y, 6, 5, name="conv2"))
    g.output(idx, dtype=np.int64)
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "pool", "indices")


def test_tensor_read_inside_an_if_subgraph_is_a_barrier():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    cond = g.input("cond", [], dtype=np.bool_)
    h = g.conv(x, 3, 6, dead=DEAD, name="conv1")

    def branch(op: str, out: str):
        return helper.make_graph(
            [helper.make_node(op, [h], [out])],
            f"{op}_branch",
            [],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 6, 6, 6])],
        )

    y = g.node("If", [cond], name="if", then_branch=branch("Relu", "then_out"), else_branch=branch("Neg", "else_out"))
    g.output(g.conv(y, 6, 5, name="conv2"))
    result = prune_ok(g.build())
    _assert_nothing_removed(result, {"conv1": (3, 6), "conv2": (6, 5)})
    _assert_barrier(result, "if", "subgraphs")
