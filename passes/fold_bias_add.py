"""Fold Add(Conv/Gemm output, per-channel constant) into the producer's bias (e.g. CNTK exports)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import constant_value, weight_and_bias
from passes.folding import FoldScope, NodeFoldPass, bias_per_channel, set_bias, take_output


def _per_channel(c: np.ndarray, channels: int, out_rank: int, axis: int) -> np.ndarray | None:
    """The constant as one value per output channel, if it broadcasts exactly like that."""
    local = axis - (out_rank - c.ndim)
    for i, d in enumerate(c.shape):
        if i != local and d != 1:
            return None
    if local < 0:
        return np.full(channels, c.reshape(-1)[0]) if c.size == 1 else None
    if c.shape[local] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float64) if c.size in (1, channels) else None


def _output_channels(layer: gs.Node, weight: np.ndarray) -> int | None:
    """How many output channels (axis 1 of the output) a Conv or Gemm writes."""
    if layer.op == "Conv":
        return weight.shape[0]
    if layer.op == "Gemm" and not int(layer.attrs.get("transA", 0)):
        return weight.shape[0] if int(layer.attrs.get("transB", 0)) else weight.shape[1]
    return None


def _fold_into(add: gs.Node, x: gs.Tensor, constant: np.ndarray, scope: FoldScope) -> bool:
    """Fold ``add`` (``x`` plus ``constant``) into the bias of the Conv/Gemm writing ``x``, if exact."""
    layer = x.inputs[0] if x.inputs else None
    if layer is None or layer.op not in ("Conv", "Gemm") or len(x.outputs) != 1 or scope.is_graph_output(x):
        return False
    found = weight_and_bias(layer)
    y = add.outputs[0]
    if found is None or x.shape is None or y.shape is None or len(y.shape) != len(x.shape):
        return False
    w, b = found
    channels = _output_channels(layer, w)
    if channels is None:
        return False
    per = _per_channel(np.asarray(constant), channels, len(x.shape), 1)
    if per is None or (b is not None and b.size not in (1, channels)):
        return False
    set_bias(layer, (bias_per_channel(layer, b, channels) + per).astype(w.dtype), scope.names)
    take_output(layer, add)
    return True


class FoldBiasAddPass(NodeFoldPass):
    name = "fold-bias-add"
    summary = "fold an Add of a per-channel constant after Conv/Gemm into their bias"
    requires = frozenset({"shapes"})
    folded_summary = "Add node(s) folded into a bias"

    def fold(self, node: gs.Node, scope: FoldScope) -> bool:
        if node.op != "Add" or len(node.inputs) != 2:
            return False
        for i in (0, 1):
            constant = constant_value(node.inputs[1 - i])
            if constant is not None and _fold_into(node, node.inputs[i], constant, scope):
                return True
        return False
