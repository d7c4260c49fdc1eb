"""Fold Add(Conv/Gemm output, per-channel constant) into the producer's bias (e.g. CNTK exports)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource, constant_value, optional_input, set_const_input
from onnxprune.pass_infra import GraphPass, PassResult


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


class FoldBiasAddPass(GraphPass):
    name = "fold-bias-add"
    summary = "fold an Add of a per-channel constant after Conv/Gemm into their bias"
    requires = frozenset({"shapes"})

    def call(self, graph: gs.Graph) -> PassResult:
        names = NameSource(graph)
        graph_outputs = {id(t) for t in graph.outputs}
        folded = 0
        for add in list(graph.nodes):
            if add.op != "Add" or len(add.inputs) != 2:
                continue
            for i in (0, 1):
                x, c_t = add.inputs[i], add.inputs[1 - i]
                prod = x.inputs[0] if x.inputs else None
                c = constant_value(c_t)
                if c is None or prod is None or prod.op not in ("Conv", "Gemm") or len(x.outputs) != 1 or id(x) in graph_outputs:
                    continue
                w = constant_value(prod.inputs[1])
                if w is None or x.shape is None or add.outputs[0].shape is None or len(add.outputs[0].shape) != len(x.shape):
                    continue
                if prod.op == "Gemm":
                    if int(prod.attrs.get("transA", 0)):
                        continue
                    channels = w.shape[0] if int(prod.attrs.get("transB", 0)) else w.shape[1]
                else:
                    channels = w.shape[0]
                per = _per_channel(np.asarray(c), channels, len(x.shape), 1)
                b_t = optional_input(prod, 2)
                b = constant_value(b_t) if b_t is not None else None
                if per is None or (b_t is not None and b is None) or (b is not None and b.size not in (1, channels)):
                    continue
                beta = float(prod.attrs.get("beta", 1.0)) if prod.op == "Gemm" else 1.0
                old = np.zeros(channels) if b is None else beta * np.broadcast_to(b.reshape(-1).astype(np.float64), (channels,))
                new_b = (old + per).astype(w.dtype)
                if b is not None:
                    set_const_input(prod, 2, new_b, names)
                else:
                    prod.inputs.append(gs.Constant(names.fresh(f"{prod.name}_bias"), new_b))
                if prod.op == "Gemm":
                    prod.attrs["beta"] = 1.0
                prod.outputs[0] = add.outputs[0]
                add.outputs.clear()
                folded += 1
                break
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=folded > 0, summary=f"{folded} Add node(s) folded into a bias")
