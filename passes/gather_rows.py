"""Gather kept features as whole rows: Gather(x, idx, axis=1) -> Gemm becomes Transpose(x) -> Gather(axis=0) -> Gemm(transA=1).

The pruning rewrite reads the kept features of a 2-D input ([N, F], e.g. the live
pixels of an MLP's flattened image) through a Gather on axis 1. ONNX Runtime's
CPU Gather copies one block per (row, index), with an integer division and a
memcpy call each: on axis 1 a block is a single value, N * K calls. Gathering
rows of the transposed input ([F, N]) copies K blocks of N values instead, and
the Gemm reads its A operand transposed (transA), so the data it multiplies is
the same. Transpose and Gather only move values: the rewrite is exact for every
input (NaN and infinity included). A MatMul reader of a 2-D input and a 2-D
weight becomes the equal Gemm (opset 11 or later, float types).

On ORT CPU at one thread (pruned LeNet-500-300, 223 of 784 pixels kept) this is
faster from batch 4 (the whole model at batch 64: 109 -> 73 us) and about 1 us
slower at batch 1 (the Transpose): a lowering to time on the target, not a default.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource, constant_value, is_default_domain, opset_version
from onnxprune.pass_infra import GraphPass, PassResult

GEMM_TYPES = (np.float32, np.float64)  # a MatMul of these becomes a Gemm that ORT's CPU provider runs
MIN_GEMM_OPSET = 11  # Gemm without the C input


def _gemm_type(dtype: object) -> bool:
    """Whether a MatMul of ``dtype`` values can become a Gemm (None: type unknown)."""
    try:
        return dtype is not None and np.dtype(dtype).type in GEMM_TYPES
    except TypeError:  # an ONNX type numpy has no name for (bfloat16, float8)
        return False


def _indices_rank(t: gs.Tensor) -> int | None:
    """Rank of the Gather's indices, if known."""
    value = constant_value(t)
    if value is not None:
        return value.ndim
    return len(t.shape) if t.shape is not None else None


def _feature_gather_problem(node: gs.Node, outputs: set[int]) -> str | None:
    """Why ``node`` is not a Gather of 1-D indices on axis 1 of a 2-D tensor (None if it is)."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return "not a two-input Gather"
    x, gathered = node.inputs[0], node.outputs[0]
    if x.shape is None or len(x.shape) != 2:
        return "its data is not known to be 2-D"
    if int(node.attrs.get("axis", 0)) % 2 != 1:
        return "it already gathers rows (axis 0)"
    if x.shape[0] == 1:
        return "its data has one row: rows of the transpose are single values too"
    if _indices_rank(node.inputs[1]) != 1:
        return "its indices are not known to be 1-D"
    if id(gathered) in outputs:
        return "its output is a graph output"
    if not gathered.outputs:
        return "nothing reads its output"
    return None


def _reader_problem(reader: gs.Node, gathered: gs.Tensor, opset: int) -> str | None:
    """Why ``reader`` cannot read ``gathered`` transposed (None if it can)."""
    if not is_default_domain(reader) or reader.op not in ("Gemm", "MatMul"):
        return f"{reader.op} '{reader.name}' reads it (only Gemm and MatMul can read it transposed)"
    if reader.inputs[0] is not gathered or any(t is gathered for t in reader.inputs[1:]):
        return f"{reader.op} '{reader.name}' reads it as more than its A operand"
    if reader.op == "Gemm":
        return f"Gemm '{reader.name}' already reads it transposed" if int(reader.attrs.get("transA", 0)) else None
    b = reader.inputs[1]
    if b.shape is None or len(b.shape) != 2:
        return f"MatMul '{reader.name}' has no 2-D weight"
    if opset < MIN_GEMM_OPSET or not _gemm_type(gathered.dtype):
        return f"MatMul '{reader.name}' cannot become a Gemm (opset {opset}, type {gathered.dtype})"
    return None


def _problem(node: gs.Node, outputs: set[int], opset: int) -> str | None:
    """Why the Gather ``node`` stays as it is (None if it can gather rows instead)."""
    problem = _feature_gather_problem(node, outputs)
    if problem is not None:
        return problem
    gathered = node.outputs[0]
    return next((p for r in gathered.outputs if (p := _reader_problem(r, gathered, opset)) is not None), None)


class _Rewriter:
    """Edits one graph: one Transpose per gathered tensor, shared by every Gather of it."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.names = NameSource(graph)
        self._transposed: dict[int, gs.Variable] = {}

    def transposed(self, x: gs.Tensor) -> gs.Variable:
        """``x`` ([N, F]) transposed to [F, N], made once."""
        if id(x) not in self._transposed:
            base = x.name or "features"
            out = gs.Variable(self.names.fresh(f"{base}_transposed"), dtype=x.dtype, shape=[x.shape[1], x.shape[0]])
            self.graph.nodes.append(gs.Node("Transpose", name=self.names.fresh(f"{base}_transpose"), attrs={"perm": [1, 0]},
                                            inputs=[x], outputs=[out]))
            self._transposed[id(x)] = out
        return self._transposed[id(x)]

    def gather_rows(self, node: gs.Node) -> None:
        """Gather rows of the transposed input; its readers read them transposed."""
        x, indices = node.inputs
        gathered = node.outputs[0]
        kept = gathered.shape[1] if gathered.shape is not None and len(gathered.shape) == 2 else None
        rows = gs.Variable(self.names.fresh(f"{gathered.name}_rows"), dtype=gathered.dtype, shape=[kept, x.shape[0]])
        self.graph.nodes.append(gs.Node("Gather", name=self.names.fresh(f"{node.name}_rows"), attrs={"axis": 0},
                                        inputs=[self.transposed(x), indices], outputs=[rows]))
        for reader in list(gathered.outputs):
            if reader.op == "MatMul":
                reader.op = "Gemm"
                reader.attrs = {}
            reader.attrs["transA"] = 1
            reader.inputs[0] = rows
        node.outputs.clear()


class GatherRowsPass(GraphPass):
    name = "gather-rows"
    summary = ("read a Gather of features (axis 1 of a 2-D input) that feeds Gemm/MatMul as a Gather of rows of the "
               "transposed input and a Gemm with transA (whole rows copied: faster on ORT CPU from batch ~4)")
    requires = frozenset({"shapes"})

    def call(self, graph: gs.Graph) -> PassResult:
        outputs = {id(t) for t in graph.outputs}
        opset = opset_version(graph)
        gathers = [(n, _problem(n, outputs, opset)) for n in graph.nodes if n.op == "Gather" and is_default_domain(n)]
        chosen = [n for n, problem in gathers if problem is None]
        skipped = {n.name: problem for n, problem in gathers if problem is not None}
        rewriter = _Rewriter(graph)
        for node in chosen:
            rewriter.gather_rows(node)
        if chosen:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        details = {"rewritten": [n.name for n in chosen], "skipped": skipped}
        return PassResult(modified=bool(chosen), summary=_summary(len(chosen), skipped), details=details)


def _summary(rewritten: int, skipped: dict[str, str]) -> str:
    """One line: how many Gathers now copy rows, and why the others stay."""
    if not rewritten and not skipped:
        return "no change: the graph has no Gather"
    kept = "; ".join(f"'{name}' stays: {why}" for name, why in skipped.items())
    if not rewritten:
        return f"no change: {kept}"
    head = f"{rewritten} Gather(s) of features now copy rows of the transposed input"
    return f"{head}; {kept}" if kept else head
