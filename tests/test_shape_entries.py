"""Shape arithmetic exporters emit, as onnxprune/channels/shape_values.py follows it, on small hand-built graphs.

TorchScript computes attention's reshape targets at run time: ``[S, B * H, E // H]`` for
nn.MultiheadAttention (sequence first), torch.chunk's Slice bounds ``k * ((C + 2) // 3)`` from the
channel count, and an attention mask expanded to a computed shape behind its ``Where(Equal(s, -1), 1, s)``
guard, sized with Range. Each case: what the follower reads, and that pruning dead heads stays exact
(or, where a size it reads is itself pruned, that onnxprune keeps it and says why).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from onnxprune.channels.shape_values import (
    Computed,
    Dim,
    Quotient,
    quotient_value,
    shape_entries,
    static_ints,
    traced_dim,
)
from tests.graphs import GraphBuilder, group_of_tensor, input_value, node_named, prune_ok
from tests.prune_helpers import layer_widths

S, E, H, D = 4, 16, 4, 4  # sequence, embedding, heads, head size
DEAD_HEADS = (1, 3)


def _scalar(g: GraphBuilder, name: str, value: int) -> str:
    return g.const(name, np.asarray(value, dtype=np.int64))


def _dim(g: GraphBuilder, x: str, axis: int) -> str:
    """``x.size(axis)`` as TorchScript exports it: Gather(Shape(x), axis), a scalar."""
    return g.node("Gather", [g.node("Shape", [x]), _scalar(g, "axis", axis)], axis=0)


def _vec(g: GraphBuilder, scalar: str) -> str:
    return g.node("Unsqueeze", [scalar, g.ints("zero", [0])])


def onnx_tensor(value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value)


def _graph(build) -> gs.Graph:
    """The gs graph (shapes inferred) of a GraphBuilder model built by ``build(g)``, which declares its outputs."""
    g = GraphBuilder()
    build(g)
    return gs.import_onnx(onnx.shape_inference.infer_shapes(g.build(check=False)))


def _entries(graph: gs.Graph, name: str):
    return shape_entries(graph.tensors()[name], graph)


# -- shape entries -------------------------------------------------------------------------------------


def test_a_size_divided_by_a_constant_is_a_quotient_whose_value_is_known_where_the_size_is_static():
    def build(g):
        x = g.input("x", [S, "batch", E])
        head = g.node("Div", [_dim(g, x, 2), _scalar(g, "h", H)], name="head_dim")
        both = g.node("Div", [_dim(g, x, 1), _scalar(g, "h2", H)], name="batch_quarter")
        g.node("Concat", [_vec(g, head), _vec(g, both)], axis=0, name="target")
        g.output("target", dtype=np.int64)

    graph = _graph(build)
    head, quarter = _entries(graph, "target")
    assert isinstance(head, Quotient) and isinstance(head, Computed)  # read as computed by code that does not know it
    assert (head.tensor, head.axis, head.scale, head.divisor) == ("x", 2, 1, H)
    assert head.source is not None and head.source[1] == 0  # alone in Concat input 0: a rewrite may put a constant there
    assert quotient_value(head, graph.tensors().get) == E // H
    assert isinstance(quarter, Quotient) and quotient_value(quarter, graph.tensors().get) is None  # batch: symbolic


def test_a_size_times_and_divided_by_constants_stays_a_dim_where_the_division_is_exact():
    def build(g):
        x = g.input("x", [S, "batch", E])
        scaled = g.node("Mul", [_dim(g, x, 1), _scalar(g, "eight", 8)])
        g.node("Div", [scaled, _scalar(g, "two", 2)], name="out")
        g.output("out", dtype=np.int64)

    assert _entries(_graph(build), "out") == [Dim("x", 1, scale=4)]


def test_arithmetic_with_a_float_constant_is_not_followed():
    def build(g):
        x = g.input("x", [S, "batch", E])
        size = g.node("Cast", [_dim(g, x, 2)], to=1)
        g.node("Div", [size, g.const("four", np.asarray(4.0, dtype=np.float32))], name="out")
        g.output("out")

    assert _entries(_graph(build), "out") is None


@pytest.mark.parametrize(("minus", "follows"), [(-1, True), (-2, False)])
def test_torchscript_expand_guard_makes_its_minus_one_entries_one_only_where_shown(minus, follows):
    """Where(Equal(s, -1), 1, s), the -1s and 1s built from ConstantOfShape(Shape(s)) as TorchScript does."""

    def build(g):
        x = g.input("x", ["batch", S])
        s = g.node("Concat", [_vec(g, _dim(g, x, 0)), g.ints("m1", [-1]), _vec(g, _dim(g, x, 1))], axis=0)
        ones = g.node("ConstantOfShape", [g.node("Shape", [s])],
                      value=onnx_tensor(np.asarray([1], dtype=np.int64)))
        test = g.node("Equal", [s, g.node("Mul", [ones, _scalar(g, "minus", minus)])])
        g.node("Where", [test, ones, s], name="out")
        g.output("out", dtype=np.int64)

    entries = _entries(_graph(build), "out")
    if follows:
        assert [(type(e).__name__, getattr(e, "tensor", None), getattr(e, "axis", getattr(e, "value", None)))
                for e in entries] == [("Dim", "x", 0), ("Literal", None, 1), ("Dim", "x", 1)]
    else:
        assert entries is None


# -- static values ---------------------------------------------------------------------------------------


def test_torch_chunk_bounds_are_evaluated_from_the_static_channel_count_beside_a_symbolic_batch():
    def build(g):
        x = g.input("x", ["batch", S, 3 * E])
        last = g.node("Gather", [g.node("Shape", [x]), g.ints("last", [-1])], axis=0)
        chunk = g.node("Div", [g.node("Add", [last, g.ints("two", [2])]), g.ints("three", [3])])
        g.node("Mul", [chunk, g.ints("k", [2])], name="end")
        g.node("Gather", [g.node("Shape", [x]), g.ints("first", [0])], axis=0, name="batch")
        g.output("end", "batch", dtype=np.int64)

    graph = _graph(build)
    np.testing.assert_array_equal(static_ints(graph.tensors()["end"]), [2 * E])
    assert static_ints(graph.tensors()["batch"]) is None


def test_range_length_and_broadcasting_trace_a_mask_back_to_the_batch_size():
    """A mask built like TorchScript's: Range(0, batch) -> Unsqueeze -> Expand to [batch, 1, S, S]."""

    def build(g):
        x = g.input("x", ["batch", S, E])
        n = g.node("Range", [_scalar(g, "start", 0), _dim(g, x, 0), _scalar(g, "step", 1)], name="rows")
        rows = g.node("Unsqueeze", [n, g.ints("axes", [1, 2, 3])])
        target = g.node("Concat", [_vec(g, _dim(g, x, 0)), g.ints("rest", [1, S, S])], axis=0)
        g.node("Expand", [rows, target], name="mask")
        g.output("mask", dtype=np.int64)

    graph = _graph(build)
    mask = graph.tensors()["mask"]
    assert not isinstance(mask.shape[0], int) and mask.shape[0] != "batch"  # shape inference lost it
    assert traced_dim(mask, 0, graph.tensors().get) == "batch"
    assert traced_dim(mask, 1, graph.tensors().get) == 1


