"""Remove Identity nodes and inference-mode Dropout."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import constant_value, is_default_domain, optional_input
from onnxprune.pass_infra import GraphPass, PassResult


def _is_noop(node: gs.Node) -> bool:
    if not is_default_domain(node):
        return False
    if node.op == "Identity":
        return True
    if node.op != "Dropout" or any(t.outputs for t in node.outputs[1:]):
        return False
    training = optional_input(node, 2)
    if training is None:
        return True
    flag = constant_value(training)
    return flag is not None and not bool(np.asarray(flag).reshape(-1)[0])


class RemoveIdentityPass(GraphPass):
    name = "remove-identity"
    summary = "remove Identity nodes and Dropout in inference mode (graph outputs keep their names)"

    def call(self, graph: gs.Graph) -> PassResult:
        outputs = {id(t) for t in graph.outputs}
        removed = 0
        for node in list(graph.nodes):
            if not _is_noop(node):
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if id(dst) in outputs:
                continue  # keep the graph output's name and producer
            for consumer in list(dst.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is dst:
                        consumer.inputs[i] = src
            node.outputs.clear()
            removed += 1
        if removed:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=removed > 0, summary=f"{removed} node(s) removed")
