"""Evaluate nodes whose inputs are all constant and replace their outputs by constants."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.stored import is_decompression
from onnxprune.graphutil import constant_value, is_default_domain
from onnxprune.pass_infra import GraphPass, PassResult

NONDETERMINISTIC = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
MAX_FOLDED_BYTES = 64 << 20  # never materialise a folded tensor larger than this


def _value_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs whose values ``node`` reads: all of them, but CastLike reads only the element type of its
    second (the dynamo exporter makes a Conv's zero bias as ``CastLike(0, x)``), so that one is left out
    when its type is known."""
    if node.op == "CastLike" and len(node.inputs) == 2 and node.inputs[1] is not None and node.inputs[1].dtype is not None:
        return node.inputs[:1]
    return list(node.inputs)


def cast_like_to_cast(node: gs.Node) -> None:
    """Rewrite a foldable ``CastLike(x, y)`` as ``Cast(x, to=element type of y)``, which needs no ``y`` to run."""
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    attrs = {"to": int(dtype_to_onnx(node.inputs[1].dtype))}
    if "saturate" in node.attrs:
        attrs["saturate"] = node.attrs["saturate"]
    node.op, node.attrs = "Cast", attrs
    del node.inputs[1]


def foldable_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Nodes (in order) whose every input is a constant or the output of another foldable node.

    A DequantizeLinear of constants, or a Cast widening a float16/bfloat16 constant, is how a model stores a
    weight quantized or narrow: it stays (the channel engine reads through it and prunes the stored form).
    """
    outputs = {t.name for t in graph.outputs}
    constant: set[str] = set()
    nodes = []
    for node in graph.nodes:
        if (
            not is_default_domain(node)
            or node.op in NONDETERMINISTIC
            or is_decompression(node)
            or next(node.subgraphs(), None) is not None
            or any(o.name in outputs for o in node.outputs)
        ):
            continue
        ok = all(
            t is None
            or (not isinstance(t, gs.Constant) and not t.name)
            or isinstance(t, gs.Constant)
            or t.name in constant
            for t in _value_inputs(node)
        )
        if ok and (node.inputs or node.op == "Constant"):
            nodes.append(node)
            constant.update(o.name for o in node.outputs)
    return nodes


def _evaluate(graph: gs.Graph, nodes: list[gs.Node], wanted: list[gs.Variable]) -> list[np.ndarray]:
    """Values of ``wanted`` computed by running ``nodes`` on ONNX Runtime."""
    from onnxprune.runtime import make_session, session_options

    sub = gs.Graph(
        nodes=nodes,
        inputs=[],
        outputs=wanted,
        opset=graph.opset,
        import_domains=graph.import_domains,
        ir_version=max(graph.ir_version or 8, 8),
    )
    model = gs.export_onnx(sub, do_type_check=False)
    session = make_session(model, options=session_options(threads=1, optimize=False))
    return session.run([t.name for t in wanted], {})


class FoldConstantsPass(GraphPass):
    name = "fold-constants"
    summary = "replace constant subgraphs (e.g. Reshape of a weight, Identity of a shared initializer) by their values"
    ensures = frozenset({"constants-folded"})

    def call(self, graph: gs.Graph) -> PassResult:
        nodes = foldable_nodes(graph)
        if not nodes:
            return PassResult(modified=False)
        for node in nodes:
            if node.op == "CastLike":
                cast_like_to_cast(node)
        inside = {id(n) for n in nodes}
        # Outputs read outside the foldable set become constants.
        wanted = []
        for node in nodes:
            for out in node.outputs:
                if any(id(c) not in inside for c in out.outputs):
                    wanted.append(out)
        simple = [t for t in wanted if constant_value(t) is not None]  # Constant nodes: no runtime needed
        rest = [t for t in wanted if constant_value(t) is None]
        values = {t.name: constant_value(t) for t in simple}
        if rest:
            values.update(zip([t.name for t in rest], _evaluate(graph, nodes, rest)))
        folded = 0
        for t in wanted:
            v = np.asarray(values[t.name])
            if v.nbytes > MAX_FOLDED_BYTES:
                continue
            t.inputs.clear()  # detach from the producing node, which cleanup then removes
            t.to_constant(v)
            folded += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=folded > 0, summary=f"{folded} constant tensor(s) folded")
