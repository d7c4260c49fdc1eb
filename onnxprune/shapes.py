"""Shape inference for onnx-graphsurgeon graphs without copying the weights.

ONNX shape inference needs the weights' shapes but not their values (except
small shape tensors), so large constants are declared as typed graph inputs in
a light copy of the model; the inferred shapes are written back to the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

from onnxprune.graphutil import constant_size

SMALL_CONSTANT = 1024  # elements; smaller constants keep their values (shape tensors)

# Attribute values exported as they are (exact types: 1 and 1.0, or True, export differently).
_PLAIN = frozenset({bool, int, float, str, bytes, np.bool_, np.float16, np.float32, np.float64, np.int8, np.int16,
                    np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64})
_Proto = TypeVar("_Proto", onnx.NodeProto, onnx.ValueInfoProto, onnx.TensorProto)


class _Memo:
    """Exported protobufs by everything their export reads (never modified: the light model copies them). Shape
    inference runs several times per prune on a graph that mostly has not changed; an entry is found again only
    where the export would come out the same. Starts afresh once it holds ``limit`` entries."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.found: dict[Hashable, onnx.NodeProto | onnx.ValueInfoProto | onnx.TensorProto] = {}

    def get(self, key: Hashable | None, export: Callable[[], _Proto]) -> _Proto:
        """``export()``, or the protobuf it made before for the same ``key`` (None: not memoised)."""
        if key is None:
            return export()
        found = self.found.get(key)
        if found is None:
            if len(self.found) >= self.limit:
                self.found.clear()
            found = self.found[key] = export()
        return found


_GRAPHSURGEON_EXPORT_NODE = OnnxExporter.export_node  # onnx-graphsurgeon's own (to_model routes its exports here)
_EXPORTED = _Memo(1 << 16)  # nodes and the typed inputs standing for large constants
_EXPORTED_CONSTANTS = _Memo(1 << 12)  # small constants, keyed by their values too (8 KiB at most each)


def _attrs_key(attrs: dict) -> tuple | None:
    """What the export of ``attrs`` depends on, types included; None where a value is not a plain number,
    string or list of them (tensors, graphs, references: their export is not memoised)."""
    items = []
    for name, value in attrs.items():
        kind = type(value)
        if kind in _PLAIN:
            items.append((name, kind, value))
        elif kind in (list, tuple) and (types := tuple(map(type, value))) and _PLAIN.issuperset(types):
            items.append((name, kind, types, tuple(value)))
        else:
            return None
    return tuple(items)


def export_node(node: gs.Node) -> onnx.NodeProto:
    """onnx-graphsurgeon's export of ``node`` (memoised by op, names and attributes; the protobuf returned is shared:
    copy it, never change it)."""
    attrs = _attrs_key(node.attrs)
    key = None if attrs is None else (
        "node", node.op, node.domain, node.name, tuple(t.name for t in node.inputs), tuple(t.name for t in node.outputs), attrs
    )
    return _EXPORTED.get(key, lambda: _GRAPHSURGEON_EXPORT_NODE(node))


def _constant_as_input(t: gs.Constant) -> onnx.ValueInfoProto:
    """A large constant declared as a typed graph input (memoised by name, type and shape)."""
    shape = tuple(int(d) for d in t.shape)
    key = ("input", t.name, t.dtype, shape)
    return _EXPORTED.get(key, lambda: helper.make_tensor_value_info(t.name, dtype_to_onnx(t.dtype), list(shape)))


def _export_small_constant(t: gs.Constant) -> onnx.TensorProto:
    """onnx-graphsurgeon's export of a small constant (memoised by name, type, shape and values where those
    are an array; an unloaded one exports its own protobuf)."""
    values = t._values
    if not isinstance(values, np.ndarray) or values.dtype.hasobject:
        return OnnxExporter.export_tensor_proto(t)
    key = ("constant", t.name, values.dtype.str, values.shape, values.tobytes(), t._export_dtype, t.data_location)  # None: values' type
    return _EXPORTED_CONSTANTS.get(key, lambda: OnnxExporter.export_tensor_proto(t))


