"""Per-rule tests for Conv (plain, grouped, depthwise), Gemm and MatMul (rules_linear.py),
plus the planner's width policies, on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.graphs import (
    GraphBuilder,
    attr,
    bias_of,
    group_named,
    input_value,
    node_named,
    nodes_of,
    prune_ok,
    weight,
)
from tests.prune_helpers import layer_widths

EQUAL_GROUPS = "grouped Conv 'gconv' needs equal group sizes"


# -- grouped Conv ----------------------------------------------------------------------------------


def _grouped(c: int, group: int, *, dead_in=(), dead_out=(), gbias=None):
    """x -> conv1 (3 -> c) -> gconv (c -> c, ``group``) -> conv3 (c -> 3)."""
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, c, dead=dead_in, name="conv1")
    h = g.conv(h, c, c, group=group, dead=dead_out, bias_value=gbias, name="gconv")
    g.output(g.conv(h, c, 3, name="conv3"))
    return g.build()


def test_grouped_conv_keeps_dead_input_when_groups_would_become_unequal():
    result = prune_ok(_grouped(4, 2, dead_in=[0]))
    assert layer_widths(result.model) == {"conv1": (3, 4), "gconv": (4, 4), "conv3": (4, 3)}
    d = group_named(result, "conv1")
    assert (d.dead, d.removed, d.kept_dead) == (1, 0, {EQUAL_GROUPS: 1})


def test_grouped_conv_removes_one_dead_input_per_group():
    model = _grouped(4, 2, dead_in=[0, 2])
    w = weight(model, "gconv")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 2), "gconv": (2, 4), "conv3": (4, 3)}
    assert attr(node_named(out, "gconv"), "group") == 2
    np.testing.assert_array_equal(weight(out, "gconv"), w[:, [1]])


def test_grouped_conv_removes_one_dead_output_per_group():
    model = _grouped(4, 2, dead_out=[1, 3])
    w = weight(model, "gconv")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 4), "gconv": (4, 2), "conv3": (2, 3)}
    assert attr(node_named(out, "gconv"), "group") == 2
    np.testing.assert_array_equal(weight(out, "gconv"), w[[0, 2]])


def test_grouped_conv_keeps_dead_output_when_groups_would_become_unequal():
    result = prune_ok(_grouped(4, 2, dead_out=[1]))
    assert layer_widths(result.model) == {"conv1": (3, 4), "gconv": (4, 4), "conv3": (4, 3)}
    assert group_named(result, "gconv").kept_dead == {EQUAL_GROUPS: 1}


def test_grouped_conv_removes_a_whole_group_whose_inputs_and_outputs_are_dead():
    gbias = np.array([0.3, -0.2, 0.0, 0.0], np.float32)  # group 1's outputs: zero input, zero bias
    model = _grouped(4, 2, dead_in=[2, 3], gbias=gbias)
    w = weight(model, "gconv")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 2), "gconv": (2, 2), "conv3": (2, 3)}
    assert attr(node_named(out, "gconv"), "group") == 1
    np.testing.assert_array_equal(weight(out, "gconv"), w[:2])
    np.testing.assert_array_equal(bias_of(out, "gconv"), gbias[:2])


def test_grouped_conv_group4_removes_the_common_per_group_count_and_keeps_the_extra():
    # 8 -> 8, group 4 (2 per group). Inputs 0, 1 (both of group 0), 2, 5, 7 dead: one per group goes.
    model = _grouped(8, 4, dead_in=[0, 1, 2, 5, 7])
    w = weight(model, "gconv")
    result = prune_ok(model)
    out = result.model
    assert layer_widths(out) == {"conv1": (3, 4), "gconv": (4, 8), "conv3": (8, 3)}
    assert attr(node_named(out, "gconv"), "group") == 4
    # One input column per group stays. Groups 1-3 had one dead input each, so the live one stays
    # (channels 3, 4, 6: local positions 1, 0, 0); group 0 keeps one of its two dead inputs (either).
    new_w = weight(out, "gconv")
    np.testing.assert_array_equal(new_w[2:], w[np.arange(2, 8), np.repeat([1, 0, 0], 2)][:, None])
    assert any(np.array_equal(new_w[:2, 0], w[:2, j]) for j in (0, 1))
    d = group_named(result, "conv1")
    assert (d.dead, d.removed, d.kept_dead) == (5, 4, {EQUAL_GROUPS: 1})


def test_grouped_conv_group4_removes_one_dead_output_per_group():
    model = _grouped(8, 4, dead_out=[0, 3, 4, 7])
    w = weight(model, "gconv")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 8), "gconv": (8, 4), "conv3": (4, 3)}
    assert attr(node_named(out, "gconv"), "group") == 4
    np.testing.assert_array_equal(weight(out, "gconv"), w[[1, 2, 5, 6]])


# -- depthwise Conv ----------------------------------------------------------------------------------


def _depthwise(*, dead_in=(), mult: int = 1, dw_bias=None, dw_dead=(), k3: int = 3, pad3: int = 1):
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=dead_in, name="conv1")
    h = g.conv(h, 4, 4 * mult, group=4, dead=dw_dead, bias_value=dw_bias, name="dw")
    g.output(g.conv(h, 4 * mult, 3, k=k3, pad=pad3, name="conv3"))
    return g.build()


def test_depthwise_conv_dead_channel_is_removed_on_both_sides_and_group_adjusted():
    dw_bias = np.array([0.1, 0.0, 0.2, -0.3], np.float32)
    model = _depthwise(dead_in=[1], dw_bias=dw_bias)
    w = weight(model, "dw")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "dw": (3, 3), "conv3": (3, 3)}
    assert attr(node_named(out, "dw"), "group") == 3
    np.testing.assert_array_equal(weight(out, "dw"), w[[0, 2, 3]])
    np.testing.assert_array_equal(bias_of(out, "dw"), dw_bias[[0, 2, 3]])


def test_depthwise_conv_dead_output_row_removes_the_input_channel_feeding_it():
    out = prune_ok(_depthwise(dw_dead=[2])).model
    assert layer_widths(out) == {"conv1": (3, 3), "dw": (3, 3), "conv3": (3, 3)}
    assert attr(node_named(out, "dw"), "group") == 3


def test_depthwise_conv_with_nonzero_bias_on_dead_channel_folds_into_unpadded_conv():
    dw_bias = np.array([0.1, 0.4, 0.2, -0.3], np.float32)
    model = _depthwise(dead_in=[1], dw_bias=dw_bias, k3=1, pad3=0)
    w3, b3 = weight(model, "conv3"), bias_of(model, "conv3")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "dw": (3, 3), "conv3": (3, 3)}
    np.testing.assert_allclose(bias_of(out, "conv3"), b3 + 0.4 * w3[:, 1, 0, 0], rtol=1e-6, atol=1e-6)


def test_depthwise_conv_with_nonzero_bias_on_dead_channel_before_padded_conv_is_kept():
    dw_bias = np.array([0.1, 0.4, 0.2, -0.3], np.float32)
    result = prune_ok(_depthwise(dead_in=[1], dw_bias=dw_bias))
    assert layer_widths(result.model) == {"conv1": (3, 4), "dw": (4, 4), "conv3": (4, 3)}
    assert group_named(result, "conv1").removed == 0


def test_depthwise_conv_multiplier_2_removes_both_outputs_of_a_dead_input():
    dw_bias = np.array([0.1, 0.2, 0.0, 0.0, 0.3, 0.1, -0.1, 0.2], np.float32)
    model = _depthwise(dead_in=[1], mult=2, dw_bias=dw_bias)
    w = weight(model, "dw")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "dw": (3, 6), "conv3": (6, 3)}
    assert attr(node_named(out, "dw"), "group") == 3
    np.testing.assert_array_equal(weight(out, "dw"), w[[0, 1, 4, 5, 6, 7]])


def test_depthwise_conv_multiplier_2_keeps_input_when_one_of_its_outputs_is_live():
    result = prune_ok(_depthwise(mult=2, dw_dead=[2]))
    assert layer_widths(result.model) == {"conv1": (3, 4), "dw": (4, 8), "conv3": (8, 3)}


# -- ConvTranspose ---------------------------------------------------------------------------------------


def test_conv_transpose_loses_dead_input_rows_and_dead_output_columns():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 4, dead=[1], name="conv1"))
    w = g.rows((4, 5, 2, 2), [0, 3], axis=1)  # (in, out, kh, kw): outputs 0 and 3 dead
    b = g.bias(5, [0, 3])
    ins = [h, g.const("up.weight", w), g.const("up.bias", b)]
    h = g.node("ConvTranspose", ins, kernel_shape=[2, 2], strides=[2, 2], name="up")
    g.output(g.conv(h, 5, 2, name="conv3"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv3": (3, 2)}
    np.testing.assert_array_equal(weight(out, "up"), w[[0, 2, 3]][:, [1, 2, 4]])
    np.testing.assert_array_equal(bias_of(out, "up"), b[[1, 2, 4]])


def test_grouped_conv_transpose_is_a_barrier():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 4, dead=[1], name="conv1"))
    w = g.const("up.weight", g.randn(4, 2, 2, 2))
    h = g.node("ConvTranspose", [h, w], kernel_shape=[2, 2], strides=[2, 2], group=2, name="up")
    g.output(g.conv(h, 4, 2, name="conv3"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"conv1": (3, 4), "conv3": (4, 2)}
    assert "up" in result.report.plan.analysis.barriers


# -- Gemm --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
@pytest.mark.parametrize("with_c", [True, False], ids=["with_C", "no_C"])
def test_gemm_relu_gemm_removes_dead_hidden_units(trans_b, with_c):
    g = GraphBuilder()
    x = g.input("x", ["N", 6])
    h = g.gemm(x, 6, 8, dead=[2, 5], trans_b=trans_b, bias=with_c, name="fc1")
    g.output(g.gemm(g.relu(h), 8, 3, trans_b=trans_b, bias=with_c, name="fc2"))
    model = g.build()
    b1, b2 = weight(model, "fc1"), weight(model, "fc2")
    out = prune_ok(model).model
    keep = [0, 1, 3, 4, 6, 7]
    assert layer_widths(out) == {"fc1": (6, 6), "fc2": (6, 3)}
    if trans_b:
        np.testing.assert_array_equal(weight(out, "fc1"), b1[keep])
        np.testing.assert_array_equal(weight(out, "fc2"), b2[:, keep])
    else:
        np.testing.assert_array_equal(weight(out, "fc1"), b1[:, keep])
        np.testing.assert_array_equal(weight(out, "fc2"), b2[keep])
    if with_c:
        np.testing.assert_array_equal(bias_of(out, "fc1"), bias_of(model, "fc1")[keep])
        np.testing.assert_array_equal(bias_of(out, "fc2"), bias_of(model, "fc2"))
    else:
        assert len(node_named(out, "fc1").input) == 2 and len(node_named(out, "fc2").input) == 2


def test_gemm_mlp_three_layers_prunes_each_hidden_layer():
    g = GraphBuilder()
    x = g.input("x", [2, 10])
    h = g.relu(g.gemm(x, 10, 8, dead=[0, 7], name="fc1"))
    h = g.relu(g.gemm(h, 8, 6, dead=[3], trans_b=0, name="fc2"))
    g.output(g.gemm(h, 6, 4, name="fc3"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"fc1": (10, 6), "fc2": (6, 5), "fc3": (5, 4)}


@pytest.mark.parametrize("alpha,beta,with_c", [(1.0, 1.0, True), (2.0, 0.5, True), (1.5, 1.0, False)])
def test_gemm_constant_hidden_unit_is_folded_into_next_gemm_bias(alpha, beta, with_c):
    g = GraphBuilder()
    x = g.input("x", [2, 6])
    h = g.relu(g.gemm(x, 6, 8, const={2: 0.7, 5: -0.4}, name="fc1"))  # relu(0.7) = 0.7, relu(-0.4) = 0
    g.output(g.gemm(h, 8, 3, bias=with_c, alpha=alpha, beta=beta, name="fc2"))
    model = g.build()
    w2 = weight(model, "fc2")
    c2 = bias_of(model, "fc2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"fc1": (6, 6), "fc2": (6, 3)}
    # y = alpha * A @ B^T + beta * C must be unchanged.
    new_beta = attr(node_named(out, "fc2"), "beta", 1.0)
    expect = alpha * 0.7 * w2[:, 2] + (beta * c2 if with_c else 0.0)
    np.testing.assert_allclose(new_beta * bias_of(out, "fc2"), expect, rtol=1e-5, atol=1e-6)


def test_gemm_scalar_c_makes_zero_weight_units_constant_and_folds_them():
    g = GraphBuilder()
    x = g.input("x", [2, 6])
    h = g.relu(g.gemm(x, 6, 8, dead=[1, 6], c_value=np.float32(0.5), name="fc1"))
    g.output(g.gemm(h, 8, 3, name="fc2"))
    model = g.build()
    w2, c2 = weight(model, "fc2"), bias_of(model, "fc2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"fc1": (6, 6), "fc2": (6, 3)}
    assert bias_of(out, "fc1").shape == ()
    np.testing.assert_allclose(bias_of(out, "fc2"), c2 + 0.5 * (w2[:, 1] + w2[:, 6]), rtol=1e-5, atol=1e-6)


# -- MatMul --------------------------------------------------------------------------------------------


def _transformer_mlp(b1_values=None, act: str = "Relu"):
    g = GraphBuilder()
    x = g.input("x", ["B", 5, 6])
    h = g.matmul(x, 6, 8, dead=[1, 4], name="w1")
    b1 = g.randn(8) if b1_values is None else np.asarray(b1_values, np.float32)
    if b1_values is None:
        b1[[1, 4]] = 0.0
    h = g.node("Add", [h, g.const("b1", b1)], name="add_b1")
    h = g.node(act, [h])
    h = g.matmul(h, 8, 6, name="w2")
    g.output(g.node("Add", [h, g.const("b2", g.randn(6))], name="add_b2"))
    return g.build()


@pytest.mark.parametrize("act", ["Relu", "Tanh"])
def test_transformer_mlp_matmul_removes_dead_hidden_units_from_w1_bias_and_w2(act):
    model = _transformer_mlp(act=act)
    w1, w2, b1 = weight(model, "w1"), weight(model, "w2"), input_value(model, "add_b1", 1)
    out = prune_ok(model).model
    keep = [0, 2, 3, 5, 6, 7]
    assert layer_widths(out) == {"w1": (6, 6), "w2": (6, 6)}
    np.testing.assert_array_equal(weight(out, "w1"), w1[:, keep])
    np.testing.assert_array_equal(input_value(out, "add_b1", 1), b1[keep])
    np.testing.assert_array_equal(weight(out, "w2"), w2[keep])


def test_matmul_constant_hidden_unit_is_folded_into_an_added_bias():
    b1 = np.array([0.1, 0.9, -0.2, 0.3, -0.5, 0.2, 0.4, -0.1], np.float32)  # col 1 const 0.9, col 4 relu(-0.5)=0
    model = _transformer_mlp(b1_values=b1)
    w2 = weight(model, "w2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"w1": (6, 6), "w2": (6, 6)}
    added = [n for n in nodes_of(out, "Add") if n.name not in ("add_b1", "add_b2")]
    assert len(added) == 1 and added[0].input[0] != "w2"
    np.testing.assert_allclose(input_value(out, added[0].name, 1), 0.9 * w2[1], rtol=1e-6, atol=1e-7)


def test_matmul_2d_input_removes_dead_columns():
    g = GraphBuilder()
    x = g.input("x", [3, 6])
    h = g.relu(g.matmul(x, 6, 5, dead=[0], name="w1"))
    g.output(g.matmul(h, 5, 2, name="w2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"w1": (6, 4), "w2": (4, 2)}


# -- squeeze-and-excitation ----------------------------------------------------------------------------


def _se_block(trunk_dead=(), se_dead=(), se_const=None):
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    t = g.relu(g.conv(x, 3, 8, dead=trunk_dead, name="trunk"))
    s = g.node("GlobalAveragePool", [t])
    s = g.relu(g.conv(s, 8, 4, k=1, dead=se_dead, const=se_const, name="se_reduce"))
    s = g.node("Sigmoid", [g.conv(s, 4, 8, k=1, name="se_expand")])
    y = g.node("Mul", [t, s], name="se_mul")
    g.output(g.conv(y, 8, 5, name="head"))
    return g.build()


def test_se_block_dead_hidden_unit_is_removed():
    model = _se_block(se_dead=[1])
    out = prune_ok(model).model
    assert layer_widths(out) == {"trunk": (3, 8), "se_reduce": (8, 3), "se_expand": (3, 8), "head": (8, 5)}
    np.testing.assert_array_equal(weight(out, "se_expand"), weight(model, "se_expand")[:, [0, 2, 3]])


def test_se_block_dead_trunk_channel_is_removed_from_trunk_reduce_expand_and_head():
    model = _se_block(trunk_dead=[2, 5])
    keep = [0, 1, 3, 4, 6, 7]
    result = prune_ok(model)
    out = result.model
    assert layer_widths(out) == {"trunk": (3, 6), "se_reduce": (6, 4), "se_expand": (4, 6), "head": (6, 5)}
    np.testing.assert_array_equal(weight(out, "se_reduce"), weight(model, "se_reduce")[:, keep])
    np.testing.assert_array_equal(weight(out, "se_expand"), weight(model, "se_expand")[keep])
    np.testing.assert_array_equal(bias_of(out, "se_expand"), bias_of(model, "se_expand")[keep])
    np.testing.assert_array_equal(weight(out, "head"), weight(model, "head")[:, keep])
    assert sorted(group_named(result, "trunk").group.producers) == ["se_expand", "trunk"]


def test_se_block_constant_hidden_unit_is_folded_into_expand_bias():
    model = _se_block(trunk_dead=[0], se_const={3: 0.6})
    w, b = weight(model, "se_expand"), bias_of(model, "se_expand")
    out = prune_ok(model).model
    assert layer_widths(out) == {"trunk": (3, 7), "se_reduce": (7, 3), "se_expand": (3, 7), "head": (7, 5)}
    np.testing.assert_allclose(bias_of(out, "se_expand"), (b + 0.6 * w[:, 3, 0, 0])[1:], rtol=1e-6, atol=1e-6)


# -- constant channels through GlobalAveragePool ---------------------------------------------------------


def test_bias_only_conv_channel_through_global_pool_and_flatten_is_folded_into_gemm_bias():
    g = GraphBuilder()
    x = g.input("x", [2, 3, 6, 6])
    h = g.relu(g.conv(x, 3, 4, const={1: 1.5}, dead=[3], name="conv1"))
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    g.output(g.gemm(h, 4, 5, name="fc"))
    model = g.build()
    w, c = weight(model, "fc"), bias_of(model, "fc")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 2), "fc": (2, 5)}
    np.testing.assert_array_equal(weight(out, "fc"), w[:, [0, 2]])
    np.testing.assert_allclose(bias_of(out, "fc"), c + 1.5 * w[:, 1], rtol=1e-6, atol=1e-6)


# -- width policy and empty tensors ------------------------------------------------------------------


def _two_convs_for_rounding():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.relu(g.conv(x, 3, 16, dead=[0, 2, 3, 5, 7, 8, 11, 12, 15], name="conv1"))  # 7 live
    h = g.relu(g.conv(h, 16, 8, dead=[1, 4, 6], name="conv2"))  # 5 live
    g.output(g.conv(h, 8, 3, name="conv3"))
    return g.build()


def test_without_rounding_every_dead_channel_goes():
    out = prune_ok(_two_convs_for_rounding()).model
    assert layer_widths(out) == {"conv1": (3, 7), "conv2": (7, 5), "conv3": (5, 3)}


@pytest.mark.parametrize("n,expected", [(4, (8, 8)), (8, (8, 8)), (2, (8, 6)), (16, (16, 8))])
def test_round_to_n_keeps_widths_multiples_of_n_or_original(n, expected):
    result = prune_ok(_two_convs_for_rounding(), round_to_n=n)
    w1, w2 = expected
    assert layer_widths(result.model) == {"conv1": (3, w1), "conv2": (w1, w2), "conv3": (w2, 3)}
    for name, width, total in (("conv1", w1, 16), ("conv2", w2, 8)):
        assert width % n == 0 or width == total
        d = group_named(result, name)
        assert d.kept == width
        kept_for_policy = d.dead - d.removed
        assert d.kept_dead == ({f"--round-to {n}": kept_for_policy} if kept_for_policy else {})


def test_round_to_applies_to_a_layer_whose_output_is_split():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[1, 4, 5], name="conv1")
    p, q = g.node("Split", [h, g.ints("sizes", [3, 5])], outputs=2, axis=1)
    g.output(g.conv(p, 3, 2, name="conv_p"), g.conv(q, 5, 2, name="conv_q"))
    out = prune_ok(g.build(), round_to_n=4).model
    width = layer_widths(out)["conv1"][1]
    assert width % 4 == 0 or width == 8


def test_group_with_every_channel_dead_keeps_exactly_one():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.relu(g.conv(x, 3, 4, dead=[0, 1, 2, 3], name="conv1"))
    g.output(g.conv(h, 4, 5, name="conv2"))
    model = g.build()
    result = prune_ok(model)
    out = result.model
    assert layer_widths(out) == {"conv1": (3, 1), "conv2": (1, 5)}
    d = group_named(result, "conv1")
    assert (d.channels, d.dead, d.removed, d.kept) == (4, 4, 3, 1)
    assert d.kept_dead == {"a tensor cannot be empty": 1}
    np.testing.assert_array_equal(bias_of(out, "conv2"), bias_of(model, "conv2"))


def test_group_with_every_channel_dead_keeps_one_with_round_to():
    g = GraphBuilder()
    x = g.input("x", [2, 6])
    h = g.relu(g.gemm(x, 6, 8, dead=range(8), name="fc1"))
    g.output(g.gemm(h, 8, 3, name="fc2"))
    out = prune_ok(g.build(), round_to_n=4).model
    assert layer_widths(out) == {"fc1": (6, 4), "fc2": (4, 3)}
