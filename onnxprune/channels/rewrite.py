"""Applying a prune plan to the graph: every rule edits its own node."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.layout import dims, kept_per_part
from onnxprune.channels.plan import PrunePlan
from onnxprune.channels.rules import RULES
from onnxprune.channels.stored import set_stored, stored_value
from onnxprune.graphutil import NameSource, has_subgraphs, set_or_add_const_input


class Rewriter:
    """The :class:`~onnxprune.channels.rule_base.RewriteContext` the rules edit through."""

    def __init__(self, graph: gs.Graph, plan: PrunePlan) -> None:
        self.graph = graph
        self.plan = plan
        self.names = NameSource(graph)
        self._slots = plan.analysis.ctx.slots
        self._values = plan.analysis.ctx.values
        self._keep: dict[str, np.ndarray] = {}
        for tracked in self._slots.tracked:
            mask = plan.keep_mask(tracked.tensor)
            if not mask.all():
                self._keep[tracked.tensor] = mask
        self.inserted: list[gs.Variable] = []
        self.set_shapes = False  # set by apply_plan: whether the rewrite set every shape it changed

    # -- queries ------------------------------------------------------------
    def keep(self, t: gs.Tensor | None) -> np.ndarray | None:
        if t is None or self._slots.get(t.name) is None:
            return None
        mask = self._keep.get(t.name)
        return mask if mask is not None else np.ones(self._slots.get(t.name).size, dtype=bool)

    def changed(self, t: gs.Tensor | None) -> bool:
        return t is not None and t.name in self._keep

    def keep_read(self, node: gs.Node, t: gs.Tensor | None) -> np.ndarray | None:
        """Channels of ``t`` that ``node`` still reads: the kept ones, less its read drops."""
        keep = self.keep(t)
        drop = self.plan.read_drops.get((node.name, t.name)) if t is not None else None
        return keep if drop is None else keep & ~drop

    def changed_read(self, node: gs.Node, t: gs.Tensor | None) -> bool:
        return self.changed(t) or (t is not None and (node.name, t.name) in self.plan.read_drops)

    def gather_input(self, node: gs.Node, index: int) -> None:
        """If ``node`` drops channels of input ``index``, read the kept ones through a Gather."""
        t = node.inputs[index]
        drop = self.plan.read_drops.get((node.name, t.name))
        if drop is None:
            return
        keep = self.keep(t)
        positions = (np.cumsum(keep) - 1)[keep & ~drop]
        axis = self.axis(t)
        out = gs.Variable(self.names.fresh(f"{t.name}_read_by_{node.name}"), dtype=t.dtype)
        if t.shape is not None:
            shape = list(t.shape)
            shape[axis] = int(positions.size)
            out.shape = shape
        idx = gs.Constant(self.names.fresh(f"{node.name}_kept_inputs"), positions.astype(np.int64))
        self.graph.nodes.append(gs.Node("Gather", name=self.names.fresh(f"{node.name}_gather"), attrs={"axis": axis},
                                        inputs=[t, idx], outputs=[out]))
        node.inputs[index] = out

    def values(self, t: gs.Tensor) -> np.ndarray:
        return self._values[t.name]

    def axis(self, t: gs.Tensor) -> int:
        return self._slots.get(t.name).axis

    def tracked_layout(self, t: gs.Tensor) -> bool:
        """True if ``t``'s channels are spread over several axes (heads)."""
        tracked = self._slots.get(t.name)
        return tracked is not None and tracked.layout is not None

    def kept_per_axis(self, t: gs.Tensor) -> dict[int, tuple[int, int]]:
        """For each axis of a tracked tensor that carries channels: (channel values before, kept)."""
        tracked = self._slots.get(t.name)
        keep = self.keep(t)
        per_part = kept_per_part(keep, dims(tracked.parts))
        out: dict[int, tuple[int, int]] = {}
        for part, mask in zip(tracked.parts, per_part):
            before, kept = out.get(part.axis, (1, 1))
            out[part.axis] = (before * part.dim, kept * int(mask.sum()))
        return out

    @staticmethod
    def const(t: gs.Tensor | None) -> np.ndarray | None:
        return stored_value(t)

    def parts(self, t: gs.Tensor) -> tuple:
        return self._slots.get(t.name).parts

    def repeat_source(self, node: gs.Node) -> np.ndarray | None:
        return self.plan.analysis.ctx.repeats.get(node.name)

    @property
    def changed_tensors(self) -> dict[str, np.ndarray]:
        return self._keep

    # -- edits --------------------------------------------------------------
    def set_const(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        set_stored(self.graph, node, index, value, self.names)

    def set_const_or_add(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        set_or_add_const_input(node, index, value, self.names, f"{node.name}_input{index}")

    def insert_after(self, node: gs.Node, op: str, extra_inputs: list, attrs: dict) -> gs.Node:
        out = node.outputs[0]
        mid = gs.Variable(self.names.fresh(f"{out.name}_pre_{op.lower()}"), dtype=out.dtype)
        node.outputs[0] = mid
        consts = [gs.Constant(self.names.fresh(f"{out.name}_{op.lower()}_arg"), np.ascontiguousarray(v)) for v in extra_inputs]
        new = gs.Node(op, name=self.names.fresh(f"{node.name}_{op.lower()}"), attrs=attrs, inputs=[mid, *consts], outputs=[out])
        self.graph.nodes.append(new)
        self.inserted.append(mid)
        return new

    def add_bias_after(self, node: gs.Node, bias: np.ndarray) -> None:
        self.insert_after(node, "Add", [bias], {})


def apply_plan(graph: gs.Graph, plan: PrunePlan) -> Rewriter:
    """Edit ``graph`` in place so that the plan's components disappear. The returned rewriter's ``set_shapes``
    says whether the rewrite set every shape it changed (see :func:`_set_pruned_shapes`)."""
    rw = Rewriter(graph, plan)
    if not rw.changed_tensors and not plan.read_drops:
        rw.set_shapes = True
        return rw
    readers = {name for name, _ in plan.read_drops}
    before = {id(node) for node in graph.nodes}
    for node in list(graph.nodes):
        if node.name not in readers and not any(rw.changed(t) for t in list(node.inputs) + list(node.outputs)):
            continue
        rule = RULES.get(node.op)
        if rule is None:  # the analysis pins every channel that reaches an uncovered op
            raise AssertionError(f"no rule to rewrite {node.op} '{node.name}' although its channels change")
        rule.rewrite(node, rw)
    added = any(id(node) not in before for node in graph.nodes)
    reads_shapes = bool(graph.functions) or any(node.op in _SHAPE_READERS or has_subgraphs(node) for node in graph.nodes)
    rw.set_shapes = _set_pruned_shapes(rw, graph) and not added and not reads_shapes
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return rw


# Ops whose output is a tensor's shape or size: shape inference follows such values into the shapes of other
# tensors (a Reshape to a computed target), which a rewrite that only sets channel counts does not redo (nor
# anything inside subgraphs and functions).
_SHAPE_READERS = frozenset({"Shape", "Size"})


def _set_pruned_shapes(rw: Rewriter, graph: gs.Graph) -> bool:
    """Give every tensor that lost channels its new shape; True if each of them had a known shape with its
    channels on one axis: only its channel count changed, to a number the rewrite knows (shape inference would
    find the same shapes, as long as the rewrite added no node and no op reads a shape)."""
    tensors = graph.tensors()
    plain = True
    for name, mask in rw.changed_tensors.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Variable):
            continue
        plain = plain and t.shape is not None and not rw.tracked_layout(t)
        if t.shape is not None:
            t.shape = _pruned_shape(rw, t, mask)
    return plain


def _pruned_shape(rw: Rewriter, t: gs.Variable, mask: np.ndarray) -> list:
    """``t``'s shape once its channels are pruned (an axis that also holds a symbolic factor becomes unknown)."""
    shape = list(t.shape)
    if not rw.tracked_layout(t):
        shape[rw.axis(t)] = int(mask.sum())
        return shape
    for axis, (before, kept) in rw.kept_per_axis(t).items():
        d = shape[axis]
        shape[axis] = d // before * kept if isinstance(d, (int, np.integer)) and d >= 0 else None
    return shape
