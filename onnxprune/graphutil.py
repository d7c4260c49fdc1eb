"""Small helpers over onnx-graphsurgeon graphs, and its messages routed to logging."""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER, LogMode

DEFAULT_DOMAINS = ("", "ai.onnx")

# onnx-graphsurgeon prints its messages on stdout; within graphsurgeon_logging() they come here instead.
GRAPHSURGEON_LOG = logging.getLogger("onnxprune.graphsurgeon")
GRAPHSURGEON_LOG.addHandler(logging.NullHandler())  # silent unless the application configures logging


def _log_graphsurgeon_message(
    message: str | Callable[[], str], severity: int, mode: LogMode = LogMode.EACH, stack_depth: int = 2
) -> None:
    """Stand-in for ``G_LOGGER.log``: its errors as errors, anything less (notes on its own type
    conversions, which onnxprune's checks make moot) at DEBUG level."""
    if severity < G_LOGGER.severity:
        return
    if mode == LogMode.ONCE:
        if hash(message) in G_LOGGER.once_logged:
            return
        G_LOGGER.once_logged.add(hash(message))
    level = severity if severity >= G_LOGGER.ERROR else logging.DEBUG
    if GRAPHSURGEON_LOG.isEnabledFor(level):
        GRAPHSURGEON_LOG.log(level, "%s", message() if callable(message) else message)


@contextmanager
def graphsurgeon_logging() -> Iterator[None]:
    """While open, onnx-graphsurgeon's messages go to the ``onnxprune.graphsurgeon`` logger, not stdout."""
    previous = G_LOGGER.__dict__.get("log")
    G_LOGGER.log = _log_graphsurgeon_message
    try:
        yield
    finally:
        if previous is None:
            del G_LOGGER.log
        else:
            G_LOGGER.log = previous


def is_default_domain(node: gs.Node) -> bool:
    """True for ops of the standard ONNX domain."""
    return node.domain in (None, *DEFAULT_DOMAINS)


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node writing ``t`` (None for graph inputs and constants)."""
    return t.inputs[0] if t.inputs else None


# ONNX element types whose raw bytes are the numpy array as they stand (on a little-endian machine).
_RAW_VIEWABLE = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16, onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.UINT16: np.uint16,
    onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}  # fmt: skip


def _read_lazy(lazy: LazyValues) -> np.ndarray | None:
    """A read-only view of an imported initializer's raw bytes (one copy, where onnx-graphsurgeon's load makes
    two), or None where that is not how its values are stored (external data, typed fields, other types)."""
    tensor = lazy.tensor
    dtype = _RAW_VIEWABLE.get(tensor.data_type)
    if dtype is None or sys.byteorder != "little" or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if not tensor.HasField("raw_data"):
        return None
    raw = tensor.raw_data
    shape = tuple(int(d) for d in tensor.dims)
    if len(raw) != math.prod(shape) * np.dtype(dtype).itemsize:
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def constant_values(t: gs.Constant) -> np.ndarray:
    """The values of a graph constant; loaded, where onnx-graphsurgeon has not yet, as a read-only array.

    onnx-graphsurgeon loads an imported initializer by copying its bytes out of the protobuf and copying
    them again into a writable array; here the first copy is the array. Callers never write into it
    (passes and rewrites replace a constant's values, and copies of a graph share them).
    """
    lazy = t._values
    if type(lazy) is LazyValues:  # exactly onnx-graphsurgeon's: subclasses (memory-mapped, placeholders) load their way
        array = _read_lazy(lazy)
        if array is not None:
            t.values = array  # what onnx-graphsurgeon's own load leaves in the constant
            return array
    return np.asarray(t.values)


def read_initializers(graph: gs.Graph) -> int:
    """Copy the values of every initializer the protobuf holds out of it now (as :func:`constant_values` would
    on first use; external data stays memory-mapped, other values stay as they are). Returns how many."""
    count = 0
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and type(t._values) is LazyValues:
            array = _read_lazy(t._values)
            if array is not None:
                t.values = array
                count += 1
    return count


def constant_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of ``t`` if it is an initializer or the output of a Constant node."""
    if isinstance(t, gs.Constant):
        return constant_values(t)
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


def constant_size(t: gs.Constant) -> int:
    """Number of elements of a constant, from its shape (lazily loaded weights stay unloaded)."""
    return math.prod(int(d) for d in t.shape)


def opset_version(graph: gs.Graph, domain: str = "") -> int:
    """The graph's opset for the default domain (or ``domain``)."""
    imports = graph.import_domains or []
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
        """``base``, or ``base`` with a counter, whichever is not used yet (now reserved)."""
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


def set_or_add_const_input(node: gs.Node, index: int, value: np.ndarray, names: NameSource, name: str) -> None:
    """Like :func:`set_const_input`, but where ``node`` omits input ``index`` a new constant (named
    after ``name``) is added there, with empty names for any omitted inputs before it."""
    if optional_input(node, index) is not None:
        set_const_input(node, index, value, names)
        return
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = gs.Constant(names.fresh(name), np.ascontiguousarray(value))


def weight_and_bias(
    node: gs.Node, read: Callable[[gs.Tensor], np.ndarray | None] | None = None
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A layer's constant weight (input 1) and optional constant bias (input 2), each read by ``read`` (default
    :func:`constant_value`); None if either varies."""
    read = read or constant_value
    weight = read(node.inputs[1]) if len(node.inputs) > 1 else None
    bias_input = optional_input(node, 2)
    bias = read(bias_input) if bias_input is not None else None
    if weight is None or (bias_input is not None and bias is None):
        return None
    return weight, bias


def has_subgraphs(node: gs.Node) -> bool:
    """True if any attribute of ``node`` holds a graph (If, Loop, Scan)."""
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