def _light_model(graph: gs.Graph, tensors: dict[str, gs.Tensor] | None = None) -> onnx.ModelProto:
    """The graph as a model whose large constants are typed inputs (no weights copied); ``tensors``: the
    graph's tensor map, where the caller has it."""
    tensors = graph.tensors() if tensors is None else tensors
    nodes = [export_node(n) for n in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    initializers = []
    for t in tensors.values():
        if not isinstance(t, gs.Constant):
            continue
        if constant_size(t) <= SMALL_CONSTANT:
            initializers.append(_export_small_constant(t))
        else:
            inputs.append(_constant_as_input(t))
    _stand_in_contrib_ops(graph, nodes, inputs)
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    g = helper.make_graph(nodes, graph.name or "graph", inputs, outputs, initializer=initializers)
    functions = [OnnxExporter.export_function(f) for f in graph.functions]
    opsets = [helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])] or [
        helper.make_opsetid("", graph.opset)
    ]
    model = helper.make_model(g, opset_imports=opsets, functions=functions)
    model.ir_version = max(8, graph.ir_version or 0)
    return model


def _quantize_output_type(node: gs.Node) -> int | None:
    """The output type of a QuantizeLinear (its zero point's, uint8 without one) or DequantizeLinear (its scale's)."""
    if node.op == "QuantizeLinear":
        if len(node.inputs) < 3 or not node.inputs[2].name:
            return onnx.TensorProto.UINT8
        dtype = node.inputs[2].dtype
    else:
        dtype = node.inputs[1].dtype
    return None if dtype is None else int(dtype_to_onnx(dtype))


def _stand_in_contrib_ops(graph: gs.Graph, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto]) -> None:
    """ONNX shape inference knows no com.microsoft ops: a MatMulNBits (A [.., K] times its 4-bit [K, N] weight)
    is inferred as the MatMul it computes, by a typed [K, N] input; a QuantizeLinear or DequantizeLinear (ONNX
    Runtime's, for 16-bit and 4-bit types) as a Cast to its output type."""
    for i, node in enumerate(graph.nodes):
        if node.domain != "com.microsoft" or len(node.inputs) < 2:
            continue
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            to = _quantize_output_type(node)
            if to is not None:
                nodes[i] = helper.make_node("Cast", [node.inputs[0].name], [node.outputs[0].name], name=node.name, to=to)
        elif node.op == "MatMulNBits" and len(node.inputs) > 2 and node.inputs[2].dtype is not None:
            weight = f"{node.outputs[0].name}::matmul_nbits_weight"
            shape = [int(node.attrs.get("K", 0)), int(node.attrs.get("N", 0))]
            inputs.append(helper.make_tensor_value_info(weight, dtype_to_onnx(node.inputs[2].dtype), shape))  # scales: A's type
            nodes[i] = helper.make_node("MatMul", [node.inputs[0].name, weight], [node.outputs[0].name], name=node.name)


# The last light model inferred (serialised) and what inference found in it: the passes before the pruning
# run inference again on a graph they did not change, and the same model gives the same shapes.
_LAST_INFERRED: list[tuple[bytes, dict] | None] = [None]  # one (model, shapes) pair, replaced whole


def _inferred(model: onnx.ModelProto) -> dict[str, tuple[int, list]] | None:
    """ONNX shape inference on ``model``: each tensor's element type and dims (None if inference fails)."""
    key = model.SerializeToString()
    last = _LAST_INFERRED[0]
    if last is not None and last[0] == key:
        return last[1]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return None
    found = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        found[vi.name] = (tt.elem_type, dims)
    _LAST_INFERRED[0] = (key, found)
    return found


def infer_shapes(graph: gs.Graph) -> int:
    """Fill in dtype and shape of every Variable ONNX can infer; returns how many changed."""
    tensors = graph.tensors()
    found = _inferred(_light_model(graph, tensors))
    if found is None:  # shape inference is best effort: unknown shapes make rules conservative
        return 0
    changed = 0
    for name, t in tensors.items():
        if not isinstance(t, gs.Variable) or name not in found:
            continue
        elem, dims = found[name]
        if t.shape is None or list(t.shape) != dims:
            if t.shape is None or len(t.shape) == len(dims):
                merged = list(dims) if t.shape is None else [d if d is not None else o for d, o in zip(dims, t.shape)]
                t.shape = merged
                changed += 1
        if t.dtype is None and elem:
            t.dtype = helper.tensor_dtype_to_np_dtype(elem)
    return changed
