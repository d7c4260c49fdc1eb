"""Bookkeeping passes: topological order, shape inference, dead-code removal."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.pass_infra import GraphPass, PassResult
from onnxprune.shapes import infer_shapes


class ToposortPass(GraphPass):
    name = "toposort"
    summary = "order nodes so that every tensor is produced before it is read"
    ensures = frozenset({"toposorted"})

    def call(self, graph: gs.Graph) -> PassResult:
        before = [id(n) for n in graph.nodes]
        graph.toposort()
        return PassResult(modified=before != [id(n) for n in graph.nodes])


class InferShapesPass(GraphPass):
    name = "infer-shapes"
    summary = "run ONNX shape inference and record every tensor's shape (weights are not copied)"
    ensures = frozenset({"shapes"})
    only_establishes = True  # skipped where no pass has changed the graph since shapes were last inferred

    def call(self, graph: gs.Graph) -> PassResult:
        return PassResult(modified=False, summary=f"{infer_shapes(graph)} tensor shapes updated")


class CleanupPass(GraphPass):
    name = "cleanup"
    summary = "remove nodes and tensors that no graph output depends on"
    ensures = frozenset({"clean"})

    def call(self, graph: gs.Graph) -> PassResult:
        before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = before - len(graph.nodes)
        return PassResult(modified=removed > 0, summary=f"{removed} unused node(s) removed")
