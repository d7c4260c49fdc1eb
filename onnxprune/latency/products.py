"""Products of two activations (attention's ``Q @ K^T`` and ``P @ V``): their micro-benchmarks and shapes.

What a head costs is not only its share of the projections (layers with constant weights,
:mod:`onnxprune.latency.layers`): each head also multiplies its queries by its keys and its
attention weights by its values, MatMul or Einsum nodes whose operands are both activations.
Removing heads shrinks those products along the head axis, so the latency model times them too,
as micro-benchmarks of the product alone (a MatMul or Einsum of two random inputs) at the head
counts the search considers.

Their shapes are taken at the target's batch: every symbolic input size is set to it, as the
side-by-side timing of the guarantee sets it, and the sequence length is the model's own. ONNX
shape inference (on a copy of the graph without its weights) finds most of them; where it cannot
(a Reshape target computed from ``Shape`` of a symbolic batch, as TorchScript writes BERT), the
model is run once on ONNX Runtime with the missing operands as extra outputs.

The shape an operand takes when each channel group keeps ``k`` channels follows from its layout
(:mod:`onnxprune.channels.layout`): each channel part (the heads, the channels of a head) keeps
the values some kept channel uses, as the plan's ``keep_products`` keeps them (whole heads), and
the axes without channels (batch, sequence) stay as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

from onnxprune.channels.analysis import ChannelAnalysis
from onnxprune.channels.layout import dims, kept_per_part
from onnxprune.channels.plan import PrunePlan
from onnxprune.graphutil import constant_size, constant_value, is_default_domain
from onnxprune.shapes import SMALL_CONSTANT

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
PRODUCT_OPS = ("MatMul", "Einsum")


def _dims(shape: Shape) -> str:
    return "x".join(map(str, shape))


@dataclass(frozen=True)
class ProductSpec:
    """One MatMul/Einsum of two activations, with its operands' shapes when nothing is pruned.

    Requests for it carry the operands' shapes at a choice of widths (``(spec, a_shape, b_shape)``);
    the shapes hold the batch already.
    """

    name: str
    op: str
    a_tensor: str
    b_tensor: str
    out_tensor: str
    a_shape: Shape
    b_shape: Shape
    equation: str = ""

    def key(self, a_shape: Shape, b_shape: Shape, batch: int) -> str:
        """The cache key of this product at these operand shapes (``batch`` is in the shapes)."""
        eq = f"|eq={self.equation}" if self.op == "Einsum" else ""
        return f"product|{self.op.lower()}|a={_dims(a_shape)}|b={_dims(b_shape)}{eq}"

    def micro_inputs(self, a_shape: Shape, b_shape: Shape, batch: int) -> list[Shape]:
        """Shapes of the micro-benchmark's two data inputs."""
        return [tuple(a_shape), tuple(b_shape)]

    def micro_node(self, index: int, inputs: list[str], a_shape: Shape, b_shape: Shape, rng: np.random.Generator):
        """(NodeProto, no initializers): the product of ``inputs``, writing o{index}."""
        attrs = {"equation": self.equation} if self.op == "Einsum" else {}
        return helper.make_node(self.op, list(inputs[:2]), [f"o{index}"], name=f"n{index}", **attrs), []


def product_nodes(analysis: ChannelAnalysis) -> list[gs.Node]:
    """MatMul/Einsum nodes multiplying two activations, one of them (or the product) carrying tracked channels."""
    ctx, out = analysis.ctx, []
    for node in analysis.graph.nodes:
        if node.op not in PRODUCT_OPS or not is_default_domain(node) or len(node.inputs) != 2 or not node.outputs:
            continue
        if any(constant_value(t) is not None for t in node.inputs):
            continue  # a layer with constant weights (layers.py), not a product of activations
        if any(ctx.tracked(t) is not None for t in (*node.inputs, node.outputs[0])):
            out.append(node)
    return out


def _with_outputs(graph: gs.Graph, names: list[str]):
    """The graph as a ModelProto whose outputs also hold the tensors ``names``."""
    model = gs.export_onnx(graph, do_type_check=False)
    present = {o.name for o in model.graph.output}
    tensors = graph.tensors()
    for name in names:
        if name not in present:
            dtype = tensors[name].dtype
            elem = dtype_to_onnx(dtype) if dtype is not None else TensorProto.FLOAT
            model.graph.output.append(helper.make_tensor_value_info(name, elem, None))
            present.add(name)
    return model


def runtime_shapes(graph: gs.Graph, names: list[str], batch: int, threads: int | None = None) -> dict[str, Shape]:
    """Shapes of the tensors ``names`` when the model runs on ONNX Runtime CPU with every symbolic input size
    set to ``batch`` (random inputs); empty if the model cannot be run so."""
    from onnxprune.runtime import input_specs, lean_session_options, make_session, random_feed

    inputs = {t.name for t in graph.inputs}
    wanted = [n for n in dict.fromkeys(names) if n not in inputs]
    try:
        session = make_session(_with_outputs(graph, wanted), options=lean_session_options(threads))
        feed = random_feed(input_specs(session, symbolic_dim=batch), np.random.default_rng(0))
        values = session.run(wanted, feed) if wanted else []
    except Exception as e:  # noqa: BLE001 - any runtime failure only leaves the products untimed
        logger.warning("attention products are not timed: running the model to size them failed (%s)", str(e).splitlines()[0])
        return {}
    shapes = {n: tuple(int(d) for d in v.shape) for n, v in zip(wanted, values)}
    shapes.update({n: tuple(int(d) for d in feed[n].shape) for n in names if n in feed})
    return shapes


