"""Per-rule tests for channel-wise ops (rules_pointwise.py) on small hand-built graphs.

Every test builds a model with dead channels, prunes it with verification on
ONNX Runtime, and asserts the exact widths that result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto

from tests.graphs import GraphBuilder, bias_of, group_named, input_value, live_reasons, prune_ok, weight
from tests.prune_helpers import layer_widths

DEAD = [1, 4]
KEEP = np.array([0, 2, 3, 5])  # of 6 channels


def _gelu_erf(g: GraphBuilder, x: str) -> str:
    """0.5 * x * (1 + erf(x / sqrt(2))), as exporters write Gelu before opset 20."""
    e = g.node("Erf", [g.node("Div", [x, g.const("sqrt2", np.float32(math.sqrt(2.0)))])])
    return g.node("Mul", [g.node("Mul", [x, g.node("Add", [e, g.const("one", np.float32(1))])]), g.const("half", np.float32(0.5))])


# name -> (opset, builder(g, x, channels) -> output). Every op maps 0 to 0.
ZERO_PRESERVING = {
    "relu": (17, lambda g, x, c: g.node("Relu", [x])),
    "leaky_relu": (17, lambda g, x, c: g.node("LeakyRelu", [x], alpha=0.1)),
    "prelu_scalar_slope": (17, lambda g, x, c: g.node("PRelu", [x, g.const("slope", np.array([0.2], np.float32))])),
    "prelu_channel_slope": (17, lambda g, x, c: g.node("PRelu", [x, g.const("slope", g.randn(c, 1, 1))], name="prelu")),
    "clip_inputs_form": (
        17,
        lambda g, x, c: g.node("Clip", [x, g.const("lo", np.float32(-1.0)), g.const("hi", np.float32(6.0))]),
    ),
    "clip_min_only": (17, lambda g, x, c: g.node("Clip", [x, g.const("lo", np.float32(0.0))])),
    "clip_attribute_form_opset10": (10, lambda g, x, c: g.node("Clip", [x], min=-1.0, max=6.0)),
    "clip_attribute_form_opset7": (7, lambda g, x, c: g.node("Clip", [x], min=0.0, max=6.0)),
    "hardswish": (17, lambda g, x, c: g.node("HardSwish", [x])),
    "swish_sigmoid_mul": (17, lambda g, x, c: g.node("Mul", [x, g.node("Sigmoid", [x])])),
    "gelu_opset20": (20, lambda g, x, c: g.node("Gelu", [x])),
    "gelu_tanh_opset20": (20, lambda g, x, c: g.node("Gelu", [x], approximate="tanh")),
    "gelu_erf_pattern": (17, lambda g, x, c: _gelu_erf(g, x)),
    "tanh": (17, lambda g, x, c: g.node("Tanh", [x])),
    "elu": (17, lambda g, x, c: g.node("Elu", [x])),
    "selu": (17, lambda g, x, c: g.node("Selu", [x])),
    "softsign": (17, lambda g, x, c: g.node("Softsign", [x])),
    "neg": (17, lambda g, x, c: g.node("Neg", [x])),
    "abs": (17, lambda g, x, c: g.node("Abs", [x])),
    "maxpool": (17, lambda g, x, c: g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])),
    "maxpool_padded": (17, lambda g, x, c: g.node("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "averagepool": (17, lambda g, x, c: g.node("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])),
    "averagepool_padded_count_include_pad": (
        17,
        lambda g, x, c: g.node("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    ),
    "lppool": (17, lambda g, x, c: g.node("LpPool", [x], kernel_shape=[2, 2], strides=[2, 2], p=2)),
    "global_max_pool": (17, lambda g, x, c: g.node("GlobalMaxPool", [x])),
    "reduce_mean_spatial": (17, lambda g, x, c: g.node("ReduceMean", [x], axes=[2, 3], keepdims=1)),
    "reduce_sum_spatial_opset18": (18, lambda g, x, c: g.node("ReduceSum", [x, g.ints("axes", [3])], keepdims=1)),
    "resize_nearest_x2": (
        17,
        lambda g, x, c: g.node("Resize", [x, "", g.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest"),
    ),
    "resize_sizes": (
        17,
        lambda g, x, c: g.node("Resize", [x, "", "", g.ints("sizes", [1, c, 4, 4])], mode="linear", name="resize"),
    ),
    "pad_spatial_zeros": (
        17,
        lambda g, x, c: g.node("Pad", [x, g.ints("pads", [0, 0, 1, 1, 0, 0, 1, 1]), g.const("v", np.float32(0))]),
    ),
    "pad_spatial_reflect": (
        17,
        lambda g, x, c: g.node("Pad", [x, g.ints("pads", [0, 0, 1, 1, 0, 0, 1, 1])], mode="reflect"),
    ),
    "identity": (17, lambda g, x, c: g.node("Identity", [x])),
    "dropout": (17, lambda g, x, c: g.node("Dropout", [x, g.const("ratio", np.float32(0.3))])),
    "dropout_training_false": (
        17,
        lambda g, x, c: g.node("Dropout", [x, g.const("ratio", np.float32(0.3)), g.const("train", np.array(False))]),
    ),
    "cast_float16_and_back": (
        17,
        lambda g, x, c: g.node("Cast", [g.node("Cast", [x], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT),
    ),
}


def _conv_op_conv(opset: int, build_op, dead=DEAD, c: int = 6, pad2: int = 1, k2: int = 3):
    g = GraphBuilder(opset)
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, c, dead=dead, name="conv1")
    h = build_op(g, h, c)
    y = g.conv(h, c, 5, k=k2, pad=pad2, name="conv2")
    g.output(y)
    return g.build()


@pytest.mark.parametrize("op", list(ZERO_PRESERVING))
def test_zero_preserving_op_passes_dead_conv_channel_to_next_conv(op):
    opset, build_op = ZERO_PRESERVING[op]
    model = _conv_op_conv(opset, build_op)
    w1, w2 = weight(model, "conv1"), weight(model, "conv2")
    result = prune_ok(model)
    out = result.model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    np.testing.assert_array_equal(weight(out, "conv1"), w1[KEEP])
    np.testing.assert_array_equal(bias_of(out, "conv1"), bias_of(model, "conv1")[KEEP])
    np.testing.assert_array_equal(weight(out, "conv2"), w2[:, KEEP])
    np.testing.assert_array_equal(bias_of(out, "conv2"), bias_of(model, "conv2"))
    d = group_named(result, "conv1")
    assert (d.channels, d.dead, d.removed, d.kept) == (6, 2, 2, 4)


def test_prelu_channel_slope_loses_the_dead_entries():
    opset, build_op = ZERO_PRESERVING["prelu_channel_slope"]
    model = _conv_op_conv(opset, build_op)
    slope = input_value(model, "prelu", 1)
    out = prune_ok(model).model
    np.testing.assert_array_equal(input_value(out, "prelu", 1), slope[KEEP])


def test_resize_with_sizes_gets_its_channel_size_rewritten():
    opset, build_op = ZERO_PRESERVING["resize_sizes"]
    out = prune_ok(_conv_op_conv(opset, build_op)).model
    assert input_value(out, "resize", 3).tolist() == [1, 4, 4, 4]


def test_clip_whose_range_excludes_zero_makes_a_constant_that_a_padded_conv_keeps():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=[2], name="conv1")
    h = g.node("Clip", [h, g.const("lo", np.float32(1.0)), g.const("hi", np.float32(6.0))])
    g.output(g.conv(h, 4, 3, name="conv2"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv1": (3, 4), "conv2": (4, 3)}
    d = group_named(result, "conv1")
    assert (d.live, d.dead, d.removed) == (4, 0, 0)
    assert "not zero where read by Conv 'conv2'" in live_reasons(result, "conv1")


@pytest.mark.parametrize("to", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["float16", "bfloat16"])
def test_constant_channel_through_cast_to_half_folds_the_rounded_value(to):
    # conv1 channel 1 is the constant 1000.3; float16 stores 1000.5, bfloat16 1000.0.
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, const={1: 1000.3}, name="conv1")
    h = g.node("Cast", [g.node("Cast", [h], to=to)], to=TensorProto.FLOAT)
    g.output(g.conv(h, 4, 3, k=1, pad=0, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv2": (3, 3)}


# -- Sigmoid: a dead channel becomes the constant 0.5 ------------------------------------------


def test_sigmoid_constant_channel_is_folded_into_unpadded_next_conv_bias():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, dead=DEAD, name="conv1")
    h = g.node("Sigmoid", [h])
    g.output(g.conv(h, 6, 5, k=3, pad=0, name="conv2"))
    model = g.build()
    w2, b2 = weight(model, "conv2"), bias_of(model, "conv2")
    result = prune_ok(model)
    out = result.model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    np.testing.assert_array_equal(weight(out, "conv2"), w2[:, KEEP])
    expected_bias = b2.astype(np.float64) + 0.5 * w2[:, DEAD].astype(np.float64).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(bias_of(out, "conv2"), expected_bias, rtol=1e-6, atol=1e-6)
    d = group_named(result, "conv1")
    assert (d.dead, d.removed) == (2, 2)


def test_sigmoid_constant_channel_is_folded_into_1x1_conv_without_bias():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.node("Sigmoid", [g.conv(x, 3, 6, dead=DEAD, name="conv1")])
    g.output(g.conv(h, 6, 5, k=1, bias=False, name="conv2"))
    model = g.build()
    w2 = weight(model, "conv2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    np.testing.assert_allclose(bias_of(out, "conv2"), 0.5 * w2[:, DEAD].sum(axis=(1, 2, 3)), rtol=1e-6, atol=1e-7)


def test_sigmoid_constant_channel_before_padded_conv_is_live_and_kept():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.node("Sigmoid", [g.conv(x, 3, 6, dead=DEAD, name="conv1")], name="sigmoid")
    g.output(g.conv(h, 6, 5, k=3, pad=1, name="conv2"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv1": (3, 6), "conv2": (6, 5)}
    d = group_named(result, "conv1")
    # 0.5 is not 0 at the zero-padded border: the engine counts the channels as live.
    assert (d.channels, d.live, d.dead, d.removed, d.kept_dead) == (6, 6, 0, 0, {})
    assert "not zero where read by Conv 'conv2'" in live_reasons(result, "sigmoid")
    assert result.report.plan.analysis.ctx.values["sigmoid"][DEAD].tolist() == [0.5, 0.5]


# -- BatchNormalization / InstanceNormalization ---------------------------------------------------


def test_batchnorm_zero_scale_zero_bias_channel_is_removed_with_its_parameters():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, name="conv1")  # conv1's rows are all live; BN kills channels 1 and 4
    h = g.batchnorm(h, 6, zero_scale=DEAD, name="bn")
    h = g.relu(h)
    g.output(g.conv(h, 6, 5, name="conv2"))
    model = g.build()
    params = [input_value(model, "bn", i) for i in range(1, 5)]
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    for i, p in enumerate(params, start=1):
        np.testing.assert_array_equal(input_value(out, "bn", i), p[KEEP])


def test_batchnorm_zero_scale_negative_bias_then_relu_is_dead_before_padded_conv():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.batchnorm(g.conv(x, 3, 6, name="conv1"), 6, zero_scale=[1], bias={1: -0.7}, name="bn")
    g.output(g.conv(g.relu(h), 6, 5, pad=1, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 5), "conv2": (5, 5)}


def test_batchnorm_zero_scale_nonzero_bias_is_folded_into_unpadded_conv():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.batchnorm(g.conv(x, 3, 6, name="conv1"), 6, zero_scale=[1, 4], bias={1: 0.8, 4: -0.3}, name="bn")
    g.output(g.conv(g.relu(h), 6, 5, k=1, pad=0, name="conv2"))
    model = g.build()
    w2, b2 = weight(model, "conv2"), bias_of(model, "conv2")
    result = prune_ok(model)
    out = result.model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    # relu(0.8) = 0.8 folds, relu(-0.3) = 0 needs nothing.
    np.testing.assert_allclose(bias_of(out, "conv2"), b2 + 0.8 * w2[:, 1, 0, 0], rtol=1e-6, atol=1e-6)


def test_batchnorm_zero_scale_nonzero_bias_is_folded_into_gemm_through_flatten():
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    h = g.batchnorm(g.conv(x, 3, 4, name="conv1"), 4, zero_scale=[2], bias={2: 0.6}, name="bn")
    h = g.node("Flatten", [h], axis=1)
    g.output(g.gemm(h, 64, 5, name="fc"))
    model = g.build()
    w, c = weight(model, "fc"), bias_of(model, "fc")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "fc": (48, 5)}
    keep = np.r_[0:32, 48:64]
    np.testing.assert_array_equal(weight(out, "fc"), w[:, keep])
    np.testing.assert_allclose(bias_of(out, "fc"), c + 0.6 * w[:, 32:48].sum(axis=1), rtol=1e-5, atol=1e-6)


def test_batchnorm_zero_scale_nonzero_bias_before_padded_conv_is_kept():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.batchnorm(g.conv(x, 3, 6, name="conv1"), 6, zero_scale=[1], bias={1: 0.8}, name="bn")
    g.output(g.conv(h, 6, 5, pad=1, name="conv2"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv1": (3, 6), "conv2": (6, 5)}
    assert group_named(result, "conv1").removed == 0


def test_instancenorm_zero_scale_zero_bias_channel_is_removed():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, name="conv1")
    scale, bias = g.randn(6) + 1.0, g.randn(6)
    scale[DEAD] = 0.0
    bias[DEAD] = 0.0
    h = g.node("InstanceNormalization", [h, g.const("in.scale", scale), g.const("in.bias", bias)], name="inorm")
    g.output(g.conv(g.relu(h), 6, 5, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    np.testing.assert_array_equal(input_value(out, "inorm", 1), scale[KEEP])
    np.testing.assert_array_equal(input_value(out, "inorm", 2), bias[KEEP])


def test_instancenorm_of_dead_channel_with_nonzero_bias_is_a_constant_folded_into_1x1_conv():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 4, dead=[3], name="conv1")
    scale, bias = g.randn(4) + 1.0, g.randn(4)
    h = g.node("InstanceNormalization", [h, g.const("in.scale", scale), g.const("in.bias", bias)], name="inorm")
    g.output(g.conv(h, 4, 5, k=1, pad=0, name="conv2"))
    model = g.build()
    w2, b2 = weight(model, "conv2"), bias_of(model, "conv2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv2": (3, 5)}
    np.testing.assert_allclose(bias_of(out, "conv2"), b2 + bias[3] * w2[:, 3, 0, 0], rtol=1e-5, atol=1e-6)


# -- Mul by a per-channel gate -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1)], ids=["1C11", "C11"])
@pytest.mark.parametrize("gate_first", [False, True], ids=["x_times_gate", "gate_times_x"])
def test_mul_by_zero_gate_entries_removes_channels_and_folds_the_rest_into_the_next_conv(shape, gate_first):
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, name="conv1")
    gate = (g.rng.random(shape) + 0.5).astype(np.float32)
    gate.reshape(-1)[DEAD] = 0.0
    gname = g.const("gate", gate)
    h = g.node("Mul", [gname, h] if gate_first else [h, gname], name="gate_mul")
    g.output(g.conv(h, 6, 5, name="conv2"))
    model = g.build()
    w2 = weight(model, "conv2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    assert not any(n.name == "gate_mul" for n in out.graph.node)  # its kept entries now scale conv2's inputs
    expected = w2[:, KEEP] * gate.reshape(-1)[KEEP][None, :, None, None]
    np.testing.assert_allclose(weight(out, "conv2"), expected, rtol=1e-6)


def test_mul_by_uniform_scalar_keeps_live_channels_and_passes_dead_ones():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.node("Mul", [g.conv(x, 3, 6, dead=DEAD, name="conv1"), g.const("s", np.float32(3.0))])
    g.output(g.conv(h, 6, 5, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}


def test_add_of_per_channel_bias_keeps_channel_with_nonzero_bias_entry():
    # A dead conv channel plus a constant c: channel 1 gets bias 0 (still dead), channel 4 gets 0.5 (live).
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, dead=DEAD, name="conv1")
    b = g.randn(1, 6, 1, 1)
    b[0, 1] = 0.0
    b[0, 4] = 0.5
    h = g.node("Add", [h, g.const("extra_bias", b)], name="add_bias")
    g.output(g.conv(h, 6, 5, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 5), "conv2": (5, 5)}
    np.testing.assert_array_equal(input_value(out, "add_bias", 1).reshape(-1), b.reshape(-1)[[0, 2, 3, 4, 5]])


# -- Add / Sub tie their operands ----------------------------------------------------------------


def _two_branches(op: str, dead_a, dead_b, c: int = 6):
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    a = g.conv(x, 3, c, dead=dead_a, name="conv_a")
    b = g.conv(x, 3, c, dead=dead_b, name="conv_b")
    g.output(g.conv(g.node(op, [a, b], name="join"), c, 5, name="conv2"))
    return g.build()


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_residual_join_removes_channel_dead_in_both_operands_only(op):
    model = _two_branches(op, dead_a=[1, 2], dead_b=[1, 3])
    result = prune_ok(model)
    assert layer_widths(result.model) == {"conv_a": (3, 5), "conv_b": (3, 5), "conv2": (5, 5)}
    keep = [0, 2, 3, 4, 5]
    np.testing.assert_array_equal(weight(result.model, "conv_a"), weight(model, "conv_a")[keep])
    np.testing.assert_array_equal(weight(result.model, "conv_b"), weight(model, "conv_b")[keep])
    np.testing.assert_array_equal(weight(result.model, "conv2"), weight(model, "conv2")[:, keep])
    d = group_named(result, "conv_a")
    assert sorted(d.group.producers) == ["conv_a", "conv_b"]
    assert (d.channels, d.live, d.dead, d.removed) == (6, 5, 1, 1)


@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_residual_join_keeps_channel_dead_in_one_operand_only(op):
    result = prune_ok(_two_branches(op, dead_a=[1], dead_b=[4]))
    assert layer_widths(result.model) == {"conv_a": (3, 6), "conv_b": (3, 6), "conv2": (6, 5)}
    assert group_named(result, "conv_a").removed == 0


def test_residual_add_with_graph_input_shortcut_keeps_channels():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 8, 8])
    h = g.conv(x, 4, 4, dead=[1], name="conv1")
    g.output(g.conv(g.node("Add", [h, x]), 4, 3, name="conv2"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv1": (4, 4), "conv2": (4, 3)}


def test_residual_add_three_way_chain_removes_channel_dead_everywhere():
    # ResNet-style: trunk = conv_a; trunk2 = trunk + conv_b(relu(trunk)); out = conv2(trunk2 + conv_c(trunk2))
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    t = g.conv(x, 3, 4, dead=[0, 2], name="conv_a")
    t2 = g.node("Add", [t, g.conv(g.relu(t), 4, 4, dead=[0, 3], name="conv_b")])
    t3 = g.node("Add", [t2, g.conv(g.relu(t2), 4, 4, dead=[0, 2], name="conv_c")])
    g.output(g.conv(t3, 4, 3, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv_a": (3, 3), "conv_b": (3, 3), "conv_c": (3, 3), "conv2": (3, 3)}
