"""What the folding passes share: a pass that folds nodes one at a time, and a layer's bias.

A folding pass (fold-batchnorm, fold-bias-add, fold-input-scale, remove-identity)
visits every node once, folds it into a neighbour where it can, and cleans the
graph up once at the end. The bias helpers write a per-output-channel bias into
a Conv, ConvTranspose or Gemm (adding the input where the layer has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource, set_or_add_const_input
from onnxprune.pass_infra import GraphPass, PassResult

BIAS_INPUT = 2  # the optional bias (Gemm's C) of Conv, ConvTranspose and Gemm


@dataclass
class FoldScope:
    """What a folding pass knows about the graph it edits."""

    graph: gs.Graph
    names: NameSource
    graph_inputs: set[int]  # ids of the graph's input tensors
    graph_outputs: set[int]  # ids of the graph's output tensors

    @classmethod
    def of(cls, graph: gs.Graph) -> FoldScope:
        """The scope of ``graph`` as it is now."""
        return cls(graph, NameSource(graph), {id(t) for t in graph.inputs}, {id(t) for t in graph.outputs})

    def is_graph_output(self, t: gs.Tensor) -> bool:
        """True if ``t`` is one of the graph's outputs."""
        return id(t) in self.graph_outputs

    def is_graph_input(self, t: gs.Tensor) -> bool:
        """True if ``t`` is one of the graph's inputs."""
        return id(t) in self.graph_inputs


class NodeFoldPass(GraphPass):
    """A pass that offers every node to :meth:`fold`, then removes what no longer computes anything.

    ``folded_summary`` names what was folded, after the count (e.g. "Add node(s) folded into a bias").
    """

    folded_summary: ClassVar[str] = "node(s) folded"

    def call(self, graph: gs.Graph) -> PassResult:
        scope = FoldScope.of(graph)
        folded = sum(1 for node in list(graph.nodes) if self.fold(node, scope))
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=folded > 0, summary=f"{folded} {self.folded_summary}")

    def fold(self, node: gs.Node, scope: FoldScope) -> bool:
        """Fold ``node`` away if this pass can (True if it did); the default folds nothing."""
        return False


def bias_per_channel(layer: gs.Node, bias: np.ndarray | None, channels: int) -> np.ndarray:
    """What ``layer`` adds to each of its ``channels`` output channels (float64; Gemm's beta applied)."""
    if bias is None:
        return np.zeros(channels)
    beta = float(layer.attrs.get("beta", 1.0)) if layer.op == "Gemm" else 1.0
    return beta * np.broadcast_to(np.asarray(bias, dtype=np.float64).reshape(-1), (channels,))


def set_bias(layer: gs.Node, bias: np.ndarray, names: NameSource) -> None:
    """Make ``bias`` the layer's bias input (added where it has none); a Gemm's beta becomes 1."""
    set_or_add_const_input(layer, BIAS_INPUT, bias, names, f"{layer.name}_bias")
    if layer.op == "Gemm":
        layer.attrs["beta"] = 1.0


def take_output(layer: gs.Node, folded: gs.Node) -> None:
    """``layer`` writes ``folded``'s output from now on; ``folded`` is left for cleanup to remove."""
    layer.outputs[0] = folded.outputs[0]
    folded.outputs.clear()
