"""Small helpers over onnx-graphsurgeon graphs."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx_graphsurgeon as gs

DEFAULT_DOMAINS = ("", "ai.onnx")


def is_default_domain(node: gs.Node) -> bool:
    """True for ops of the standard ONNX domain."""
    return node.domain in (None, *DEFAULT_DOMAINS)


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node writing ``t`` (None for graph inputs and constants)."""
    return t.inputs[0] if t.inputs else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of ``t`` if it is an initializer or the output of a Constant node."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = producer(t)
    if node is not None and node.op == "Constant" and is_default_domain(node):
        attrs = node.attrs
        if "value" in attrs and isinstance(attrs["value"], gs.Constant):
            return np.asarray(attrs["value"].values)
        for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
        for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(list(attrs[key]), dtype=dtype)
    return None


def is_constant(t: gs.Tensor | None) -> bool:
    return t is not None and constant_value(t) is not None


def opset_version(graph: gs.Graph, domain: str = "") -> int:
    """The graph's opset for the default domain (or ``domain``)."""
    imports = getattr(graph, "import_domains", None) or []
    for entry in imports:
        if entry.domain in ((domain,) if domain else DEFAULT_DOMAINS):
            return int(entry.version)
    return int(graph.opset)


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` if present and not the empty name for an omitted optional input."""
    if index < len(node.inputs):
        t = node.inputs[index]
        if t is not None and (isinstance(t, gs.Constant) or t.name):
            return t
    return None


class NameSource:
    """Fresh tensor/node names that do not clash with the graph's."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        self._counter = itertools.count()

    def fresh(self, base: str) -> str:
        name = base
        while name in self.used:
            name = f"{base}_{next(self._counter)}"
        self.used.add(name)
        return name


def set_const_input(node: gs.Node, index: int, value: np.ndarray, names: NameSource) -> None:
    """Give ``node`` a new constant at input ``index`` without touching other users of the old one."""
    old = node.inputs[index]
    value = np.ascontiguousarray(value)
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = value
        return
    base = old.name if old is not None and old.name else f"{node.name}_input{index}"
    new = gs.Constant(names.fresh(base + "_pruned"), value)
    node.inputs[index] = new


def has_subgraphs(node: gs.Node) -> bool:
    return next(node.subgraphs(), None) is not None


def walk_subgraph_inputs(node: gs.Node) -> Iterator[str]:
    """Names of outer-scope tensors that the node's subgraphs read."""
    for sub in node.subgraphs(recursive=True):
        local = {t.name for t in sub.inputs}
        for n in sub.nodes:
            local.update(o.name for o in n.outputs)
        for n in sub.nodes:
            for t in n.inputs:
                if t is not None and t.name and t.name not in local and not isinstance(t, gs.Constant):
                    yield t.name