# -- pruning: nn.MultiheadAttention as TorchScript exports it (sequence first) ----------------------------


def _seq_first_attention(g: GraphBuilder, x: str, *, dead_heads=DEAD_HEADS, quotient_from: str | None = None) -> str:
    """Self-attention on ``x`` [S, B, E]: q, k, v reshaped to [S, B*H, E//H] by targets computed from ``x``'s
    (or ``quotient_from``'s) shape, then [B*H, S, D] products, merged back to [S, B, E] and projected."""
    sized = quotient_from or x
    dead = [c for h in dead_heads for c in range(h * D, (h + 1) * D)]

    def split(t: str, name: str) -> str:
        target = g.node("Concat", [
            _vec(g, _dim(g, x, 0)),
            _vec(g, g.node("Mul", [_dim(g, x, 1), _scalar(g, "heads", H)])),
            _vec(g, g.node("Div", [_dim(g, sized, 2), _scalar(g, "heads_div", H)])),
        ], axis=0, name=f"{name}_target")
        return g.node("Transpose", [g.node("Reshape", [t, target], name=f"{name}_split")], perm=[1, 0, 2])

    q = split(g.matmul(x, E, E, name="q_proj"), "q")
    k = split(g.matmul(x, E, E, name="k_proj"), "k")
    v = split(g.matmul(x, E, E, dead=dead, name="v_proj"), "v")
    scores = g.node("Softmax", [g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])])], axis=-1)
    heads = g.node("Transpose", [g.node("MatMul", [scores, v])], perm=[1, 0, 2])  # [S, B*H, D]
    merge = g.node("Concat", [_vec(g, _dim(g, x, 0)), _vec(g, _dim(g, x, 1)), _vec(g, _dim(g, x, 2))], axis=0)
    return g.matmul(g.node("Reshape", [heads, merge], name="merge"), E, E, name="out_proj")


