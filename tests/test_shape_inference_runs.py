"""Shape inference runs where shapes may have changed, not again where no pass changed them: flushing subnormal
weights keeps them, and a rewrite that only cut channel counts sets them itself (the same as inference finds)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.api import run_passes
from onnxprune.pass_infra import PassManager
from onnxprune.shapes import infer_shapes
from passes import PROVIDERS, finishing, preparation
from passes.prune_channels import PruneChannelsPass
from passes.structure import InferShapesPass
from tests.graphs import GraphBuilder
from tests.prune_helpers import prune_checked
from tests.test_read_drops import gated_mlp


def _conv_chain(subnormal: bool = False) -> onnx.ModelProto:
    b = GraphBuilder(seed=1)
    x = b.input("x", ["n", 3, 8, 8])
    h = b.relu(b.conv(x, 3, 6, dead=[1, 4], name="c1"))
    y = b.conv(h, 6, 5, name="c2")
    if subnormal:
        w = b.initializers["c2.weight"]
        w[0, 0, 0, 0] = np.float32(1e-40)
    b.output(y)
    return b.build()


def _records(model: onnx.ModelProto) -> list[tuple[str, bool, str]]:
    passes = [*preparation(), PruneChannelsPass(), *finishing()]
    return [(r.name, r.auto, r.result.summary) for r in run_passes(model, passes, verify=False).report.passes]


def test_inference_is_not_run_again_on_a_graph_no_pass_changed():
    runs = [(name, summary) for name, _, summary in _records(_conv_chain()) if name == "infer-shapes"]
    assert len(runs) == 3
    assert "skipped" not in runs[0][1] and all(summary.startswith("skipped") for _, summary in runs[1:])


def test_flushing_subnormal_weights_keeps_the_shapes():
    records = _records(_conv_chain(subnormal=True))
    assert next(s for n, _, s in records if n == "flush-subnormals").startswith("1 subnormal")
    assert [s.startswith("skipped") for n, _, s in records if n == "infer-shapes"] == [False, True, True]


def test_a_channel_cut_sets_the_shapes_inference_would_find():
    model = _conv_chain()
    records = _records(model)
    assert not any(auto for _, auto, _ in records)  # fold-channel-scale needs shapes: they are known
    graph = gs.import_onnx(prune_checked(model).model)
    assert infer_shapes(graph) == 0
    assert [int(d) for d in graph.tensors()["c1"].shape[1:]] == [4, 8, 8]


def test_a_rewrite_that_adds_a_node_has_the_shapes_inferred_again():
    graph = gs.import_onnx(gated_mlp([1, 3, 5, 7, 9, 11]))
    records = PassManager([*preparation(), PruneChannelsPass(), *finishing()], PROVIDERS).run(graph)
    assert "Gather" in [n.op for n in graph.nodes]
    after = [r for r in records[[r.name for r in records].index("prune-channels") + 1 :]]
    assert [(r.name, r.auto) for r in after] == [("infer-shapes", True), ("fold-channel-scale", False)]


def test_an_inference_asked_for_on_a_fresh_graph_runs():
    graph = gs.import_onnx(_conv_chain())
    (record,) = PassManager([InferShapesPass()]).run(graph)
    assert not record.result.summary.startswith("skipped")


def test_nodes_shape_inference_exported_are_exported_the_same_into_the_model():
    from onnxprune.graphio import to_model

    model = _conv_chain()
    fresh = to_model(gs.import_onnx(model), model)  # nodes never exported before
    graph = gs.import_onnx(model)
    infer_shapes(graph)  # exports every node: the model's export finds them again
    again = to_model(graph, model)
    assert again.graph.node == fresh.graph.node and again.graph.node == model.graph.node
    again.graph.node[0].name = "changed"  # the model holds copies
    assert to_model(graph, model).graph.node[0].name == "c1"
