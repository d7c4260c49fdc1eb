"""Property test: on random conv DAGs with planted dead channels, the engine removes exactly the removable ones.

Hypothesis builds small NCHW graphs (Conv 1x1/3x3, BatchNormalization, Relu /
LeakyRelu / SiLU, residual Add, channel Concat, MaxPool, then
GlobalAveragePool + Flatten + Gemm) and plants dead channels by zeroing whole
Conv output channels (weight rows and bias; a following BatchNormalization gets
scale 0 and bias 0 there, so they stay exactly zero). No channel is ever a
non-zero constant.

Independently of the engine, the generator keeps an *oracle*: per tensor, a
class id and a "dead" flag per channel. A Conv gives fresh classes;
BN/activations/pooling keep them; Add unions its operands' classes pairwise
(union-find) and is dead where both operands are; Concat concatenates. A class
is removable iff every (tensor, channel) in it is dead and it does not reach
the graph input. Each Conv must then be pruned to exactly the number of its
output channels whose class is not removable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.prune_helpers import layer_widths, prune_checked, same_outputs

OPSET = 17
IR_VERSION = 8
SPATIAL = 8
GEMM_OUTPUTS = 3
# Step kinds, repeated to weight the draw (MaxPool rarely). "add_input" is a residual Add onto the graph
# input, whose channels are live and pinned: a dead channel added to one must stay (else rarely drawn).
STEP_KINDS = ["conv"] * 3 + ["bn"] * 2 + ["act"] * 3 + ["add"] * 3 + ["add_input"] + ["concat"] * 2 + ["pool"]


class UnionFind:
    """Minimal union-find over integer class ids."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, n: int) -> np.ndarray:
        """``n`` new singleton classes."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Value:
    """A generated tensor and its oracle: channel classes and which channels are exactly zero."""

    name: str
    channels: int
    spatial: int
    classes: np.ndarray
    dead: np.ndarray


@dataclass
class DagBuilder:
    """Builds the ONNX graph and the oracle side by side; choices come from a Hypothesis ``data.draw``."""

    draw: object
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    values: list[Value] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    uf: UnionFind = field(default_factory=UnionFind)
    conv_classes: dict[str, np.ndarray] = field(default_factory=dict)
    input_classes: np.ndarray | None = None
    log: list[str] = field(default_factory=list)

    # -- plumbing -------------------------------------------------------------
    def _init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def _tag(self) -> str:
        """Prefix for the next node's initializers."""
        return f"w_{len(self.nodes)}"

    def _node(self, op: str, inputs: list[str], **attrs) -> str:
        """Append a node named ``n<i>_<op>`` writing tensor ``t<i>``; returns the node name."""
        name = f"n{len(self.nodes)}_{op}"
        self.nodes.append(helper.make_node(op, inputs, [f"t{len(self.nodes)}"], name=name, **attrs))
        self.consumed.update(i for i in inputs if not i.startswith("w_"))
        return name

    def _out(self, classes, dead, channels: int, spatial: int, desc: str) -> Value:
        """Register the last node's output with its oracle; every tensor keeps a live channel."""
        dead = np.asarray(dead, dtype=bool)
        assert dead.shape == (channels,) and len(classes) == channels
        assert not dead.all(), f"generator invariant: {desc} would be fully dead"
        v = Value(self.nodes[-1].output[0], channels, spatial, np.asarray(classes), dead)
        self.values.append(v)
        shape = f"{channels}x{spatial}x{spatial}"
        self.log.append(f"{self.nodes[-1].name}: {desc} -> {v.name}[{shape}] dead={np.flatnonzero(dead).tolist()}")
        return v

    def pick(self, candidates: list[Value] | None = None) -> Value:
        """One of ``candidates`` (default: every tensor so far)."""
        pool = self.values if candidates is None else candidates
        return pool[self.draw(st.integers(0, len(pool) - 1))]

    # -- steps ----------------------------------------------------------------
    def add_input(self, channels: int) -> Value:
        self.input_classes = self.uf.fresh(channels)
        v = Value("x", channels, SPATIAL, self.input_classes, np.zeros(channels, dtype=bool))
        self.values.append(v)
        return v

    def conv(self, x: Value, out_channels: int | None = None) -> Value:
        """Conv 1x1 or 3x3 (pad 1) with random weights; a drawn subset of output channels is zeroed."""
        k = self.draw(st.sampled_from([1, 3]))
        cout = out_channels if out_channels is not None else self.draw(st.integers(2, 8))
        dead = np.array(self.draw(st.lists(st.booleans(), min_size=cout, max_size=cout)))
        if dead.all():
            dead[self.draw(st.integers(0, cout - 1))] = False
        w = self.rng.normal(0.0, 1.0 / np.sqrt(x.channels * k * k), (cout, x.channels, k, k))
        b = self.rng.normal(0.0, 0.1, cout)
        w[dead], b[dead] = 0.0, 0.0
        tag = self._tag()
        name = self._node(
            "Conv",
            [x.name, self._init(f"{tag}_W", w), self._init(f"{tag}_B", b)],
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
        )
        classes = self.uf.fresh(cout)
        self.conv_classes[name] = classes
        return self._out(classes, dead, cout, x.spatial, f"Conv{k}x{k}({x.name})")

    def batchnorm(self, x: Value) -> Value:
        """BatchNormalization; scale 0 and bias 0 exactly on the input's dead channels."""
        c = x.channels
        scale = self.rng.uniform(0.5, 1.5, c) * self.rng.choice([-1.0, 1.0], c)
        bias = self.rng.normal(0.0, 0.1, c)
        scale[x.dead], bias[x.dead] = 0.0, 0.0
        mean, var = self.rng.normal(0.0, 0.1, c), self.rng.uniform(0.5, 1.5, c)
        tag = self._tag()
        params = [self._init(f"{tag}_{p}", a) for p, a in zip("SBMV", (scale, bias, mean, var))]
        self._node("BatchNormalization", [x.name, *params], epsilon=1e-5)
        return self._out(x.classes, x.dead, c, x.spatial, f"BN({x.name})")

    def activation(self, x: Value) -> Value:
        """Relu, SiLU (Sigmoid, then Mul with its input) or LeakyRelu; all keep zeros zero."""
        kind = self.draw(st.sampled_from(["Relu", "SiLU", "LeakyRelu"]))
        if kind == "Relu":
            self._node("Relu", [x.name])
        elif kind == "LeakyRelu":
            self._node("LeakyRelu", [x.name], alpha=0.1)
        else:
            # The Sigmoid output (0.5 on dead channels) is read only by this Mul: not an oracle tensor.
            self._node("Sigmoid", [x.name])
            self._node("Mul", [x.name, self.nodes[-1].output[0]])
        return self._out(x.classes, x.dead, x.channels, x.spatial, f"{kind}({x.name})")

    def add(self, a: Value | None = None) -> Value:
        """Residual Add onto ``a`` (default: drawn) of a tensor of equal shape; adds a matching Conv when there is none."""
        a = self.pick() if a is None else a
        partners = [v for v in self.values if v is not a and (v.channels, v.spatial) == (a.channels, a.spatial)]
        if partners:
            b = self.pick(partners)
        else:
            b = self.conv(self.pick([v for v in self.values if v.spatial == a.spatial]), out_channels=a.channels)
        for i, j in zip(a.classes, b.classes):
            self.uf.union(i, j)
        self._node("Add", [a.name, b.name])
        return self._out(a.classes, a.dead & b.dead, a.channels, a.spatial, f"Add({a.name}, {b.name})")

    def concat(self) -> Value:
        """Concat along channels of 2-3 tensors (repeats allowed) of the same spatial size."""
        first = self.pick()
        same = [v for v in self.values if v.spatial == first.spatial]
        parts = [first] + [self.pick(same) for _ in range(self.draw(st.integers(1, 2)))]
        self._node("Concat", [p.name for p in parts], axis=1)
        return self._out(
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.dead for p in parts]),
            sum(p.channels for p in parts),
            first.spatial,
            f"Concat({', '.join(p.name for p in parts)})",
        )

    def maxpool(self) -> Value | None:
        """MaxPool 2x2 stride 2 on a tensor of spatial size >= 4 (None, no node, if there is none)."""
        big = [v for v in self.values if v.spatial >= 4]
        if not big:
            return None
        x = self.pick(big)
        self._node("MaxPool", [x.name], kernel_shape=[2, 2], strides=[2, 2])
        return self._out(x.classes, x.dead, x.channels, x.spatial // 2, f"MaxPool({x.name})")

    def head(self) -> None:
        """GlobalAveragePool on every unconsumed tensor (so no node is dangling), Concat, Flatten, Gemm -> ``y``."""
        leaves = [v for v in self.values if v.name not in self.consumed]
        pooled = []
        for v in leaves:
            self._node("GlobalAveragePool", [v.name])
            pooled.append(self._out(v.classes, v.dead, v.channels, 1, f"GAP({v.name})"))
        feat = pooled[0]
        if len(pooled) > 1:
            self._node("Concat", [p.name for p in pooled], axis=1)
            feat = self._out(
                np.concatenate([p.classes for p in pooled]),
                np.concatenate([p.dead for p in pooled]),
                sum(p.channels for p in pooled),
                1,
                "Concat(pooled)",
            )
        self._node("Flatten", [feat.name], axis=1)
        flat = self.nodes[-1].output[0]
        tag = self._tag()
        w = self._init(f"{tag}_W", self.rng.normal(0.0, 1.0 / np.sqrt(feat.channels), (GEMM_OUTPUTS, feat.channels)))
        b = self._init(f"{tag}_B", self.rng.normal(0.0, 0.1, GEMM_OUTPUTS))
        self.nodes.append(helper.make_node("Gemm", [flat, w, b], ["y"], name=f"n{len(self.nodes)}_Gemm", transB=1))
        self.log.append(f"Flatten({feat.name}) -> Gemm -> y[{GEMM_OUTPUTS}]")

    # -- results --------------------------------------------------------------
    def model(self, in_channels: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "random_dag",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, SPATIAL, SPATIAL])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, GEMM_OUTPUTS])],
            self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
        onnx.checker.check_model(m, full_check=True)
        return m

    def expected_widths(self) -> dict[str, int]:
        """Oracle: per Conv, how many output channels have a class that is not removable."""
        removable: dict[int, bool] = {}
        for v in self.values:
            for c, d in zip(v.classes, v.dead):
                r = self.uf.find(int(c))
                removable[r] = removable.get(r, True) and bool(d)
        for c in self.input_classes:
            removable[self.uf.find(int(c))] = False
        return {
            name: int(sum(not removable[self.uf.find(int(c))] for c in cls)) for name, cls in self.conv_classes.items()
        }


