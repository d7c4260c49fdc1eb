"""Shape inference for onnx-graphsurgeon graphs without copying the weights.

ONNX shape inference needs the weights' shapes but not their values (except
small shape tensors), so large constants are declared as typed graph inputs in
a light copy of the model; the inferred shapes are written back to the graph.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx

from onnxprune.graphutil import constant_size

SMALL_CONSTANT = 1024  # elements; smaller constants keep their values (shape tensors)


def _light_model(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model whose large constants are typed inputs (no weights copied)."""
    tensors = graph.tensors()
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    initializers = []
    for t in tensors.values():
        if not isinstance(t, gs.Constant):
            continue
        if constant_size(t) <= SMALL_CONSTANT:
            initializers.append(OnnxExporter.export_tensor_proto(t))
        else:
            inputs.append(helper.make_tensor_value_info(t.name, dtype_to_onnx(t.dtype), list(t.shape)))
    outputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    g = helper.make_graph(nodes, graph.name or "graph", inputs, outputs, initializer=initializers)
    functions = [OnnxExporter.export_function(f) for f in graph.functions]
    opsets = [helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])] or [
        helper.make_opsetid("", graph.opset)
    ]
    model = helper.make_model(g, opset_imports=opsets, functions=functions)
    model.ir_version = max(8, graph.ir_version or 0)
    return model


def infer_shapes(graph: gs.Graph) -> int:
    """Fill in dtype and shape of every Variable ONNX can infer; returns how many changed."""
    model = _light_model(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is best effort: unknown shapes make rules conservative
        return 0
    found = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        found[vi.name] = (tt.elem_type, dims)
    changed = 0
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Variable) or name not in found:
            continue
        elem, dims = found[name]
        if t.shape is None or list(t.shape) != dims:
            if t.shape is None or len(t.shape) == len(dims):
                merged = dims if t.shape is None else [d if d is not None else o for d, o in zip(dims, t.shape)]
                t.shape = merged
                changed += 1
        if t.dtype is None and elem:
            t.dtype = helper.tensor_dtype_to_np_dtype(elem)
    return changed