def _weightless_model(graph: gs.Graph, batch: int) -> onnx.ModelProto:
    """The graph for shape inference: large constants as typed inputs (no weights copied), every symbolic
    input size set to ``batch``."""
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    for value in inputs:
        for d in value.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = batch
    initializers = []
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and constant_size(t) <= SMALL_CONSTANT:
            initializers.append(OnnxExporter.export_tensor_proto(t))
        elif isinstance(t, gs.Constant):
            inputs.append(helper.make_tensor_value_info(t.name, dtype_to_onnx(t.dtype), list(t.shape)))
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    g = helper.make_graph(nodes, graph.name or "graph", inputs, [], initializer=initializers)
    opsets = [helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])] or [
        helper.make_opsetid("", graph.opset)
    ]
    model = helper.make_model(g, opset_imports=opsets, functions=[OnnxExporter.export_function(f) for f in graph.functions])
    model.ir_version = max(8, graph.ir_version or 0)
    return model


def static_shapes(graph: gs.Graph, names: list[str], batch: int) -> dict[str, Shape]:
    """Shapes of the tensors ``names`` that ONNX shape inference finds fully known once every symbolic input
    size is ``batch``."""
    try:
        model = _weightless_model(graph, batch)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: what is not found here is found by running the model
        return {}
    wanted, found = set(names), {}
    for value in (*inferred.graph.value_info, *inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        if value.name in wanted and dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            found[value.name] = tuple(int(d.dim_value) for d in dims)
    return found


def operand_shapes(graph: gs.Graph, names: list[str], batch: int, threads: int | None = None) -> dict[str, Shape]:
    """Shapes of ``names`` at ``batch``: from shape inference where it knows them all, else from a run of the model."""
    shapes = static_shapes(graph, names, batch)
    missing = [n for n in dict.fromkeys(names) if n not in shapes]
    if missing:
        logger.debug("sizing %d product operand(s) by running the model", len(missing))
        shapes.update(runtime_shapes(graph, missing, batch, threads))
    return shapes


def product_specs(
    analysis: ChannelAnalysis, batch: int, threads: int | None = None, *, nodes: list[gs.Node] | None = None
) -> list[ProductSpec]:
    """Every product of two activations that reaches tracked channels (or those of ``nodes``), sized at ``batch``
    (see module docstring)."""
    nodes = product_nodes(analysis) if nodes is None else nodes
    if not nodes:
        return []
    shapes = operand_shapes(analysis.graph, [t.name for n in nodes for t in n.inputs], batch, threads)
    specs = []
    for node in nodes:
        a, b = node.inputs
        if a.name in shapes and b.name in shapes:
            equation = str(node.attrs.get("equation", "")).replace(" ", "") if node.op == "Einsum" else ""
            specs.append(ProductSpec(node.name, node.op, a.name, b.name, node.outputs[0].name, shapes[a.name],
                                     shapes[b.name], equation))
    logger.debug("%d product(s) of activations sized at batch %d", len(specs), batch)
    return specs


class OperandShapes:
    """The shape of an activation when each channel group ``g`` keeps ``assign[g]`` of its channels.

    Group ``g`` loses the channels the maximal plan ``base`` removes, less the first ones in channel
    order that a larger ``assign[g]`` keeps back (as ``make_plan``'s ``group_targets`` keeps them).
    """

    def __init__(self, analysis: ChannelAnalysis, base: PrunePlan) -> None:
        self.analysis = analysis
        self.k_min = {d.group.index: d.kept for d in base.groups}
        self.going = {d.group.index: d.group.components[base.remove[d.group.components]] for d in base.groups}
        self._groups: dict[str, tuple[int, ...]] = {}
        self._memo: dict[tuple, Shape] = {}

    def groups(self, tensor: str) -> tuple[int, ...]:
        """The channel groups with channels in ``tensor`` (none if untracked)."""
        if tensor not in self._groups:
            found: tuple[int, ...] = ()
            if self.analysis.ctx.tracked(tensor) is not None:
                comps = self.analysis.components_of(tensor)
                found = tuple(int(g) for g in np.unique(self.analysis.group_of_component[comps]))
            self._groups[tensor] = found
        return self._groups[tensor]

    def at(self, tensor: str, full: Shape, assign: dict[int, int]) -> Shape:
        """``tensor``'s shape (``full`` when nothing is pruned) under ``assign``."""
        groups = self.groups(tensor)
        if not groups:
            return tuple(full)
        key = (tensor, tuple(full), tuple(assign.get(g, self.k_min.get(g, -1)) for g in groups))
        if key not in self._memo:
            self._memo[key] = self._shape(tensor, tuple(full), groups, assign)
        return self._memo[key]

    def _shape(self, tensor: str, full: Shape, groups: tuple[int, ...], assign: dict[int, int]) -> Shape:
        comps = self.analysis.components_of(tensor)
        gone = [self.going[g][max(0, assign.get(g, self.k_min[g]) - self.k_min[g]):] for g in groups if g in self.going]
        kept = ~np.isin(comps, np.concatenate(gone)) if gone else np.ones(comps.size, dtype=bool)
        parts = self.analysis.ctx.tracked(tensor).parts
        counts = [int(mask.sum()) for mask in kept_per_part(kept, dims(parts))]
        for i in self.analysis.ctx.fixed.get(tensor, {}):
            counts[i] = parts[i].dim
        shape = list(full)
        for axis in {p.axis for p in parts}:
            on_axis = [i for i, p in enumerate(parts) if p.axis == axis]
            whole = math.prod(parts[i].dim for i in on_axis)
            if axis < len(shape) and whole and shape[axis] % whole == 0:
                shape[axis] = shape[axis] // whole * math.prod(counts[i] for i in on_axis)
        return tuple(shape)
