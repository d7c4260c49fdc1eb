"""Keep a QDQ model's data int8 through ops that only move or compare values.

ONNX Runtime fuses DequantizeLinear -> op -> QuantizeLinear into an int8 kernel for the ops it knows
(Conv, Gemm, MatMul, MaxPool, Split, Reshape, Transpose, ...). Between them, an op its quantizer leaves in
float32 (SpaceToDepth, Max) forces the data back to float32 and quantizes it again: a pass through memory at
four times the width, and a (de)quantization on each side. This pass moves the conversions out of the way,
each rewrite exact on every input:

* ``move(DQ(q)) -> DQ(move(q))`` and ``Q(move(x)) -> move(Q(x))`` for an op that only moves values
  (``MOVE_OPS``; Split gets a DequantizeLinear per output): an elementwise map commutes with any permutation or
  copy of the elements.
* ``Max(DQ(a), DQ(b), ...) -> DQ(Max(a, b, ...))`` (and Min) where the DequantizeLinears share one scale and
  zero point: ``(q - z) * s`` is non-decreasing in ``q`` for ``s > 0``.
* ``Q(DQ(q)) -> q`` with the same scale, zero point and type: ``(q - z) * s / s`` is within a few float32
  units of the integer ``q - z`` (``|q - z| <= 255``), so rounding gives it back.

Only per-tensor (scalar) scales of activations are moved; weights' DequantizeLinears, which ORT fuses into
the layer reading them, stay where they are.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource, constant_value, is_default_domain
from onnxprune.pass_infra import GraphPass, PassResult

logger = logging.getLogger(__name__)

#: Ops whose first input's values reach the outputs unchanged (moved, copied or dropped); other inputs are shapes.
MOVE_OPS = frozenset({"SpaceToDepth", "DepthToSpace", "Split", "Flatten", "Reshape", "Transpose", "Squeeze",
                      "Unsqueeze", "Identity"})
#: Ops that pick one of their inputs' values per element.
ORDER_OPS = frozenset({"Max", "Min"})
MAX_ROUNDS = 64  # each round moves every movable conversion one op further; a model's chains are shorter


def _params(node: gs.Node) -> tuple | None:
    """(scale, zero point, zero point dtype) of a per-tensor Quantize/DequantizeLinear with constant, positive
    parameters; None otherwise (per-axis, blocked, missing zero point, or computed parameters)."""
    if len(node.inputs) != 3 or node.attrs.get("block_size", 0):
        return None
    scale, zero = constant_value(node.inputs[1]), constant_value(node.inputs[2])
    if scale is None or zero is None or scale.size != 1 or zero.size != 1 or not float(scale.reshape(-1)[0]) > 0:
        return None
    return float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0]), np.dtype(zero.dtype).str


def _is_activation_dq(node: gs.Node) -> bool:
    """A per-tensor DequantizeLinear of computed (not constant) data."""
    return (node.op == "DequantizeLinear" and is_default_domain(node) and not isinstance(node.inputs[0], gs.Constant)
            and _params(node) is not None)


def _sole_reader(t: gs.Tensor, outputs: set[int]) -> gs.Node | None:
    """The one node reading ``t`` when nothing else (no other node, no graph output) does."""
    return t.outputs[0] if len(t.outputs) == 1 and id(t) not in outputs else None


class _Mover:
    """The rewrites, on one graph."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph, self.names = graph, NameSource(graph)
        self.outputs = {id(t) for t in graph.outputs}
        self.moved = {"dequantize_later": 0, "quantize_earlier": 0, "order_in_int8": 0, "pairs_removed": 0}

    def _dequantize(self, q: gs.Tensor, like: gs.Node, out: gs.Tensor) -> None:
        """A DequantizeLinear of ``q`` with ``like``'s parameters writing ``out``."""
        self.graph.nodes.append(gs.Node("DequantizeLinear", self.names.fresh(f"{like.name}_moved"), dict(like.attrs),
                                        [q, *like.inputs[1:]], [out]))

    def _int8_twin(self, t: gs.Tensor, conversion: gs.Node) -> gs.Variable:
        """A new tensor of ``t``'s shape holding the values ``conversion`` (a Q or DQ) stores as integers."""
        return gs.Variable(self.names.fresh(f"{t.name}_int8"), dtype=conversion.inputs[2].values.dtype, shape=t.shape)

    def dequantize_later(self, dq: gs.Node) -> bool:
        """move(DQ(q)) -> DQ(move(q)) for the DQ's sole reader, a MOVE_OPS op reading it as its data."""
        op = _sole_reader(dq.outputs[0], self.outputs)
        if op is None or op.op not in MOVE_OPS or not is_default_domain(op) or op.inputs[0] is not dq.outputs[0]:
            return False
        q = dq.inputs[0]
        op.inputs[0] = q
        for k, out in enumerate(list(op.outputs)):
            twin = self._int8_twin(out, dq)
            op.outputs[k] = twin
            self._dequantize(twin, dq, out)
        dq.outputs.clear()
        self.moved["dequantize_later"] += 1
        return True

    def quantize_earlier(self, q: gs.Node) -> bool:
        """Q(move(x)) -> move(Q(x)) where the Q is the move's only reader."""
        if q.op != "QuantizeLinear" or not is_default_domain(q) or _params(q) is None or not q.inputs[0].inputs:
            return False
        op = q.inputs[0].inputs[0]
        if (op.op not in MOVE_OPS or not is_default_domain(op) or len(op.outputs) != 1
                or _sole_reader(op.outputs[0], self.outputs) is not q):
            return False
        x, quantized = op.inputs[0], q.outputs[0]
        twin = self._int8_twin(x, q)
        q.inputs[0], q.outputs[0] = x, twin
        op.inputs[0], op.outputs[0] = twin, quantized
        self.moved["quantize_earlier"] += 1
        return True

    def order_in_int8(self, node: gs.Node) -> bool:
        """Max/Min(DQ(a), DQ(b), ...) -> DQ(Max/Min(a, b, ...)) where the DQs share their parameters."""
        if node.op not in ORDER_OPS or not is_default_domain(node) or not node.inputs:
            return False
        dqs = [t.inputs[0] if len(t.inputs) == 1 else None for t in node.inputs]
        if any(dq is None or not _is_activation_dq(dq) or _sole_reader(dq.outputs[0], self.outputs) is not node
               for dq in dqs):
            return False
        if len({_params(dq) for dq in dqs}) != 1:
            return False
        out = node.outputs[0]
        node.inputs = [dq.inputs[0] for dq in dqs]
        node.outputs[0] = self._int8_twin(out, dqs[0])
        self._dequantize(node.outputs[0], dqs[0], out)
        for dq in dqs:
            dq.outputs.clear()
        self.moved["order_in_int8"] += 1
        return True

    def remove_pair(self, q: gs.Node) -> bool:
        """Q(DQ(q)) -> q where both use one scale, zero point and type."""
        if q.op != "QuantizeLinear" or not q.inputs[0].inputs:
            return False
        dq = q.inputs[0].inputs[0]
        if not _is_activation_dq(dq) or _params(dq) != _params(q) or id(q.outputs[0]) in self.outputs:
            return False
        source, quantized = dq.inputs[0], q.outputs[0]
        for reader in list(quantized.outputs):
            for k, t in enumerate(reader.inputs):
                if t is quantized:
                    reader.inputs[k] = source
        q.outputs.clear()
        self.moved["pairs_removed"] += 1
        return True

    def one_round(self) -> bool:
        """Every rewrite that applies, once; True if any did."""
        changed = False
        for node in list(self.graph.nodes):
            if not node.outputs:
                continue
            if _is_activation_dq(node):
                changed |= self.dequantize_later(node)
            elif node.op == "QuantizeLinear":
                changed |= self.remove_pair(node) or self.quantize_earlier(node)
            else:
                changed |= self.order_in_int8(node)
        if changed:
            self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return changed


class Int8MovementPass(GraphPass):
    name = "int8-movement"
    summary = ("keep a QDQ model's data int8 through ops that only move or compare values (SpaceToDepth, Split, "
               "Max, ...): conversions moved past them, matching pairs removed (exact)")

    def call(self, graph: gs.Graph) -> PassResult:
        mover = _Mover(graph)
        for _ in range(MAX_ROUNDS):
            if not mover.one_round():
                break
        modified = any(mover.moved.values())
        summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in mover.moved.items() if n) or "no change"
        return PassResult(modified=modified, summary=summary, details=dict(mover.moved))
