"""Fold Mul(graph input, per-feature constant) into the weights of the Conv/Gemm/MatMul that reads it.

(x * c) W = x (c W): a scale on the features a linear layer reduces over moves
into its weights. Exported gates on a network's input pixels and input
normalisation by a constant (x * 1/255) leave such a Mul; folded, the model
runs one node less, and scales of zero become zero weight columns that the
pruning pass then drops from the input's reads. Zero padding commutes with
the scale (0 * c = 0), so Conv folds exactly.

Only scales of graph inputs are folded (seen through layout-only nodes such as the
Flatten of an MLP's image): inside the graph a zero scale makes a channel dead,
which lets the pruning pass delete it in the producer too. A Gather of constant
indices on the feature axis between the Mul and the layer (the kept inputs of an
already pruned model) is looked through: the scale is gathered with the features.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import constant_value, is_default_domain, set_const_input
from passes.folding import FoldScope, NodeFoldPass


def _feature_scale(c: np.ndarray, rank: int, axis: int, features: int) -> np.ndarray | None:
    """``c`` as one factor per feature on ``axis`` of a rank-``rank`` tensor, if it broadcasts exactly so."""
    if c.ndim > rank or not np.issubdtype(c.dtype, np.floating) or not np.all(np.isfinite(c)):
        return None
    local = axis - (rank - c.ndim)
    if any(d != 1 for i, d in enumerate(c.shape) if i != local):
        return None
    if local < 0 or c.shape[local] == 1:
        return np.full(features, float(c.reshape(-1)[0]) if c.size else 1.0)
    return c.reshape(-1).astype(np.float64) if c.shape[local] == features else None


def _scaled_weight(consumer: gs.Node, rank: int) -> tuple[int, int, np.ndarray, Callable[[np.ndarray], np.ndarray]] | None:
    """(feature axis of the input, feature count, weight, scale -> new weight) for a supported reader."""
    w = constant_value(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
    if w is None or not is_default_domain(consumer):
        return None
    if consumer.op == "Gemm" and rank == 2 and not int(consumer.attrs.get("transA", 0)):
        if int(consumer.attrs.get("transB", 0)):
            return 1, w.shape[1], w, lambda s: w * s[None, :]
        return 1, w.shape[0], w, lambda s: w * s[:, None]
    if consumer.op == "MatMul" and rank >= 2 and w.ndim == 2:
        return rank - 1, w.shape[0], w, lambda s: w * s[:, None]
    if consumer.op == "Conv" and w.ndim == rank and rank >= 3:
        group = int(consumer.attrs.get("group", 1))
        out_ch, per_group = w.shape[0], w.shape[1]
        if out_ch % group:
            return None
        # input channel of weight [m, l]: (m // (out_ch / group)) * per_group + l
        idx = (np.arange(out_ch)[:, None] // (out_ch // group)) * per_group + np.arange(per_group)[None, :]
        return 1, per_group * group, w, lambda s: w * s[idx].reshape(out_ch, per_group, *([1] * (w.ndim - 2)))
    return None


# nodes that only move or relabel the elements of their first input (no arithmetic, no other data input
# that could carry a learned value): a Mul behind them still scales the graph input itself
_LAYOUT_ONLY = frozenset({"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"})


def _from_graph_input(t: gs.Variable, graph_inputs: set[int]) -> bool:
    """Whether ``t`` is a graph input, or one rearranged by layout-only nodes."""
    while id(t) not in graph_inputs:
        producer = t.inputs[0] if len(t.inputs) == 1 else None
        if producer is None or producer.op not in _LAYOUT_ONLY or not is_default_domain(producer) or not producer.inputs:
            return False
        t = producer.inputs[0]
    return True


def _gathered_features(node: gs.Node, rank: int) -> tuple[int, np.ndarray] | None:
    """(axis, indices) of a Gather of constant 1-D indices along one axis of a rank-``rank`` tensor."""
    if node.op != "Gather" or not is_default_domain(node) or len(node.inputs) != 2:
        return None
    idx = constant_value(node.inputs[1])
    if idx is None or idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        return None
    axis = int(node.attrs.get("axis", 0))
    return axis % rank, idx.astype(np.int64)


def _reader_of(mul_output: gs.Variable, scope: FoldScope) -> tuple[gs.Node, gs.Node | None] | None:
    """(the layer reading the Mul's output as its data input, a Gather of kept features between them or None)."""
    reader = mul_output.outputs[0]
    if reader.inputs[0] is not mul_output or any(t is mul_output for t in reader.inputs[1:]):
        return None
    gathered = reader.outputs[0] if reader.op == "Gather" else None
    if gathered is None or len(gathered.outputs) != 1 or scope.is_graph_output(gathered):
        return reader, None
    layer = gathered.outputs[0]
    if layer.inputs[0] is not gathered or any(t is gathered for t in layer.inputs[1:]):
        return None
    return layer, reader


def _fold_scale(mul: gs.Node, x: gs.Tensor, constant: np.ndarray, reader: gs.Node, gather: gs.Node | None,
                scope: FoldScope, inputs_only: bool = True) -> bool:
    """Fold ``mul`` (``x`` times ``constant``) into ``reader``'s weights, through ``gather`` if any (only scales of
    graph inputs when ``inputs_only``)."""
    y = mul.outputs[0]
    if x.shape is None or y.shape is None or (inputs_only and not _from_graph_input(x, scope.graph_inputs)):
        return False
    if list(x.shape) != list(y.shape):  # the constant must not broadcast x to a larger shape
        return False
    rank = len(x.shape)
    found = _scaled_weight(reader, rank)
    if found is None:
        return False
    axis, features, w, scale = found
    picked = None
    if gather is not None:
        picked = _gathered_features(gather, rank)
        if picked is None or picked[0] != axis or len(picked[1]) != features or not isinstance(y.shape[axis], int):
            return False
        features = y.shape[axis]
    per_feature = _feature_scale(np.asarray(constant), rank, axis, features)
    if per_feature is None or np.asarray(constant).dtype != w.dtype:
        return False
    if picked is not None:
        per_feature = per_feature[picked[1] % features]
    set_const_input(reader, 1, scale(per_feature).astype(w.dtype), scope.names)
    (gather or reader).inputs[0] = x
    mul.outputs.clear()
    return True


class FoldInputScalePass(NodeFoldPass):
    name = "fold-input-scale"
    summary = ("fold Mul of a graph input (or its Flatten/Reshape) by a per-feature constant into the weights of the "
               "one Conv/Gemm/MatMul reading it (through a Gather of kept features)")
    requires = frozenset({"shapes"})
    folded_summary = "Mul node(s) folded into the weights that read them"
    inputs_only = True

    def fold(self, node: gs.Node, scope: FoldScope) -> bool:
        if node.op != "Mul" or not is_default_domain(node) or len(node.inputs) != 2:
            return False
        y = node.outputs[0]
        if len(y.outputs) != 1 or scope.is_graph_output(y):
            return False
        readers = _reader_of(y, scope)
        if readers is None:
            return False
        for i in (0, 1):
            constant = constant_value(node.inputs[1 - i])
            if constant is not None and _fold_scale(node, node.inputs[i], constant, *readers, scope, self.inputs_only):
                return True
        return False


class FoldChannelScalePass(FoldInputScalePass):
    """After pruning: a per-channel Mul anywhere (a gate after a GELU, whose rejected channels are gone) moves
    into the weights of the layer reading it. Not before the analysis: there a zero scale is what makes a
    channel dead in its producer too."""

    name = "fold-channel-scale"
    summary = ("after pruning: fold Mul by a per-feature constant vector into the weights of the one Conv/Gemm/MatMul "
               "reading it (a gate left after a GELU; scalars, part of the op's formula, stay)")
    inputs_only = False

    def fold(self, node: gs.Node, scope: FoldScope) -> bool:
        constants = [constant_value(t) for t in node.inputs] if node.op == "Mul" else []
        if not any(c is not None and np.asarray(c).size > 1 for c in constants):
            return False
        return super().fold(node, scope)