def build_random_dag(data) -> tuple[onnx.ModelProto, DagBuilder]:
    """Draw a random DAG of 3-12 body nodes (the first a Conv on the input; a SiLU or an Add's extra Conv
    may overshoot by one) plus the pooling head."""
    # Weights come from a fixed-seed generator: Hypothesis then spends its examples on structure, not values.
    b = DagBuilder(draw=data.draw, rng=np.random.default_rng(0))
    c0 = data.draw(st.integers(1, 4), label="C0")
    b.add_input(c0)
    b.conv(b.values[0])
    body_nodes = data.draw(st.integers(3, 12), label="body nodes")
    while len(b.nodes) < body_nodes:
        kind = data.draw(st.sampled_from(STEP_KINDS))
        if kind == "conv":
            b.conv(b.pick())
        elif kind == "bn":
            b.batchnorm(b.pick())
        elif kind == "act":
            b.activation(b.pick())
        elif kind == "add":
            b.add()
        elif kind == "add_input":
            b.add(b.values[0])
        elif kind == "concat":
            b.concat()
        else:
            b.maxpool()
    b.head()
    return b.model(c0), b


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_random_dag_prunes_exactly_the_removable_channels(data):
    model, builder = build_random_dag(data)
    graph_desc = "\n".join(builder.log)
    expected = builder.expected_widths()

    result = prune_checked(model)
    assert same_outputs(model, result.model, seed=12345), f"outputs differ after pruning:\n{graph_desc}"

    widths = layer_widths(result.model)
    got = {name: widths[name][1] if name in widths else None for name in expected}
    assert got == expected, f"pruned Conv widths {got} != oracle {expected}\n{graph_desc}"
