"""Per-rule tests for ops that move channels around (rules_layout.py: Concat, Split, Slice, Pad;
rules_axes.py: Transpose, Squeeze; rules_reshape.py: Flatten, Reshape), on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.graphs import (
    INT64_MAX,
    GraphBuilder,
    attr,
    group_of_tensor,
    input_value,
    node_named,
    nodes_of,
    prune_ok,
    weight,
)
from tests.prune_helpers import layer_widths

# -- Concat ----------------------------------------------------------------------------------------


def test_concat_along_channels_removes_dead_channels_at_their_offsets():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    a = g.conv(x, 3, 4, dead=[1], name="conv_a")
    b = g.conv(x, 3, 6, dead=[0, 5], name="conv_b")
    cat = g.node("Concat", [a, b], axis=1, name="cat")
    g.output(g.conv(cat, 10, 5, name="conv2"))
    model = g.build()
    w2 = weight(model, "conv2")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv_a": (3, 3), "conv_b": (3, 4), "conv2": (7, 5)}
    # conv_a's channels sit at 0..3, conv_b's at 4..9: channel 1 and channels 4+0, 4+5 go.
    np.testing.assert_array_equal(weight(out, "conv2"), w2[:, [0, 2, 3, 5, 6, 7, 8]])
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[[1, 2, 3, 4]])


def test_concat_along_channels_with_negative_axis_and_three_inputs():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    a = g.conv(x, 3, 2, dead=[0], name="conv_a")
    b = g.conv(x, 3, 3, name="conv_b")
    c = g.conv(x, 3, 3, dead=[2], name="conv_c")
    cat = g.node("Concat", [a, b, c], axis=-3)
    g.output(g.conv(cat, 8, 4, name="conv2"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv_a": (3, 1), "conv_b": (3, 3), "conv_c": (3, 2), "conv2": (6, 4)}
    np.testing.assert_array_equal(weight(out, "conv2"), weight(model, "conv2")[:, [1, 2, 3, 4, 5, 6]])


def test_concat_with_a_constant_input_keeps_the_constant_channels():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    a = g.conv(x, 3, 4, dead=[1], name="conv_a")
    cat = g.node("Concat", [a, g.const("zeros", np.zeros((1, 2, 6, 6), np.float32))], axis=1, name="cat")
    g.output(g.conv(cat, 6, 3, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv_a": (3, 3), "conv2": (5, 3)}
    assert input_value(out, "cat", 1).shape == (1, 2, 6, 6)


def test_concat_along_spatial_axis_ties_channels_of_all_inputs():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    a = g.conv(x, 3, 4, dead=[1], name="conv_a")
    b = g.conv(x, 3, 4, dead=[1, 2], name="conv_b")
    cat = g.node("Concat", [a, b], axis=2)
    g.output(g.conv(cat, 4, 5, name="conv2"))
    result = prune_ok(g.build())
    # Channel 1 is dead in both inputs; channel 2 only in conv_b, so it stays.
    assert layer_widths(result.model) == {"conv_a": (3, 3), "conv_b": (3, 3), "conv2": (3, 5)}
    (d,) = group_of_tensor(result, "conv_a")
    assert sorted(d.group.producers) == ["conv_a", "conv_b"]
    assert (d.channels, d.dead, d.removed) == (4, 1, 1)


def test_concat_along_spatial_axis_with_constant_input_rewrites_the_constant():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    a = g.conv(x, 3, 4, dead=[2], name="conv_a")
    pad_rows = np.zeros((1, 4, 2, 6), np.float32)
    cat = g.node("Concat", [a, g.const("rows", pad_rows)], axis=2, name="cat")
    g.output(g.conv(cat, 4, 3, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv_a": (3, 3), "conv2": (3, 3)}
    assert input_value(out, "cat", 1).shape == (1, 3, 2, 6)


# -- Split -----------------------------------------------------------------------------------------


def _split_model(opset: int, sizes, dead, *, num_outputs_attr: bool = False):
    g = GraphBuilder(opset)
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=dead, name="conv1")
    if sizes is None:
        extra = {"num_outputs": 2} if num_outputs_attr else {}
        a, b = g.node("Split", [h], outputs=2, axis=1, name="split", **extra)
        sizes = [4, 4]
    else:
        a, b = g.node("Split", [h, g.ints("split_sizes", sizes)], outputs=2, axis=1, name="split")
    ya = g.conv(a, sizes[0], 3, name="conv_a")
    yb = g.conv(b, sizes[1], 3, name="conv_b")
    g.output(g.node("Add", [ya, yb]))
    return g.build()


def _split_sizes(model):
    node = node_named(model, "split")
    if len(node.input) > 1 and node.input[1]:
        return input_value(model, "split", 1).tolist()
    return attr(node, "split")


def test_split_with_explicit_equal_sizes_along_channels():
    model = _split_model(17, [4, 4], [1, 6])
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 6), "conv_a": (3, 3), "conv_b": (3, 3)}
    assert _split_sizes(out) == [3, 3]


def test_split_equal_along_channels_removes_dead_channels_from_each_part():
    model = _split_model(17, None, [1, 6])
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 6), "conv_a": (3, 3), "conv_b": (3, 3)}
    assert _split_sizes(out) == [3, 3]
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[:, [0, 1, 3]])


def test_split_with_explicit_sizes_along_channels():
    model = _split_model(17, [2, 6], [1, 3, 4])
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 5), "conv_a": (1, 3), "conv_b": (4, 3)}
    assert _split_sizes(out) == [1, 4]
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[:, [0, 3, 4, 5]])


def test_split_opset18_num_outputs_is_replaced_by_explicit_sizes():
    model = _split_model(18, None, [1, 6], num_outputs_attr=True)
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 6), "conv_a": (3, 3), "conv_b": (3, 3)}
    assert attr(node_named(out, "split"), "num_outputs") is None
    assert _split_sizes(out) == [3, 3]


def test_split_opset11_attribute_sizes_are_rewritten():
    g = GraphBuilder(11)
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[0, 7], name="conv1")
    a, b = g.node("Split", [h], outputs=2, axis=1, split=[3, 5], name="split")
    g.output(g.node("Add", [g.conv(a, 3, 3, name="conv_a"), g.conv(b, 5, 3, name="conv_b")]))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 6), "conv_a": (2, 3), "conv_b": (4, 3)}
    assert attr(node_named(out, "split"), "split") == [2, 4]


def test_split_part_with_every_channel_dead_keeps_one_channel():
    model = _split_model(17, [2, 6], [0, 1, 5])
    result = prune_ok(model)
    assert layer_widths(result.model) == {"conv1": (3, 6), "conv_a": (1, 3), "conv_b": (5, 3)}
    assert _split_sizes(result.model) == [1, 5]
    kept = [d.kept_dead for d in group_of_tensor(result, "conv1") if d.kept_dead]
    assert kept == [{"a tensor cannot be empty": 1}]


def test_concat_then_split_at_a_different_offset_removes_every_dead_channel():
    # cat = [conv_a (4, dead 3) | conv_b (4, dead 0)]; split [3, 5]: cat channels 3 and 4 (both dead) land in q.
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    cat = g.node("Concat", [g.conv(x, 3, 4, dead=[3], name="conv_a"), g.conv(x, 3, 4, dead=[0], name="conv_b")], axis=1)
    p, q = g.node("Split", [cat, g.ints("sizes", [3, 5])], outputs=2, axis=1, name="split")
    g.output(g.conv(p, 3, 2, name="conv_p"), g.conv(q, 5, 2, name="conv_q"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv_a": (3, 3), "conv_b": (3, 3), "conv_p": (3, 2), "conv_q": (3, 2)}
    assert _split_sizes(out) == [3, 3]


def test_split_along_spatial_axis_ties_channels():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=[2], name="conv1")
    a, b = g.node("Split", [h, g.ints("sizes", [2, 4])], outputs=2, axis=2, name="split")
    g.output(g.conv(a, 4, 3, name="conv_a"), g.conv(b, 4, 3, name="conv_b"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv_a": (3, 3), "conv_b": (3, 3)}
    assert input_value(out, "split", 1).tolist() == [2, 4]


# -- Slice -----------------------------------------------------------------------------------------


def _slice_inputs(g, starts, ends, axes, steps=None):
    ins = [g.ints("starts", starts), g.ints("ends", ends), g.ints("axes", axes)]
    if steps is not None:
        ins.append(g.ints("steps", steps))
    return ins


def _slice_params(model):
    return [input_value(model, "slice", i).tolist() if input_value(model, "slice", i) is not None else None for i in range(1, 5)]


def test_slice_contiguous_channels_only_keeps_channels_someone_reads():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[1, 5], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [2], [7], [1])], name="slice")  # channels 2..6
    g.output(g.conv(s, 5, 4, name="conv2"))
    model = g.build()
    out = prune_ok(model).model
    # 1 and 5 are dead; 0 and 7 are read by nobody, so they go as well.
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 4)}
    np.testing.assert_array_equal(weight(out, "conv1"), weight(model, "conv1")[[2, 3, 4, 6]])
    np.testing.assert_array_equal(weight(out, "conv2"), weight(model, "conv2")[:, [0, 1, 2, 4]])
    starts, ends, _, _ = _slice_params(out)
    assert np.arange(4)[slice(starts[0], ends[0])].tolist() == [0, 1, 2, 3]


def test_slice_contiguous_channels_with_second_consumer_gets_new_bounds():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[1, 5], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [2], [7], [1])], name="slice")
    g.output(g.conv(s, 5, 4, name="conv2"), g.conv(h, 8, 2, name="conv3"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 6), "conv2": (4, 4), "conv3": (6, 2)}
    starts, ends, axes, _ = _slice_params(out)
    # conv1 keeps 0,2,3,4,6,7: the slice wants old 2,3,4,6 = new 1..4.
    assert (starts, axes) == ([1], [1]) and ends[0] == 5


def test_slice_step2_on_channels_falls_back_to_gather_when_spacing_breaks():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[4], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [0], [8], [1], [2])], name="slice")  # 0, 2, 4, 6
    g.output(g.conv(s, 4, 3, name="conv2"), g.conv(h, 8, 2, name="conv3"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 7), "conv2": (3, 3), "conv3": (7, 2)}
    np.testing.assert_array_equal(weight(out, "conv2"), weight(model, "conv2")[:, [0, 1, 3]])
    # old 0, 2, 6 are new 0, 2, 5: not evenly spaced.
    (gather,) = nodes_of(out, "Gather")
    assert input_value(out, gather.name, 1).tolist() == [0, 2, 5]
    assert attr(gather, "axis") == 1


def test_slice_step2_on_channels_stays_strided_when_spacing_survives():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[7], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [0], [8], [1], [2])], name="slice")
    g.output(g.conv(s, 4, 3, name="conv2"), g.conv(h, 8, 2, name="conv3"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 7), "conv2": (4, 3), "conv3": (7, 2)}
    assert not nodes_of(out, "Gather")
    starts, ends, _, steps = _slice_params(out)
    assert np.arange(7)[slice(starts[0], ends[0], steps[0])].tolist() == [0, 2, 4, 6]


def test_slice_step2_dead_selected_channel_and_unread_channels_are_removed():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[2], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [0], [8], [1], [2])], name="slice")
    g.output(g.conv(s, 4, 3, name="conv2"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv2": (3, 3)}
    np.testing.assert_array_equal(weight(out, "conv1"), weight(model, "conv1")[[0, 4, 6]])


def test_slice_reversing_channels_keeps_positions_right():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 6, dead=[1], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [-1], [-INT64_MAX], [1], [-1])], name="slice")  # 5, 4, ..., 0
    g.output(g.conv(s, 6, 3, name="conv2"), g.conv(h, 6, 2, name="conv3"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 5), "conv2": (5, 3), "conv3": (5, 2)}
    np.testing.assert_array_equal(weight(out, "conv2"), weight(model, "conv2")[:, [0, 1, 2, 3, 5]])


def test_slice_on_spatial_axes_passes_channels_through():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    h = g.conv(x, 3, 6, dead=[1, 4], name="conv1")
    s = g.node("Slice", [h, *_slice_inputs(g, [0, 0], [INT64_MAX, INT64_MAX], [2, 3], [2, 2])], name="slice")
    g.output(g.conv(s, 6, 5, name="conv2"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 4), "conv2": (4, 5)}
    assert _slice_params(out) == _slice_params(model)


def test_slice_opset9_attribute_form_on_channels():
    g = GraphBuilder(9)
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 8, dead=[3], name="conv1")
    s = g.node("Slice", [h], starts=[1], ends=[6], axes=[1], name="slice")  # 1..5
    g.output(g.conv(s, 5, 3, name="conv2"), g.conv(h, 8, 2, name="conv3"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 7), "conv2": (4, 3), "conv3": (7, 2)}
    node = node_named(out, "slice")
    assert (attr(node, "starts"), attr(node, "ends")) == ([1], [5])


# -- Pad that adds channels (ResNet option-A shortcut) -------------------------------------------------


def _option_a(opset: int, dead0, dead_b):
    """r = relu(conv0(x)) [4 ch]; out = conv_b(r, stride 2) [8 ch] + Pad(r[:, :, ::2, ::2], 2 ch each side)."""
    g = GraphBuilder(opset)
    x = g.input("x", [1, 3, 8, 8])
    r = g.relu(g.conv(x, 3, 4, dead=dead0, name="conv0"))
    b = g.conv(r, 4, 8, stride=2, dead=dead_b, name="conv_b")
    sub = g.node("Slice", [r, *_slice_inputs(g, [0, 0], [INT64_MAX, INT64_MAX], [2, 3], [2, 2])], name="slice")
    pads = [0, 2, 0, 0, 0, 2, 0, 0]
    if opset >= 11:
        p = g.node("Pad", [sub, g.ints("pads", pads), g.const("pad_value", np.float32(0))], name="pad")
    else:
        p = g.node("Pad", [sub], pads=pads, value=0.0, name="pad")
    y = g.node("Add", [b, p])
    g.output(g.conv(g.relu(y), 8, 3, name="conv3"))
    return g.build()


def _pads(model):
    node = node_named(model, "pad")
    return attr(node, "pads") if attr(node, "pads") is not None else input_value(model, "pad", 1).tolist()


@pytest.mark.parametrize("opset", [17, 10])
def test_pad_channels_removes_padded_channels_dead_in_the_other_operand(opset):
    # Channels 0, 1, 6, 7 of the Add come from the zero padding; conv_b is dead at 0, 1, 3, 6.
    model = _option_a(opset, dead0=[], dead_b=[0, 1, 3, 6])
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv0": (3, 4), "conv_b": (4, 5), "conv3": (5, 3)}
    assert _pads(out) == [0, 0, 0, 0, 0, 1, 0, 0]
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[[2, 3, 4, 5, 7]])


def test_pad_channels_and_dead_shortcut_channel_removed_through_the_pad():
    # conv0 channel 2 is dead: it is channel 4 of the padded shortcut, where conv_b is dead too.
    model = _option_a(17, dead0=[2], dead_b=[0, 1, 3, 4, 6])
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv0": (3, 3), "conv_b": (3, 4), "conv3": (4, 3)}
    assert _pads(out) == [0, 0, 0, 0, 0, 1, 0, 0]
    np.testing.assert_array_equal(weight(out, "conv_b"), weight(model, "conv_b")[[2, 3, 5, 7]][:, [0, 1, 3]])


def test_pad_channels_read_only_by_a_conv_are_all_removed():
    # Pad adds 2 zero channels in front of conv1's 4; conv2 reads them: they are dead and the Pad's
    # channel padding should disappear entirely.
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=[1], name="conv1")
    p = g.node("Pad", [h, g.ints("pads", [0, 2, 0, 0, 0, 0, 0, 0]), g.const("v", np.float32(0))], name="pad")
    g.output(g.conv(p, 6, 3, name="conv2"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv2": (3, 3)}
    assert _pads(out) == [0, 0, 0, 0, 0, 0, 0, 0]


def test_pad_opset18_with_axes_input_on_the_channel_axis():
    # conv1 (4 ch) padded with 2 zero channels at the end via axes=[1]; Add with conv_b (6 ch).
    # Channel 1 is dead in both, channel 5 is padding where conv_b is dead; channel 4 is live in conv_b.
    g = GraphBuilder(18)
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=[1], name="conv1")
    p = g.node("Pad", [h, g.ints("pads", [0, 2]), g.const("v", np.float32(0)), g.ints("axes", [1])], name="pad")
    y = g.node("Add", [p, g.conv(x, 3, 6, dead=[1, 5], name="conv_b")])
    g.output(g.conv(y, 6, 3, name="conv2"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "conv_b": (3, 4), "conv2": (4, 3)}
    assert input_value(out, "pad", 1).tolist() == [0, 1]
    np.testing.assert_array_equal(weight(out, "conv2"), weight(model, "conv2")[:, [0, 2, 3, 4]])


def test_pad_channels_keeps_padded_channels_when_the_other_operand_is_live():
    result = prune_ok(_option_a(17, dead0=[], dead_b=[3]))
    assert layer_widths(result.model) == {"conv0": (3, 4), "conv_b": (4, 8), "conv3": (8, 3)}
    assert _pads(result.model) == [0, 2, 0, 0, 0, 2, 0, 0]


# -- Transpose / Squeeze -------------------------------------------------------------------------------


def test_transpose_to_nhwc_then_matmul_on_last_axis():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=[1], name="conv1")
    t = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    g.output(g.matmul(t, 4, 5, name="proj"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "proj": (3, 5)}
    np.testing.assert_array_equal(weight(out, "proj"), weight(model, "proj")[[0, 2, 3]])


def test_transpose_round_trip_then_conv():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    h = g.conv(x, 3, 4, dead=[0, 3], name="conv1")
    t = g.node("Transpose", [g.node("Relu", [g.node("Transpose", [h], perm=[0, 2, 3, 1])])], perm=[0, 3, 1, 2])
    g.output(g.conv(t, 4, 2, name="conv2"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"conv1": (3, 2), "conv2": (2, 2)}


def test_global_pool_squeeze_gemm():
    g = GraphBuilder()
    x = g.input("x", [2, 3, 6, 6])
    h = g.relu(g.conv(x, 3, 6, dead=[2, 3], name="conv1"))
    s = g.node("Squeeze", [g.node("GlobalAveragePool", [h]), g.ints("axes", [2, 3])])
    g.output(g.gemm(s, 6, 4, name="fc"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 4), "fc": (4, 4)}
    np.testing.assert_array_equal(weight(out, "fc"), weight(model, "fc")[:, [0, 1, 4, 5]])


# -- Flatten / Reshape into Gemm -------------------------------------------------------------------------

HW_KEEP = np.r_[0:16, 32:64]  # 4 channels x 4x4: channel 1's block is columns 16..31


def _conv_to_gemm(reshape, trans_b: int = 1, batch: int | str = 2):
    g = GraphBuilder()
    x = g.input("x", [batch, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 4, dead=[1], name="conv1"))
    h = reshape(g, h)
    g.output(g.gemm(h, 64, 5, trans_b=trans_b, name="fc"))
    return g.build()


@pytest.mark.parametrize("trans_b", [0, 1])
def test_flatten_then_gemm_removes_the_dead_channels_hw_block(trans_b):
    model = _conv_to_gemm(lambda g, h: g.node("Flatten", [h], axis=1), trans_b, batch="N")
    w = weight(model, "fc")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "fc": (48, 5)}
    expected = w[:, HW_KEEP] if trans_b else w[HW_KEEP]
    np.testing.assert_array_equal(weight(out, "fc"), expected)


@pytest.mark.parametrize(
    "target,expected",
    [([-1, 64], [-1, 48]), ([2, 64], [2, 48]), ([0, 64], [0, 48]), ([2, -1], [2, -1])],
    ids=["minus1_batch", "literal_batch", "zero_batch", "minus1_features"],
)
def test_reshape_to_n_chw_then_gemm_rewrites_target_shape(target, expected):
    model = _conv_to_gemm(lambda g, h: g.node("Reshape", [h, g.ints("target", target)], name="reshape"))
    w = weight(model, "fc")
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "fc": (48, 5)}
    np.testing.assert_array_equal(weight(out, "fc"), w[:, HW_KEEP])
    assert input_value(out, "reshape", 1).tolist() == expected


@pytest.mark.parametrize(
    "target,expected",
    [([2, 4, 16], [2, 3, 16]), ([0, 4, -1], [0, 3, -1]), ([-1, 4, 16], [-1, 3, 16]), ([0, 0, -1], [0, 0, -1])],
)
def test_reshape_to_b_c_hw_with_literal_channels_gets_its_shape_rewritten(target, expected):
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    h = g.relu(g.conv(x, 3, 4, dead=[1], name="conv1"))
    h = g.node("Reshape", [h, g.ints("target", target)], name="reshape")
    h = g.node("ReduceMean", [h], axes=[2], keepdims=0)
    g.output(g.gemm(h, 4, 5, name="fc"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "fc": (3, 5)}
    assert input_value(out, "reshape", 1).tolist() == expected
    np.testing.assert_array_equal(weight(out, "fc"), weight(model, "fc")[:, [0, 2, 3]])


def test_reshape_with_target_computed_from_the_input_shape_gets_its_literal_rewritten():
    # x.view(x.size(0), 64) as exporters write it: Concat(Gather(Shape(x), 0), [64]).
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 4, 4])
    h = g.relu(g.conv(x, 3, 4, dead=[1], name="conv1"))
    batch = g.node("Gather", [g.node("Shape", [h]), g.ints("zero", [0])], axis=0)
    shape = g.node("Concat", [batch, g.ints("features", [64])], axis=0, name="target")
    h = g.node("Reshape", [h, shape], name="flatten")
    g.output(g.gemm(h, 64, 5, name="fc"))
    model = g.build()
    out = prune_ok(model).model
    assert layer_widths(out) == {"conv1": (3, 3), "fc": (48, 5)}
    assert input_value(out, "target", 1).tolist() == [48]
    np.testing.assert_array_equal(weight(out, "fc"), weight(model, "fc")[:, HW_KEEP])
