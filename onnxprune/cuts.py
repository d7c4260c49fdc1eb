"""Cuts of an ONNX graph: points every path from the inputs to the outputs crosses, and the blocks between them.

A *cut* is a position in the nodes' topological order together with the values live across it: computed
before it and read after it. Graph inputs (fed to every block) and constants (initializers, and values
computed from constants alone: their nodes are copied into each block that reads them) are not counted,
so a residual stream between two sublayers is a cut of one tensor, and a stream carried with an attention
mask or rotary tables is a cut of a few. Everything after a cut is a function of the cut's tensors, the
graph inputs and the constants.

Used by :mod:`onnxprune.verify_blocks` to check a pruned model against its input one block at a time.
Nothing here reads a weight: the structure (weights left in external data, or in the protobuf) is enough.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

log = logging.getLogger(__name__)

MAX_CUT_TENSORS = 8  # a point where more values are live is not used as a cut
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                         "Bernoulli"})
_INLINE_BYTES = 1024  # initializers this small keep their values for shape inference (Reshape targets, axes)


def _subgraph_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every name read by nodes inside ``node``'s subgraphs (an over-approximation of its outer-scope reads)."""
    for attr in node.attribute:
        graphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for graph in graphs:
            for inner in graph.node:
                yield from inner.input
                yield from _subgraph_reads(inner)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes an initializer holds, from its type and dims (its length for types numpy cannot size)."""
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


@dataclass
class GraphIndex:
    """One model's nodes in topological order, what each reads, which values are constant, their types."""

    model: onnx.ModelProto
    nodes: list[onnx.NodeProto]
    reads: list[list[str]]
    producer: dict[str, int]
    constant: set[str]
    graph_inputs: list[str]
    outputs: list[str]
    initializers: dict[str, onnx.TensorProto]
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    _init_closure: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphIndex:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        nodes = _topological(list(graph.node), set(inits) | {i.name for i in graph.input})
        reads = [list(dict.fromkeys(n for n in [*node.input, *_subgraph_reads(node)] if n)) for node in nodes]
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        index = cls(model, nodes, reads, producer, set(inits), [i.name for i in graph.input if i.name not in inits],
                    [o.name for o in graph.output], inits)
        index._find_constants()
        index.types = value_types(model)
        return index

    def _find_constants(self) -> None:
        for node, reads in zip(self.nodes, self.reads):
            has_graph = any(a.HasField("g") or a.graphs for a in node.attribute)
            if node.op_type not in _RANDOM_OPS and not has_graph and all(r in self.constant for r in reads):
                self.constant.update(o for o in node.output if o)

    def is_constant_node(self, i: int) -> bool:
        return all(o in self.constant for o in self.nodes[i].output if o) and any(self.nodes[i].output)

    def initializers_of(self, name: str) -> frozenset[str]:
        """The initializers a constant value is computed from (itself, if it is one)."""
        if name in self._init_closure:
            return self._init_closure[name]
        if name in self.initializers:
            found = frozenset([name])
        elif name in self.producer and name in self.constant:
            found = frozenset().union(*(self.initializers_of(r) for r in self.reads[self.producer[name]]))
        else:
            found = frozenset()
        self._init_closure[name] = found
        return found

    def weight_names(self, positions: Iterable[int]) -> set[str]:
        """The initializers the (non-constant) nodes at ``positions`` read, directly or through constants."""
        names: set[str] = set()
        for i in positions:
            for r in self.reads[i]:
                if r in self.constant:
                    names |= self.initializers_of(r)
        return names

    def weight_bytes(self, names: Iterable[str]) -> int:
        return sum(tensor_bytes(self.initializers[n]) for n in names)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` as they are if already in topological order (ONNX requires it), else sorted (stable Kahn)."""
    known = set(available)
    if all(all(not n or n in known for n in node.input) and not known.update(node.output) for node in nodes):
        return nodes
    produced = {out for node in nodes for out in node.output}
    done, order, pending = set(available), [], list(nodes)
    while pending:
        ready = [n for n in pending if all(not x or x in done or x not in produced for x in n.input)]
        if not ready:  # a cycle, or reads of names nothing produces: keep the rest in file order
            return order + pending
        for node in ready:
            done.update(node.output)
        order += ready
        taken = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in taken]
    return order


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Each value's type as ONNX shape inference gives it, inferred on the structure alone (large initializers
    become typed graph inputs, so no weight is read or copied); empty for a model inference fails on."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version, skeleton.producer_name = model.ir_version, model.producer_name
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph, source = skeleton.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.input.extend(source.input)
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        small = tensor.data_location != onnx.TensorProto.EXTERNAL and tensor_bytes(tensor) <= _INLINE_BYTES
        if small:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; without types no cut qualifies
        log.debug("shape inference failed (%s): no tensor types for the block-wise check", e)
        inferred = skeleton
    g = inferred.graph
    return {v.name: v.type for v in [*g.input, *g.value_info, *g.output] if v.type.HasField("tensor_type")}


@dataclass(frozen=True)
class Cut:
    """A position (nodes before it: ``position``) and the values live across it."""

    position: int
    names: frozenset[str]


def find_cuts(index: GraphIndex, max_tensors: int = MAX_CUT_TENSORS) -> list[Cut]:
    """Every position of the topological order where at most ``max_tensors`` values are live (computed before,
    read after; graph inputs and constants not counted), in order; a run of equal live sets gives its first."""
    last: dict[str, int] = {}
    for i, reads in enumerate(index.reads):
        for r in reads:
            if r in index.producer and r not in index.constant:
                last[r] = i
    dying: dict[int, list[str]] = {}
    for name, i in last.items():
        dying.setdefault(i, []).append(name)
    live: set[str] = set()
    cuts: list[Cut] = []
    for p in range(1, len(index.nodes)):
        live.update(o for o in index.nodes[p - 1].output if last.get(o, -1) >= p)
        live.difference_update(dying.get(p - 1, ()))
        if len(live) <= max_tensors and (not cuts or cuts[-1].names != live):
            cuts.append(Cut(p, frozenset(live)))
    return cuts


def _shape(t: onnx.TypeProto) -> tuple | None:
    """A tensor type's (element type, dims): ints, or "?" for a symbolic dim; None where rank or a dim is unknown."""
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append("?")  # a symbolic size (batch, sequence): never a channel count the engine changes
        else:
            return None
    return tt.elem_type, tuple(dims)


def same_type(name: str, a: GraphIndex, b: GraphIndex) -> bool:
    """Whether ``name`` has a known, equal element type and shape in both models."""
    ta, tb = a.types.get(name), b.types.get(name)
    return ta is not None and tb is not None and _shape(ta) is not None and _shape(ta) == _shape(tb)


def common_cuts(ref: GraphIndex, cand: GraphIndex) -> list[tuple[Cut, Cut]]:
    """Cuts of both models that cut at the same tensors, in order: (reference's cut, candidate's cut).

    The reference's live set may hold values the candidate computes from constants alone (a size the
    rewrite made a constant): they are fed to the reference's block only. Every tensor the candidate's
    block is fed must have the same name, element type and shape in both models."""
    by_names: dict[frozenset[str], list[Cut]] = {}
    for cut in find_cuts(cand):
        if not cut.names & ref.constant:
            by_names.setdefault(cut.names, []).append(cut)
    pairs: list[tuple[Cut, Cut]] = []
    after = 0
    for cut in find_cuts(ref):
        key = frozenset(n for n in cut.names if n not in cand.constant)
        match = next((c for c in by_names.get(key, ()) if c.position > after), None)
        if match is not None and all(same_type(n, ref, cand) for n in key):
            pairs.append((cut, match))
            after = match.position
    return pairs


# -- blocks: runs of segments between common cuts, of bounded weight size ----------------------------------------


@dataclass
class Block:
    """Consecutive segments between two common cuts: its node positions in each model, the tensors it is fed
    (the start cut; the first block is fed the graph inputs alone), those it hands on (the end cut), the cuts
    inside it, and the bytes of weights it reads (the larger of the two models')."""

    number: int
    ref: tuple[Cut, Cut]
    cand: tuple[Cut, Cut]
    inner: list[frozenset[str]]
    weight_bytes: int

    @property
    def label(self) -> str:
        return f"{_cut_label(self.ref[0].names, 'inputs')} -> {_cut_label(self.ref[1].names, 'outputs')}"


def _cut_label(names: frozenset[str], empty: str) -> str:
    shown = sorted(names)
    return empty if not shown else ", ".join(shown[:3]) + (f" (+{len(shown) - 3})" if len(shown) > 3 else "")


def plan_blocks(ref: GraphIndex, cand: GraphIndex, budget: int) -> list[Block]:
    """The models cut at their common cuts, consecutive segments merged while the weights a block reads stay
    within ``budget`` bytes (a segment larger than the budget is a block of its own)."""
    pairs = common_cuts(ref, cand)
    bounds = [(Cut(0, frozenset()), Cut(0, frozenset())), *pairs,
              (Cut(len(ref.nodes), frozenset()), Cut(len(cand.nodes), frozenset()))]
    weights = [(_segment_weights(ref, a[0], b[0]), _segment_weights(cand, a[1], b[1])) for a, b in zip(bounds, bounds[1:])]
    blocks: list[Block] = []
    i = 0
    while i < len(weights):
        names_r, names_c, j, size = set(), set(), i, 0
        while j < len(weights):
            nr, nc = names_r | weights[j][0], names_c | weights[j][1]
            grown = max(ref.weight_bytes(nr), cand.weight_bytes(nc))
            if j > i and grown > budget:
                break
            names_r, names_c, size, j = nr, nc, grown, j + 1
        inner = [bounds[k][0].names for k in range(i + 1, j)]
        blocks.append(Block(len(blocks) + 1, (bounds[i][0], bounds[j][0]), (bounds[i][1], bounds[j][1]), inner, size))
        i = j
    return blocks


def _segment_weights(index: GraphIndex, start: Cut, end: Cut) -> set[str]:
    return index.weight_names(i for i in range(start.position, end.position) if not index.is_constant_node(i))


def block_nodes(index: GraphIndex, start: Cut, end: Cut) -> list[int]:
    """Positions of the nodes a block runs: the non-constant nodes between its cuts, and the constant nodes
    they read from (wherever they are in the order), in topological order."""
    body = [i for i in range(start.position, end.position) if not index.is_constant_node(i)]
    constants: set[int] = set()
    stack = [r for i in body for r in index.reads[i] if r in index.constant]
    while stack:
        name = stack.pop()
        k = index.producer.get(name)
        if k is not None and k not in constants:
            constants.add(k)
            stack.extend(index.reads[k])
    return sorted(set(body) | constants)


def block_model(index: GraphIndex, positions: list[int], inputs: dict[str, np.dtype], outputs: list[str],
                ir_version: int) -> onnx.ModelProto:
    """The nodes at ``positions`` as a model: fed ``inputs`` (name -> dtype; the cut's tensors and the graph
    inputs it reads), computing ``outputs``. Its initializers are copies of the model's TensorProtos: a weight
    in external data stays there (the copy is a reference to the same file), one in the protobuf is copied."""
    nodes = [index.nodes[i] for i in positions]
    produced = {o for node in nodes for o in node.output}
    reads = dict.fromkeys(r for i in positions for r in index.reads[i])
    missing = [r for r in reads if r not in produced and r not in index.initializers and r not in inputs]
    if missing:
        raise ValueError(f"internal error: a block reads {missing[:3]}, computed outside it (not a cut)")
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(d), None) for n, d in inputs.items()
         if n in reads and n not in produced and n not in index.initializers],
        [onnx.ValueInfoProto(name=n) for n in outputs],
        [index.initializers[r] for r in reads if r in index.initializers and r not in produced],
    )
    model = helper.make_model(graph, opset_imports=index.model.opset_import, functions=index.model.functions)
    model.ir_version = ir_version
    return model


def residual_branches(ref: GraphIndex, cand: GraphIndex, block: Block, positions: set[int]) -> list[str]:
    """The residual branches a block computes: for each cut tensor or graph output it computes as
    ``Add(stream, branch)`` (in both models, from the same two names), where ``stream`` is a cut tensor or a
    graph input and ``branch`` is computed inside the block, the branch (what the block adds to the stream,
    before the Add rounds it)."""
    streams = set(block.ref[0].names).union(*block.inner, ref.graph_inputs)
    out = []
    for name in set(block.ref[1].names).union(*block.inner, ref.outputs):
        k = ref.producer.get(name)
        if k is None or k not in positions or ref.nodes[k].op_type != "Add":
            continue
        a, b = (list(ref.nodes[k].input) + ["", ""])[:2]
        branch = b if a in streams else a if b in streams else None
        other = cand.producer.get(name)
        if (branch is None or branch in streams or branch in ref.constant or ref.producer.get(branch) not in positions
                or other is None or cand.nodes[other].op_type != "Add" or set(cand.nodes[other].input) != {a, b}
                or not same_type(branch, ref, cand)):
            continue
        out.append(branch)
    return sorted(out)
