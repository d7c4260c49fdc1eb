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

from onnxprune.graphutil import NameSource, constant_value, is_default_domain, set_const_input
from onnxprune.pass_infra import GraphPass, PassResult


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


class FoldInputScalePass(GraphPass):
    name = "fold-input-scale"
    summary = ("fold Mul of a graph input (or its Flatten/Reshape) by a per-feature constant into the weights of the "
               "one Conv/Gemm/MatMul reading it (through a Gather of kept features)")
    requires = frozenset({"shapes"})

    def call(self, graph: gs.Graph) -> PassResult:
        names = NameSource(graph)
        graph_outputs = {id(t) for t in graph.outputs}
        graph_inputs = {id(t) for t in graph.inputs}
        folded = 0
        for mul in list(graph.nodes):
            if mul.op != "Mul" or not is_default_domain(mul) or len(mul.inputs) != 2:
                continue
            y = mul.outputs[0]
            if len(y.outputs) != 1 or id(y) in graph_outputs:
                continue
            reader = y.outputs[0]
            if reader.inputs[0] is not y or any(t is y for t in reader.inputs[1:]):
                continue
            gather = None  # Mul -> Gather(kept features) -> reader: the scale travels with the features
            if reader.op == "Gather" and len(reader.outputs[0].outputs) == 1 and id(reader.outputs[0]) not in graph_outputs:
                gather, reader = reader, reader.outputs[0].outputs[0]
                if reader.inputs[0] is not gather.outputs[0] or any(t is gather.outputs[0] for t in reader.inputs[1:]):
                    continue
            for i in (0, 1):
                x, c_t = mul.inputs[i], mul.inputs[1 - i]
                c = constant_value(c_t)
                if c is None or x.shape is None or y.shape is None or not _from_graph_input(x, graph_inputs):
                    continue
                if list(x.shape) != list(y.shape):  # the constant must not broadcast x to a larger shape
                    continue
                rank = len(x.shape)
                found = _scaled_weight(reader, rank)
                if found is None:
                    continue
                axis, features, w, scale = found
                picked = None
                if gather is not None:
                    picked = _gathered_features(gather, rank)
                    if picked is None or picked[0] != axis or len(picked[1]) != features or not isinstance(y.shape[axis], int):
                        continue
                    features = y.shape[axis]
                s = _feature_scale(np.asarray(c), rank, axis, features)
                if s is None or np.asarray(c).dtype != w.dtype:
                    continue
                if picked is not None:
                    s = s[picked[1] % features]
                set_const_input(reader, 1, scale(s).astype(w.dtype), names)
                (gather or reader).inputs[0] = x
                mul.outputs.clear()
                folded += 1
                break
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=folded > 0, summary=f"{folded} Mul node(s) folded into the weights that read them")
