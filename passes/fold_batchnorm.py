"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource, constant_value, optional_input, set_const_input
from onnxprune.pass_infra import GraphPass, PassResult


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    params = [constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params) or int(bn.attrs.get("training_mode", 0)) or any(t.outputs for t in bn.outputs[1:]):
        return None
    scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
    a = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return a, bias - a * mean


def _fold(producer: gs.Node, a: np.ndarray, c: np.ndarray, names: NameSource) -> bool:
    w = constant_value(producer.inputs[1])
    b_t = optional_input(producer, 2)
    b = constant_value(b_t) if b_t is not None else None
    if w is None or (b_t is not None and b is None):
        return False
    if producer.op == "Conv":
        out_axis = 0
    elif producer.op == "ConvTranspose" and int(producer.attrs.get("group", 1)) == 1:
        out_axis = 1
    elif producer.op == "Gemm" and not int(producer.attrs.get("transA", 0)):
        out_axis = 0 if int(producer.attrs.get("transB", 0)) else 1
        if float(producer.attrs.get("alpha", 1.0)) != 1.0 or (b is not None and b.ndim > 1 and b.shape[0] != 1):
            return False
    else:
        return False
    if w.shape[out_axis] != a.size:
        return False
    shape = [1] * w.ndim
    shape[out_axis] = a.size
    new_w = (w.astype(np.float64) * a.reshape(shape)).astype(w.dtype)
    beta = float(producer.attrs.get("beta", 1.0)) if producer.op == "Gemm" else 1.0
    old_b = np.zeros(a.size) if b is None else beta * np.broadcast_to(np.asarray(b, dtype=np.float64).reshape(-1), (a.size,))
    new_b = (a * old_b + c).astype(w.dtype)
    set_const_input(producer, 1, new_w, names)
    if b is not None:
        set_const_input(producer, 2, new_b, names)
    else:
        producer.inputs.append(gs.Constant(names.fresh(f"{producer.name}_bias"), new_b))
    if producer.op == "Gemm":
        producer.attrs["beta"] = 1.0
    return True


class FoldBatchNormPass(GraphPass):
    name = "fold-batchnorm"
    summary = "fold BatchNormalization into a preceding Conv/ConvTranspose/Gemm that feeds only it"

    def call(self, graph: gs.Graph) -> PassResult:
        names = NameSource(graph)
        graph_outputs = {id(t) for t in graph.outputs}
        folded = 0
        for bn in list(graph.nodes):
            if bn.op != "BatchNormalization":
                continue
            x = bn.inputs[0]
            prod = x.inputs[0] if x.inputs else None
            if prod is None or len(x.outputs) != 1 or id(x) in graph_outputs:
                continue
            affine = _bn_affine(bn)
            if affine is None or not _fold(prod, *affine, names):
                continue
            y = bn.outputs[0]
            prod.outputs[0] = y
            bn.outputs.clear()
            folded += 1
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=folded > 0, summary=f"{folded} BatchNormalization node(s) folded")
