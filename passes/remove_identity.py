"""Remove Identity nodes and inference-mode Dropout."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import constant_value, is_default_domain, optional_input
from passes.folding import FoldScope, NodeFoldPass


def _is_noop(node: gs.Node) -> bool:
    """Identity, or a Dropout known to be in inference mode whose mask nobody reads."""
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


class RemoveIdentityPass(NodeFoldPass):
    name = "remove-identity"
    summary = "remove Identity nodes and Dropout in inference mode (graph outputs keep their names)"
    folded_summary = "node(s) removed"

    def fold(self, node: gs.Node, scope: FoldScope) -> bool:
        if not _is_noop(node):
            return False
        src, dst = node.inputs[0], node.outputs[0]
        if scope.is_graph_output(dst):
            return False  # keep the graph output's name and producer
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()
        return True
