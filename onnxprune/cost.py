"""Parameters and multiply-accumulates per layer (batch 1; symbolic dimensions count as 1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxprune.channels.stored import is_decompression
from onnxprune.graphutil import constant_size, constant_value, graphsurgeon_logging, optional_input, producer

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits")


@dataclass
class LayerCost:
    """Widths, parameters and MACs of one Conv/ConvTranspose/Gemm/MatMul."""
    name: str
    op: str
    in_channels: int
    out_channels: int
    params: int
    macs: int


@dataclass
class CostSummary:
    """Per-layer costs and the model's totals."""
    layers: list[LayerCost] = field(default_factory=list)
    params: int = 0
    macs: int = 0

    def by_name(self) -> dict[str, LayerCost]:
        """The layers by node name."""
        return {layer.name: layer for layer in self.layers}

    def to_dict(self) -> dict:
        """A JSON-ready dict (for reports)."""
        return {"params": self.params, "macs": self.macs, "layers": [asdict(layer) for layer in self.layers]}


def _dims(t: gs.Tensor | None) -> list[int] | None:
    """Static shape of ``t`` with unknown or symbolic dimensions counted as 1 (None if unknown)."""
    if t is None or t.shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else 1 for d in t.shape]


def _prod(xs) -> int:
    """Product of ``xs`` as an int (1 for none)."""
    return math.prod(int(x) for x in xs)


def _stored_shape(t: gs.Tensor | None) -> tuple[int, ...] | None:
    """The shape of a constant ``t``, also one a model stores quantized or narrow (a DequantizeLinear or a
    widening Cast of a constant: the shape it computes is the stored one); None if ``t`` varies. Only shapes
    are read, never values."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    node = producer(t)
    if node is not None and is_decompression(node) and node.inputs and isinstance(node.inputs[0], gs.Constant):
        return tuple(int(d) for d in node.inputs[0].shape)
    value = constant_value(t)  # a Constant node's output
    return None if value is None else value.shape


def _elements(shape: tuple[int, ...] | None) -> int:
    return 0 if shape is None else _prod(shape)


def _matmul_nbits(node: gs.Node, x: list[int] | None) -> LayerCost | None:
    """com.microsoft.MatMulNBits: ``A [.., K] @ B [K, N]`` with B stored in blocks of 2-8 bit codes (K, N: attributes)."""
    k, n = int(node.attrs.get("K", 0)), int(node.attrs.get("N", 0))
    if k <= 0 or n <= 0:
        return None
    bias = optional_input(node, 5)
    rows = _prod(x[:-1]) if x else 1
    return LayerCost(node.name, node.op, k, n, k * n + _elements(_stored_shape(bias)), rows * k * n)


def _layer(node: gs.Node) -> LayerCost | None:
    """The cost of one layer node (None if its weight is not constant); a weight stored quantized or narrow
    counts as the float weight it computes."""
    x, y = _dims(node.inputs[0]), _dims(node.outputs[0])
    if node.op == "MatMulNBits":
        return _matmul_nbits(node, x) if node.domain == "com.microsoft" else None
    w = _stored_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    params = _elements(w) + _elements(_stored_shape(optional_input(node, 2)))
    group = int(node.attrs.get("group", 1))
    if node.op == "Conv" and w is not None:
        out_spatial = _prod(y[2:]) if y else 0
        return LayerCost(node.name, node.op, w[1] * group, w[0], params, out_spatial * w[0] * _prod(w[1:]))
    if node.op == "ConvTranspose" and w is not None:
        in_spatial = _prod(x[2:]) if x else 0
        return LayerCost(node.name, node.op, w[0], w[1] * group, params, in_spatial * w[0] * _prod(w[1:]))
    if node.op == "Gemm" and w is not None and len(w) == 2:
        n, k = (w if int(node.attrs.get("transB", 0)) else w[::-1])
        m = x[1 if int(node.attrs.get("transA", 0)) else 0] if x and len(x) == 2 else 1  # transA: A is [K, M]
        return LayerCost(node.name, node.op, k, n, params, m * k * n)
    if node.op == "MatMul":
        if w is not None and len(w) == 2:
            k, n = w
            rows = _prod(x[:-1]) if x else 1
            return LayerCost(node.name, node.op, k, n, _elements(w), rows * k * n)
        a = x
        if a and y and len(a) >= 2:
            k = a[-1]
            return LayerCost(node.name, node.op, k, y[-1], 0, _prod(y) * k)
    return None


def model_cost(graph: gs.Graph) -> CostSummary:
    """Per-layer and total parameters and MACs of a graph whose tensors carry shapes."""
    summary = CostSummary()
    with graphsurgeon_logging():
        for node in graph.nodes:
            layer = _layer(node) if node.op in LAYER_OPS else None
            if layer is not None:
                summary.layers.append(layer)
                summary.macs += layer.macs
        constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    summary.params = sum(constant_size(t) for t in constants if _is_float(t.dtype))
    return summary


def _is_float(dtype: np.dtype | int) -> bool:
    """True for floating-point element types, also those numpy lacks (bfloat16, float8: kept as ONNX type numbers)."""
    if not isinstance(dtype, (int, np.integer)):
        try:
            dtype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))  # ml_dtypes' bfloat16 is no numpy float
        except (KeyError, TypeError, ValueError):
            return False
    return "FLOAT" in TensorProto.DataType.Name(int(dtype))