def _kept_channels() -> int:
    return E - len(DEAD_HEADS) * D


def test_dead_heads_go_where_the_head_size_is_embed_dim_divided_by_the_head_count():
    g = GraphBuilder()
    x = g.input("x", [S, "batch", E])
    g.output(_seq_first_attention(g, x))
    result = prune_ok(g.build())
    kept = _kept_channels()
    assert layer_widths(result.model) == {"q_proj": (E, kept), "k_proj": (E, kept), "v_proj": (E, kept),
                                          "out_proj": (kept, E)}
    # ``batch * 4`` became ``batch * 2``: new nodes read the batch size and multiply it by the heads kept
    factors = {int(np.asarray(v).reshape(-1)[0]) for n in result.model.graph.node if n.op_type == "Mul"
               for i in range(2) if (v := input_value(result.model, n.name, i)) is not None}
    assert H - len(DEAD_HEADS) in factors
    # the merge target read E from x (static): now the channels kept, as a constant
    merge_target = {n.output[0]: n for n in result.model.graph.node}[node_named(result.model, "merge").input[1]]
    assert input_value(result.model, merge_target.name, 2).tolist() == [kept]


def test_with_no_dead_head_nothing_is_rewritten():
    g = GraphBuilder()
    x = g.input("x", [S, "batch", E])
    g.output(_seq_first_attention(g, x, dead_heads=()))
    model = g.build()
    result = prune_ok(model)
    assert result.report.plan.removed_channels == 0
    assert len(result.model.graph.node) == len(model.graph.node)


def test_a_head_count_in_a_target_another_reshape_shares_is_not_rewritten():
    """The q split's target also shapes a graph input: rewriting its ``batch * 4`` would change that too, so the
    heads stay (the target names the head count where onnxprune cannot change it alone)."""
    g = GraphBuilder()
    x = g.input("x", [S, "batch", E])
    z = g.input("z", [S, "batch", E])
    out = _seq_first_attention(g, x)
    g.output(out, g.node("Reshape", [z, "q_target"], name="z_split"))
    result = prune_ok(g.build())
    assert result.report.plan.removed_channels == 0
    assert layer_widths(result.model)["v_proj"] == (E, E)


def test_a_quotient_of_a_size_that_is_pruned_keeps_that_size_whole_and_stays_exact():
    """The read axis is pruned: the head size is ``Shape(y)[2] // 4`` where ``y`` has a dead channel of its own.
    Deleting it would change the quotient (15 // 4 = 3), so y keeps its channels (its Shape is a barrier to
    them, with the reason); the dead heads still go."""
    g = GraphBuilder()
    x = g.input("x", [S, "batch", E])
    y = g.matmul(x, E, E, dead=[5], name="y_proj")
    side = g.matmul(g.relu(y), E, 2, name="side")  # y's dead channel would be deletable here
    g.output(_seq_first_attention(g, x, quotient_from=y), side)
    result = prune_ok(g.build())
    widths = layer_widths(result.model)
    assert widths["y_proj"] == (E, E) and widths["side"] == (E, 2)
    assert widths["v_proj"] == (E, _kept_channels())
    (decision,) = group_of_tensor(result, y)
    assert (decision.dead, decision.removed) == (1, 0)
    assert any("read and used in a computation" in why for why in decision.kept_dead), decision.kept_dead


