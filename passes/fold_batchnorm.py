"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource, constant_value, set_const_input, weight_and_bias
from passes.folding import FoldScope, NodeFoldPass, bias_per_channel, set_bias, take_output


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per channel of an inference-mode BatchNormalization with constant parameters."""
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params) or int(bn.attrs.get("training_mode", 0)) or any(t.outputs for t in bn.outputs[1:]):
        return None
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    a = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return a, bias - a * mean


def _output_axis(layer: gs.Node, bias: np.ndarray | None) -> int | None:
    """The weight axis of the layer's output channels, if a BatchNormalization after it can fold in."""
    if layer.op == "Conv":
        return 0
    if layer.op == "ConvTranspose" and int(layer.attrs.get("group", 1)) == 1:
        return 1
    if layer.op == "Gemm" and not int(layer.attrs.get("transA", 0)):
        if float(layer.attrs.get("alpha", 1.0)) != 1.0 or (bias is not None and bias.ndim > 1 and bias.shape[0] != 1):
            return None
        return 0 if int(layer.attrs.get("transB", 0)) else 1
    return None


def _fold(layer: gs.Node, scale: np.ndarray, shift: np.ndarray, names: NameSource) -> bool:
    """Scale the layer's weights and bias so that it computes ``scale * layer(x) + shift``."""
    found = weight_and_bias(layer)
    if found is None:
        return False
    w, b = found
    out_axis = _output_axis(layer, b)
    if out_axis is None or w.shape[out_axis] != scale.size:
        return False
    shape = [1] * w.ndim
    shape[out_axis] = scale.size
    set_const_input(layer, 1, (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype), names)
    set_bias(layer, (scale * bias_per_channel(layer, b, scale.size) + shift).astype(w.dtype), names)
    return True


class FoldBatchNormPass(NodeFoldPass):
    name = "fold-batchnorm"
    summary = "fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm that feeds only it"
    folded_summary = "BatchNormalization node(s) folded"

    def fold(self, node: gs.Node, scope: FoldScope) -> bool:
        if node.op != "BatchNormalization":
            return False
        x = node.inputs[0]
        layer = x.inputs[0] if x.inputs else None
        if layer is None or len(x.outputs) != 1 or scope.is_graph_output(x):
            return False
        affine = _bn_affine(node)
        if affine is None or not _fold(layer, *affine, scope.names):
            return False
        take_output(layer, node)
        return True
