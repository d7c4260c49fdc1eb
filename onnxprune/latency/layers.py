"""The layers whose latency depends on channel widths, described well enough to rebuild them alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxprune.graphutil import constant_value, optional_input


@dataclass(frozen=True)
class LayerSpec:
    """One Conv/Gemm/MatMul of a model: its shape except the two widths that pruning changes.

    ``kind`` is "conv", "dwconv" (depthwise: output = multiplier x input channels),
    "gconv" (``groups`` fixed), "gemm" or "matmul". ``rows`` is the number of
    rows a Gemm/MatMul multiplies per batch item.
    """

    name: str
    kind: str
    in_tensor: str
    out_tensor: str
    in_width: int
    out_width: int
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    groups: int = 1
    multiplier: int = 1
    spatial: tuple[int, ...] = ()
    rows: int = 1
    bias: bool = True

    def widths(self, in_w: int, out_w: int) -> tuple[int, int]:
        """The widths the layer would really have (depthwise ties them; groups need divisibility)."""
        if self.kind == "dwconv":
            return in_w, in_w * self.multiplier
        if self.kind == "gconv":
            g = self.groups
            return -(-in_w // g) * g, -(-out_w // g) * g
        return in_w, out_w

    def key(self, in_w: int, out_w: int, batch: int) -> str:
        in_w, out_w = self.widths(in_w, out_w)
        if self.kind in ("gemm", "matmul"):
            return f"{self.kind}|m={self.rows * batch}|k={in_w}|n={out_w}|bias={int(self.bias)}"
        geo = f"k={'x'.join(map(str, self.kernel))}|s={'x'.join(map(str, self.strides))}|p={','.join(map(str, self.pads))}"
        geo += f"|d={'x'.join(map(str, self.dilations))}|hw={'x'.join(map(str, self.spatial))}"
        grp = f"|g={self.groups}" if self.kind == "gconv" else ""
        return f"{self.kind}|b={batch}|in={in_w}|out={out_w}|{geo}{grp}|bias={int(self.bias)}"

    def input_shape(self, in_w: int, batch: int) -> list[int]:
        if self.kind == "gemm":
            return [self.rows * batch, in_w]
        if self.kind == "matmul":
            return [batch, self.rows, in_w]
        return [batch, in_w, *self.spatial]

    def micro_inputs(self, in_w: int, out_w: int, batch: int) -> list[tuple[int, ...]]:
        """Shapes of the data inputs of the layer's micro-benchmark (one: its input)."""
        return [tuple(self.input_shape(self.widths(in_w, out_w)[0], batch))]

    def output_elements(self, out_w: int, batch: int) -> int:
        """Elements of the layer's output (for layout-conversion costs)."""
        if self.kind in ("gemm", "matmul"):
            return self.rows * batch * out_w
        out = []
        for i, (n, k, s, d) in enumerate(zip(self.spatial, self.kernel, self.strides, self.dilations)):
            p = self.pads[i] + self.pads[i + len(self.spatial)] if self.pads else 0
            out.append((n + p - d * (k - 1) - 1) // s + 1)
        return batch * self.widths(out_w, out_w)[1 if self.kind == "dwconv" else 0] * int(np.prod(out))

    def micro_node(self, index: int, inputs: list[str], in_w: int, out_w: int, rng: np.random.Generator):
        """(NodeProto, initializers) of this layer alone at the given widths, reading ``inputs[0]``, writing o{index}."""
        in_w, out_w = self.widths(in_w, out_w)
        names = [inputs[0], f"w{index}"]
        inits = []
        if self.kind in ("gemm", "matmul"):
            w = rng.standard_normal((in_w, out_w)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{index}"))
            if self.kind == "gemm":
                if self.bias:
                    inits.append(numpy_helper.from_array(rng.standard_normal(out_w).astype(np.float32), f"b{index}"))
                    names.append(f"b{index}")
                return helper.make_node("Gemm", names, [f"o{index}"], name=f"n{index}"), inits
            return helper.make_node("MatMul", names, [f"o{index}"], name=f"n{index}"), inits
        group = in_w if self.kind == "dwconv" else (self.groups if self.kind == "gconv" else 1)
        w = rng.standard_normal((out_w, in_w // group, *self.kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{index}"))
        if self.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(out_w).astype(np.float32), f"b{index}"))
            names.append(f"b{index}")
        node = helper.make_node(
            "Conv", names, [f"o{index}"], name=f"n{index}", kernel_shape=list(self.kernel), strides=list(self.strides),
            pads=list(self.pads), dilations=list(self.dilations), group=group,
        )
        return node, inits


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


def _conv_spec(node: gs.Node, w: np.ndarray, x: gs.Tensor, y: gs.Tensor) -> LayerSpec | None:
    if x.shape is None or not _static(x.shape[2:]) or str(node.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return None
    nd = w.ndim - 2
    group = int(node.attrs.get("group", 1))
    cin, cout = w.shape[1] * group, w.shape[0]
    kind, mult = "conv", 1
    if group > 1:
        kind = "dwconv" if w.shape[1] == 1 and cout % cin == 0 else "gconv"
        mult = cout // cin if kind == "dwconv" else 1
    return LayerSpec(
        name=node.name, kind=kind, in_tensor=x.name, out_tensor=y.name, in_width=cin, out_width=cout,
        kernel=tuple(int(k) for k in w.shape[2:]),
        strides=tuple(int(s) for s in node.attrs.get("strides", [1] * nd)),
        pads=tuple(int(p) for p in node.attrs.get("pads", [0] * 2 * nd)),
        dilations=tuple(int(d) for d in node.attrs.get("dilations", [1] * nd)),
        groups=group if kind == "gconv" else 1, multiplier=mult, spatial=tuple(int(d) for d in x.shape[2:]),
        bias=optional_input(node, 2) is not None,
    )


def layer_specs(graph: gs.Graph) -> list[LayerSpec]:
    """Every Conv/Gemm/MatMul with constant weights and static non-batch input dimensions."""
    specs = []
    for node in graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = constant_value(node.inputs[1])
        x, y = node.inputs[0], node.outputs[0]
        if w is None or x.shape is None:
            continue
        if node.op == "Conv":
            spec = _conv_spec(node, w, x, y)
        elif node.op == "Gemm" and w.ndim == 2 and not int(node.attrs.get("transA", 0)) and len(x.shape) == 2:
            n, k = w.shape if int(node.attrs.get("transB", 0)) else w.shape[::-1]
            rows = x.shape[0] if _static(x.shape[:1]) else 1
            spec = LayerSpec(node.name, "gemm", x.name, y.name, k, n, rows=int(rows), bias=optional_input(node, 2) is not None)
        elif node.op == "MatMul" and w.ndim == 2 and len(x.shape) >= 2 and _static(x.shape[1:-1]):
            rows = int(np.prod(x.shape[1:-1], dtype=np.int64)) if len(x.shape) > 2 else 1
            spec = LayerSpec(node.name, "matmul", x.name, y.name, w.shape[0], w.shape[1], rows=rows, bias=False)
        else:
            spec = None
        if spec is not None:
            specs.append(spec)
    return specs
