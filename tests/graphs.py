"""Small builders for hand-made ONNX models with dead channels (tests only).

A :class:`GraphBuilder` wraps ``onnx.helper``: every node gets a name, every
weight is a named initializer, and the layer helpers (``conv``, ``gemm``,
``matmul``, ``batchnorm`` ...) take the channels that should be *dead* (zero
weight rows and zero bias) or *constant* (zero weight rows, non-zero bias) so a
test states exactly what the engine should find.

Weights are random normal (seeded), so a live channel is never accidentally
zero. Models default to opset 17 / IR version 8; opsets above 17 get IR 10.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}


def default_ir_version(opset: int) -> int:
    return 8 if opset <= 17 else 10


class GraphBuilder:
    """Accumulates inputs, initializers, nodes and outputs; ``build()`` returns a checked ModelProto."""

    def __init__(
        self,
        opset: int = 17,
        *,
        ir_version: int | None = None,
        seed: int = 0,
        extra_opsets: Mapping[str, int] | None = None,
        name: str = "test_graph",
    ) -> None:
        self.opset = opset
        self.ir_version = default_ir_version(opset) if ir_version is None else ir_version
        self.extra_opsets = dict(extra_opsets or {})
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, np.ndarray] = {}
        self.functions: list[onnx.FunctionProto] = []
        self._counts: dict[str, int] = {}
        self._taken: set[str] = set()

    # -- naming ---------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        """``prefix``, ``prefix1``, ``prefix2``, ...: the first not used by a node, tensor or input."""
        while True:
            n = self._counts.get(prefix, 0)
            self._counts[prefix] = n + 1
            name = f"{prefix}{n}" if n else prefix
            if name not in self._taken:
                return name

    def _take(self, *names: str) -> None:
        for name in names:
            if name in self._taken:
                raise ValueError(f"name {name!r} is already used in this graph")
            self._taken.add(name)

    # -- graph interface ------------------------------------------------------
    def input(self, name: str, shape: Sequence[int | str | None], dtype=np.float32) -> str:
        self._take(name)
        self.inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPES[np.dtype(dtype)], list(shape)))
        return name

    def output(self, *names: str, dtype=np.float32, shape: Sequence[int | str | None] | None = None) -> None:
        """Graph outputs; without ``shape`` the shape ONNX infers is declared at ``build()``."""
        for name in names:
            self.outputs.append(helper.make_tensor_value_info(name, _ONNX_TYPES[np.dtype(dtype)], shape))

    def const(self, name: str, value, dtype=None) -> str:
        """A named initializer (name made unique if taken)."""
        arr = np.asarray(value, dtype=dtype) if dtype is not None else np.asarray(value)
        if arr.dtype == np.float64 and dtype is None:
            arr = arr.astype(np.float32)
        if name in self._taken:
            name = self.fresh(name + "_")
        self._take(name)
        self.initializers[name] = np.array(arr, order="C")  # (ascontiguousarray would make scalars 1-D)
        return name

    def ints(self, name: str, values: Iterable[int]) -> str:
        return self.const(name, np.asarray(list(values), dtype=np.int64))

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        *,
        name: str | None = None,
        outputs: int | Sequence[str] = 1,
        domain: str | None = None,
        **attrs,
    ) -> str | list[str]:
        """Append a node; returns its output name (or the list when it has several)."""
        name = name or self.fresh(op.lower())
        if isinstance(outputs, int):
            outs = [name] if outputs == 1 else [f"{name}_out{i}" for i in range(outputs)]
        else:
            outs = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self._take(name, *(o for o in outs if o != name))
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def build(self, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            self.outputs,
            initializer=[numpy_helper.from_array(v, k) for k, v in self.initializers.items()],
        )
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in self.extra_opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets, functions=self.functions, producer_name="onnxprune-tests")
        model.ir_version = self.ir_version
        _fill_output_shapes(model)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model

    # -- weights ----------------------------------------------------------------
    def randn(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def rows(self, shape: Sequence[int], dead: Iterable[int] = (), axis: int = 0, scale: float = 0.5) -> np.ndarray:
        """Random weights with the slices ``dead`` along ``axis`` set to 0."""
        w = self.randn(*shape, scale=scale)
        idx = list(dead)
        if idx:
            sl = [slice(None)] * w.ndim
            sl[axis] = idx
            w[tuple(sl)] = 0.0
        return w

    def bias(self, n: int, dead: Iterable[int] = (), const: Mapping[int, float] | None = None) -> np.ndarray:
        b = self.randn(n, scale=0.3)
        b[list(dead)] = 0.0
        for k, v in (const or {}).items():
            b[k] = v
        return b

    # -- layers -------------------------------------------------------------------
    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        *,
        k: int = 3,
        pad: int | None = None,
        stride: int = 1,
        group: int = 1,
        dead: Iterable[int] = (),
        const: Mapping[int, float] | None = None,
        bias: bool = True,
        weight: np.ndarray | None = None,
        bias_value: np.ndarray | None = None,
        name: str | None = None,
    ) -> str:
        """Conv ``cin -> cout`` (``k`` x ``k``, "same" padding by default).

        ``dead`` output channels get zero weights and zero bias; ``const``
        channels (index -> value) get zero weights and that bias.
        """
        name = name or self.fresh("conv")
        dead = list(dead)
        const = dict(const or {})
        pad = k // 2 if pad is None else pad
        if weight is None:
            weight = self.rows((cout, cin // group, k, k), dead + list(const))
        inputs = [x, self.const(f"{name}.weight", weight)]
        if bias:
            b = self.bias(cout, dead, const) if bias_value is None else np.asarray(bias_value, dtype=np.float32)
            inputs.append(self.const(f"{name}.bias", b))
        elif const:
            raise ValueError("constant channels need a bias")
        return self.node(
            "Conv",
            inputs,
            name=name,
            kernel_shape=[k, k],
            pads=[pad] * 4,
            strides=[stride, stride],
            group=group if group != 1 else None,
        )

    def gemm(
        self,
        a: str,
        k: int,
        n: int,
        *,
        dead: Iterable[int] = (),
        const: Mapping[int, float] | None = None,
        trans_b: int = 1,
        bias: bool = True,
        c_value: np.ndarray | float | None = None,
        name: str | None = None,
        **attrs,
    ) -> str:
        """Gemm ``[*, k] -> [*, n]``; ``dead``/``const`` output columns as in :meth:`conv`."""
        name = name or self.fresh("gemm")
        dead = list(dead)
        const = dict(const or {})
        w = self.rows((n, k), dead + list(const))  # (N, K)
        inputs = [a, self.const(f"{name}.weight", w if trans_b else np.ascontiguousarray(w.T))]
        if bias:
            c = self.bias(n, dead, const) if c_value is None else np.asarray(c_value, dtype=np.float32)
            inputs.append(self.const(f"{name}.bias", c))
        elif const:
            raise ValueError("constant channels need a bias")
        return self.node("Gemm", inputs, name=name, transB=trans_b, **attrs)

    def matmul(self, a: str, k: int, n: int, *, dead: Iterable[int] = (), name: str | None = None) -> str:
        """MatMul by a constant ``[k, n]`` matrix whose ``dead`` columns are zero."""
        name = name or self.fresh("matmul")
        w = self.rows((k, n), dead, axis=1)
        return self.node("MatMul", [a, self.const(f"{name}.weight", w)], name=name)

    def batchnorm(
        self,
        x: str,
        c: int,
        *,
        zero_scale: Iterable[int] = (),
        bias: Mapping[int, float] | None = None,
        name: str | None = None,
    ) -> str:
        """BatchNormalization (inference) with scale 0 at ``zero_scale``; ``bias`` overrides entries
        (by default a zero-scale channel gets bias 0, i.e. it is dead)."""
        name = name or self.fresh("bn")
        zero = list(zero_scale)
        scale = (self.rng.random(c) * 0.5 + 0.75).astype(np.float32)
        scale[zero] = 0.0
        b = self.bias(c, zero, bias)
        mean = self.randn(c, scale=0.1)
        var = (self.rng.random(c) * 0.5 + 0.75).astype(np.float32)
        ins = [x] + [self.const(f"{name}.{p}", v) for p, v in (("scale", scale), ("bias", b), ("mean", mean), ("var", var))]
        return self.node("BatchNormalization", ins, name=name, epsilon=1e-5)

    def relu(self, x: str, name: str | None = None) -> str:
        return self.node("Relu", [x], name=name)


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs declared without a shape the shape ONNX infers."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # custom ops, local functions: best effort
        inferred = model
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in model.graph.output:
        tt = out.type.tensor_type
        if tt.HasField("shape"):
            continue
        src = known.get(out.name)
        if src is not None and src.type.tensor_type.HasField("shape"):
            tt.shape.CopyFrom(src.type.tensor_type.shape)
        else:
            raise ValueError(f"cannot infer the shape of output {out.name!r}; pass shape= to output()")


# -- reading models back ---------------------------------------------------------------


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node_named(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(f"no node named {name!r}; nodes: {[n.name for n in model.graph.node]}")


def nodes_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def input_value(model: onnx.ModelProto, node_name: str, index: int) -> np.ndarray | None:
    """The constant value of input ``index`` of node ``node_name`` (initializer or Constant node)."""
    node = node_named(model, node_name)
    if index >= len(node.input) or not node.input[index]:
        return None
    name = node.input[index]
    inits = initializers(model)
    if name in inits:
        return inits[name]
    for n in model.graph.node:
        if n.op_type == "Constant" and name in n.output:
            return numpy_helper.to_array(attr(n, "value"))
    return None


def weight(model: onnx.ModelProto, node_name: str) -> np.ndarray:
    w = input_value(model, node_name, 1)
    assert w is not None, f"{node_name} has no constant weight"
    return w


def bias_of(model: onnx.ModelProto, node_name: str) -> np.ndarray | None:
    return input_value(model, node_name, 2)


def group_named(result, name: str):
    """The plan's GroupDecision whose group is labelled ``name`` (a producing layer, or a tensor)."""
    groups = result.report.plan.groups
    for d in groups:
        if d.group.name == name:
            return d
    raise KeyError(f"no group {name!r}; groups: {[d.group.name for d in groups]}")


def group_of_tensor(result, tensor: str):
    """The GroupDecision(s) spanning ``tensor`` (one per group it carries)."""
    found = [d for d in result.report.plan.groups if tensor in d.group.tensors]
    assert found, f"tensor {tensor!r} is in no group"
    return found


def live_reasons(result, tensor: str) -> set[str]:
    """Why the channels of ``tensor`` are live (the analysis' reason texts)."""
    a = result.report.plan.analysis
    comps = a.components_of(tensor)
    return {a.reasons[r] for r in a.live_reason[comps].tolist() if r >= 0}


def pin_reasons(result, tensor: str) -> set[str]:
    a = result.report.plan.analysis
    comps = a.components_of(tensor)
    return {a.reasons[r] for r in a.pin_reason[comps].tolist() if r >= 0}


# -- pruning with checks -----------------------------------------------------------------


def prune_ok(model: onnx.ModelProto, *, seed: int = 7, **kwargs):
    """``prune_checked`` (verification on ORT + full ONNX check), then compare outputs once more
    on inputs drawn with a different seed."""
    from tests.prune_helpers import prune_checked, same_outputs

    result = prune_checked(model, **kwargs)
    assert same_outputs(model, result.model, seed=seed), "outputs differ on a second random input"
    return result