def test_a_head_size_divided_from_the_channel_count_of_the_split_tensor_itself_is_a_barrier():
    """The read axis is the one that loses the heads: ``Reshape(v, [S, B*4, Shape(v)[2] // 4])``. Deleting heads
    would change the quotient although the head size does not change, so v keeps its heads, exactly."""
    g = GraphBuilder()
    x = g.input("x", [S, "batch", E])
    dead = [c for h in DEAD_HEADS for c in range(h * D, (h + 1) * D)]
    v = g.matmul(x, E, E, dead=dead, name="v_proj")
    target = g.node("Concat", [
        _vec(g, _dim(g, x, 0)),
        _vec(g, g.node("Mul", [_dim(g, x, 1), _scalar(g, "heads", H)])),
        _vec(g, g.node("Div", [_dim(g, v, 2), _scalar(g, "heads_div", H)])),
    ], axis=0)
    split = g.node("Reshape", [v, target], name="v_split")  # [S, B*H, D]
    back = g.node("Concat", [_vec(g, _dim(g, x, 0)), _vec(g, _dim(g, x, 1)), g.ints("e", [E])], axis=0)
    g.output(g.matmul(g.node("Reshape", [g.relu(split), back], name="merge"), E, E, name="out_proj"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"v_proj": (E, E), "out_proj": (E, E)}
    (decision,) = group_of_tensor(result, v)
    assert decision.removed == 0 and decision.dead == len(dead)


def test_a_quotient_naming_the_channels_of_its_axis_is_rewritten_as_a_constant():
    """The merge back reads its width as ``Shape(w)[2] // 2`` of an unrelated [1, 1, 2E] input: it names
    the channel count of that axis, so the rewrite writes the channels kept there."""
    g = GraphBuilder()
    x = g.input("x", [S, "batch", E])
    w = g.input("w", [1, 1, 2 * E])
    dead = [c for h in DEAD_HEADS for c in range(h * D, (h + 1) * D)]
    v = g.matmul(x, E, E, dead=dead, name="v_proj")
    split = g.node("Reshape", [v, g.ints("split_shape", [0, 0, H, D])], name="v_split")
    width = g.node("Div", [_dim(g, w, 2), _scalar(g, "two", 2)])
    back = g.node("Concat", [_vec(g, _dim(g, x, 0)), _vec(g, _dim(g, x, 1)), _vec(g, width)], axis=0, name="back")
    merged = g.node("Reshape", [g.relu(split), back], name="merge")
    g.output(g.matmul(merged, E, E, name="out_proj"), g.node("Identity", [w], name="w_out"))
    result = prune_ok(g.build())
    assert layer_widths(result.model) == {"v_proj": (E, _kept_channels()), "out_proj": (_kept_channels(), E)}
    assert input_value(result.model, "back", 2).tolist() == [_kept_channels()]


# -- torch.chunk: Slice bounds computed from the channel count ---------------------------------------------


def _chunked_attention(g: GraphBuilder, x: str, *, bounds_from: str | None = None) -> str:
    """[B, S, E] -> packed qkv [B, S, 3E] -> torch.chunk(3, -1) as TorchScript writes it (bounds
    ``k * ((C + 2) // 3)`` from ``Shape(qkv)[-1]``, or from ``bounds_from``'s) -> heads -> merged back."""
    dead = [part * E + c for part in range(3) for h in DEAD_HEADS for c in range(h * D, (h + 1) * D)]
    qkv = g.matmul(x, E, 3 * E, dead=dead, name="qkv_proj")
    last = g.node("Gather", [g.node("Shape", [bounds_from or qkv]), g.ints("last", [-1])], axis=0)
    chunk = g.node("Div", [g.node("Add", [last, g.ints("two", [2])]), g.ints("three", [3])])
    ends = [g.node("Mul", [chunk, g.ints(f"k{k}", [k])]) for k in (1, 2, 3)]
    starts = [g.ints("zero_start", [0])] + ends[:2]
    heads = []
    for k, name in enumerate("qkv"):
        part = g.node("Slice", [qkv, starts[k], ends[k], g.ints("axis", [-1])], name=f"chunk_{name}")
        split = g.node("Reshape", [part, g.ints("split_shape", [0, 0, H, D])])
        heads.append(g.node("Transpose", [split], perm=[0, 2, 1, 3]))
    q, k, v = heads
    scores = g.node("Softmax", [g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    out = g.node("Transpose", [g.node("MatMul", [scores, v])], perm=[0, 2, 1, 3])
    return g.matmul(g.node("Reshape", [out, g.ints("merge_shape", [0, 0, E])]), E, E, name="out_proj")


def test_torch_chunk_slices_follow_the_dead_heads_and_become_constants():
    g = GraphBuilder()
    x = g.input("x", ["batch", S, E])
    g.output(_chunked_attention(g, x))
    result = prune_ok(g.build())
    kept = _kept_channels()
    assert layer_widths(result.model) == {"qkv_proj": (E, 3 * kept), "out_proj": (kept, E)}
    for k, name in enumerate("qkv"):
        bounds = [input_value(result.model, f"chunk_{name}", i).tolist() for i in (1, 2)]
        assert bounds == [[k * kept], [(k + 1) * kept]]


def test_torch_chunk_bounds_read_from_another_tensor_that_loses_channels_keep_it_whole():
    """The bounds read the channel count of ``y``, not of the sliced tensor: y's dead channel stays."""
    g = GraphBuilder()
    x = g.input("x", ["batch", S, E])
    y = g.matmul(x, E, 3 * E, dead=[7], name="y_proj")
    g.output(_chunked_attention(g, x, bounds_from=y), g.matmul(g.relu(y), 3 * E, 2, name="side"))
    result = prune_ok(g.build())
    widths = layer_widths(result.model)
    assert widths["y_proj"] == (E, 3 * E) and widths["qkv_proj"] == (E, 3 * _kept_channels())


# -- an attention mask expanded to a computed shape (TorchScript's Expand guard) ---------------------------


def _masked_attention(g: GraphBuilder, x: str, mask: str, heads_entry: str) -> str:
    """Batch-first attention whose scores get ``Expand(mask[:, None, None, :], Where(Equal(s, -1), 1, s))`` with
    ``s = [B, heads_entry, S, S]``."""
    dead = [c for h in DEAD_HEADS for c in range(h * D, (h + 1) * D)]

    def split(name: str, dead_rows=()) -> str:
        t = g.matmul(x, E, E, dead=dead_rows, name=f"{name}_proj")
        return g.node("Transpose", [g.node("Reshape", [t, g.ints("split_shape", [0, 0, H, D])])], perm=[0, 2, 1, 3])

    q, k, v = split("q"), split("k"), split("v", dead)
    s = g.node("Concat", [_vec(g, _dim(g, x, 0)), heads_entry, _vec(g, _dim(g, x, 1)), _vec(g, _dim(g, x, 1))], axis=0)
    ones = g.node("ConstantOfShape", [g.node("Shape", [s])], value=onnx_tensor(np.asarray([1], dtype=np.int64)))
    guard = g.node("Where", [g.node("Equal", [s, g.node("Mul", [ones, _scalar(g, "minus", -1)])]), ones, s])
    expanded = g.node("Expand", [g.node("Unsqueeze", [mask, g.ints("mask_axes", [1, 2])]), guard], name="mask_4d")
    scores = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 1, 3, 2])])
    probs = g.node("Softmax", [g.node("Add", [scores, expanded], name="masked")], axis=-1)
    out = g.node("Transpose", [g.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    return g.matmul(g.node("Reshape", [out, g.ints("merge_shape", [0, 0, E])]), E, E, name="out_proj")


def test_a_mask_expanded_behind_torchscripts_guard_broadcasts_along_the_heads():
    g = GraphBuilder()
    x, mask = g.input("x", ["batch", S, E]), g.input("mask", ["batch", S])
    g.output(_masked_attention(g, x, mask, g.ints("keep", [-1])))
    result = prune_ok(g.build())
    assert layer_widths(result.model)["v_proj"] == (E, _kept_channels())
    assert layer_widths(result.model)["out_proj"] == (_kept_channels(), E)


def test_a_mask_expanded_along_the_heads_keeps_them():
    """Expanded to [B, H, S, S] the mask has a row per head (the same, but onnxprune does not assume it)."""
    g = GraphBuilder()
    x, mask = g.input("x", ["batch", S, E]), g.input("mask", ["batch", S])
    g.output(_masked_attention(g, x, mask, g.ints("per_head", [H])))
    result = prune_ok(g.build())
    assert layer_widths(result.model)["v_proj"] == (E, E)


# -- a size read into a target, of a tensor that loses channels on its own ---------------------------------


def test_a_static_size_read_into_a_heads_target_from_a_tensor_that_loses_channels_keeps_them():
    """The merge back reads its width as ``Shape(y)[2]``, y with a dead channel of its own: the rewrite would
    put a constant there only if the heads changed, so y keeps its channels (and the model its shape)."""
    g = GraphBuilder()
    x = g.input("x", ["batch", S, E])
    y = g.matmul(x, E, E, dead=[3], name="y_proj")
    side = g.matmul(g.relu(y), E, 2, name="side")
    v = g.matmul(x, E, E, name="v_proj")
    split = g.node("Reshape", [v, g.ints("split_shape", [0, 0, H, D])], name="v_split")
    back = g.node("Concat", [_vec(g, _dim(g, x, 0)), _vec(g, _dim(g, x, 1)), _vec(g, _dim(g, y, 2))], axis=0)
    g.output(g.matmul(g.node("Reshape", [g.relu(split), back], name="merge"), E, E, name="out_proj"), side)
    result = prune_ok(g.build())
    assert layer_widths(result.model)["y_proj"] == (E, E)
    (decision,) = group_of_tensor(result, y)
    assert decision.kept_dead == {"Reshape 'merge' reads this channel count into its target shape": 1}


def test_a_channel_count_read_to_shape_other_data_keeps_those_channels():
    g = GraphBuilder()
    x, z = g.input("x", [2, 8]), g.input("z", [2, 8])
    y = g.gemm(x, 8, 8, dead=[3], name="y_proj")
    target = g.node("Concat", [g.ints("rows", [-1]), _vec(g, _dim(g, y, 1))], axis=0)
    g.output(g.node("Reshape", [z, target], name="z_rows"), g.gemm(g.relu(y), 8, 2, name="side"))
    result = prune_ok(g.build())
    assert layer_widths(result.model)["y_proj"] == (8, 8)
    (decision,) = group_of_tensor(result, y)
    assert decision.kept_dead == {"Reshape 'z_rows' reads the channel count to shape other data": 1}


def test_a_channel_count_read_into_the_target_of_other_channels_keeps_those_channels():
    """``z.view(-1, y.size(1))``: the target of z's Reshape names y's width; the rewrite follows z's channels only."""
    g = GraphBuilder()
    x = g.input("x", [2, 8])
    y = g.gemm(x, 8, 8, dead=[3], name="y_proj")
    z = g.gemm(x, 8, 8, name="z_proj")
    target = g.node("Concat", [g.ints("rows", [-1]), _vec(g, _dim(g, y, 1))], axis=0)
    g.output(g.gemm(g.node("Reshape", [z, target], name="z_rows"), 8, 3, name="head"),
             g.gemm(g.relu(y), 8, 2, name="side"))
    result = prune_ok(g.build())
    assert layer_widths(result.model)["y_proj"] == (8, 8)
    (decision,) = group_of_tensor(result, y)
    assert decision.kept_dead == {"Reshape 'z_rows' reads this channel count into its target shape": 1}
