"""Symbolic values of small shape tensors (the targets of Reshape).

Exporters often compute a Reshape target at run time, e.g. ``x.view(x.size(0), -1, 1, 1)``
becomes ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], [1], [1])`` (TorchScript) or
``Concat(Reshape(Squeeze(Shape(x, end=1)), [-1]), [-1, 1, 1])`` (dynamo, unoptimised). Each entry of
such a tensor is either a literal (and where it is stored, so a rewrite can
change it), "dimension j of tensor t" (times an integer) read at run time, or that dimension divided
by an integer (TorchScript's ``embed_dim // num_heads``, a :class:`Quotient`).

:func:`static_ints` evaluates small integer tensors that only depend on constants and static sizes
(Slice bounds that ``torch.chunk`` computes from the channel count, the ``-1`` of TorchScript's Expand guard).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxprune.channels.rule_base import normalize_axis
from onnxprune.graphutil import constant_value, optional_input, producer


@dataclass(frozen=True)
class Literal:
    """A constant entry; ``source`` = (node, input index, element index) holding it, if rewritable."""

    value: int
    source: tuple[gs.Node, int, int] | None = None


@dataclass(frozen=True)
class Dim:
    """Dimension ``axis`` of tensor ``tensor`` (times ``scale``), read at run time; ``source`` = (Concat node,
    input index) when that input holds this entry alone (a rewrite may replace it by a constant)."""

    tensor: str
    axis: int
    source: tuple[gs.Node, int] | None = None
    scale: int = 1


@dataclass(frozen=True)
class Computed:
    """An entry computed by ops the follower does not read (e.g. ``C // num_heads``): its value is whatever
    the graph computes, so a rewrite cannot change it (an axis that carries channels there stays whole)."""


@dataclass(frozen=True)
class Quotient(Computed):
    """``Dim(tensor, axis) * scale // divisor`` where ``divisor`` does not divide ``scale`` (TorchScript's
    ``head_dim = embed_dim // num_heads``). A :class:`Computed` to code that does not read it; its value is
    known where the dimension is static (:func:`quotient_value`), and ``source`` (Concat node, input
    index) is where it sits alone, so a rewrite may replace it by a constant."""

    tensor: str
    axis: int
    scale: int = 1
    divisor: int = 1
    source: tuple[gs.Node, int] | None = None


Entry = Literal | Dim | Computed


def _ints(t: gs.Tensor) -> list[int] | None:
    """The value of a constant integer tensor as a list (None if not constant)."""
    v = constant_value(t)
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


def _int_scalar(t: gs.Tensor) -> int | None:
    """The value of a one-element constant of an integer type (None otherwise)."""
    v = constant_value(t)
    if v is None or np.asarray(v).size != 1 or not np.issubdtype(np.asarray(v).dtype, np.integer):
        return None
    return int(np.asarray(v).reshape(-1)[0])


def shape_entries(t: gs.Tensor, graph: gs.Graph, depth: int = 0) -> list[Entry] | None:
    """Entries of a 1-D int64 shape tensor, or None if they cannot be followed."""
    if depth > 16:
        return None
    v = constant_value(t)
    if v is not None:
        return [Literal(int(x)) for x in np.asarray(v).reshape(-1)]
    node = producer(t)
    if node is None:
        return None
    if node.op in ("Gather", "Slice") and not _one_axis(node.inputs[0]):
        return None  # rows of a 2-D shape value, not entries
    follow = _FOLLOW.get(node.op)
    return None if follow is None else follow(node, graph, depth + 1)


def _concat_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """Concat of shape values: each input's entries in turn, an input holding one Dim or Quotient alone
    being where a rewrite may put a constant."""
    if int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    out: list[Entry] = []
    for i, part in enumerate(node.inputs):
        entries = shape_entries(part, graph, depth)
        if entries is None:
            length = part.shape[0] if part.shape is not None and len(part.shape) == 1 else None
            if not isinstance(length, (int, np.integer)) or length < 0:
                return None
            entries = [Computed()] * int(length)
        if constant_value(part) is not None:
            entries = [Literal(e.value, (node, i, k)) for k, e in enumerate(entries)]
        elif len(entries) == 1 and isinstance(entries[0], (Dim, Quotient)):
            entries = [replace(entries[0], source=(node, i))]
        out += entries
    return out


def _same_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """Ops that keep the entries as they are (Unsqueeze, Squeeze, Cast, Identity)."""
    return shape_entries(node.inputs[0], graph, depth)


def _mul_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """A size times an integer constant (TorchScript's ``num_key_value_heads * n_rep``, ``batch * num_heads``)."""
    for k in (0, 1):
        c = _int_scalar(node.inputs[1 - k])
        if c is not None:
            entries = shape_entries(node.inputs[k], graph, depth)
            if entries is not None and len(entries) == 1 and isinstance(entries[0], Dim):
                e = entries[0]
                return [Dim(e.tensor, e.axis, scale=e.scale * c)]
    return None


def _div_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """A size divided by a positive integer constant (TorchScript's ``embed_dim // num_heads``): a Dim again
    where the constant divides its scale, else a :class:`Quotient` (integer division of sizes, which are
    never negative, rounds down)."""
    c = _int_scalar(node.inputs[1])
    entries = shape_entries(node.inputs[0], graph, depth)
    if c is None or c <= 0 or entries is None or len(entries) != 1:
        return None
    e = entries[0]
    if isinstance(e, Dim):
        if e.scale % c == 0:
            return [Dim(e.tensor, e.axis, scale=e.scale // c)]
        return [Quotient(e.tensor, e.axis, e.scale, c)]
    if isinstance(e, Quotient):  # (a // b) // c == a // (b * c) for a >= 0
        return [Quotient(e.tensor, e.axis, e.scale, e.divisor * c)]
    return None


def _where_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """TorchScript's Expand guard ``Where(Equal(s, -1), 1, s)``: ``s`` with its -1 entries made 1 (a size read
    at run time is never -1). Followed only where the -1 and the 1 are shown to be all -1 and all 1."""
    test = producer(node.inputs[0])
    s = node.inputs[2]
    if test is None or test.op != "Equal" or s not in test.inputs or node.inputs[1] is s:
        return None
    other = test.inputs[1] if test.inputs[0] is s else test.inputs[0]
    minus, ones = static_ints(other), static_ints(node.inputs[1])
    entries = shape_entries(s, graph, depth)
    if entries is None or minus is None or ones is None or minus.size not in (1, len(entries)):
        return None
    if np.any(minus != -1) or np.any(ones != 1) or ones.size not in (1, len(entries)):
        return None
    return [Literal(1) if isinstance(e, Literal) and e.value == -1 else e for e in entries]


def _reshape_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """Reshape to one axis: the elements in order (dynamo's ``Reshape(Squeeze(Shape(x, end=1)), [-1])``)."""
    target = _ints(node.inputs[1])
    return shape_entries(node.inputs[0], graph, depth) if target is not None and len(target) <= 1 else None


def _shape_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """Shape(x[, start, end]): one Dim per axis read."""
    x = node.inputs[0]
    if x.shape is None:
        return None
    start, end = _shape_range(node, len(x.shape))
    return [Dim(x.name, j) for j in range(start, end)]


def _shape_range(node: gs.Node, rank: int) -> tuple[int, int]:
    """The axes [start, end) a Shape node reads of a rank-``rank`` tensor."""
    start = min(max(normalize_axis(int(node.attrs.get("start", 0)), rank), 0), rank)
    end = node.attrs.get("end")
    end = rank if end is None else min(max(normalize_axis(int(end), rank), 0), rank)
    return start, end


def _gather_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """Gather of entries along axis 0 by constant indices."""
    if int(node.attrs.get("axis", 0)) != 0:
        return None
    data, idx = shape_entries(node.inputs[0], graph, depth), _ints(node.inputs[1])
    if data is None or idx is None:
        return None
    return [_strip(data[normalize_axis(i, len(data))]) for i in idx]


def _slice_entries(node: gs.Node, graph: gs.Graph, depth: int) -> list[Entry] | None:
    """Slice of entries by constant bounds."""
    data = shape_entries(node.inputs[0], graph, depth)
    bounds = _slice_bounds(node, _ints)
    if data is None or bounds is None:
        return None
    return [_strip(e) for e in data[slice(*bounds)]]


def _slice_bounds(node: gs.Node, ints: Callable[[gs.Tensor], list[int] | None]) -> tuple | None:
    """(start, end, step) of a Slice of a 1-D value along its one axis (None if not known)."""
    if "starts" in node.attrs:  # before opset 10
        starts, ends, steps = list(node.attrs["starts"]), list(node.attrs["ends"]), [1]
    else:
        starts, ends = ints(node.inputs[1]), ints(node.inputs[2])
        steps_t = optional_input(node, 4)
        steps = ints(steps_t) if steps_t is not None else [1]
    if not starts or not ends or not steps or len(starts) != 1 or len(ends) != 1 or len(steps) != 1:
        return None
    return starts[0], ends[0], steps[0]


_FOLLOW: dict[str, Callable[[gs.Node, gs.Graph, int], list[Entry] | None]] = {
    "Concat": _concat_entries, "Unsqueeze": _same_entries, "Squeeze": _same_entries, "Cast": _same_entries,
    "Identity": _same_entries, "Mul": _mul_entries, "Div": _div_entries, "Where": _where_entries,
    "Reshape": _reshape_entries, "Shape": _shape_entries, "Gather": _gather_entries, "Slice": _slice_entries,
}


def _one_axis(t: gs.Tensor) -> bool:
    """False when ``t`` is known to have another rank than 1."""
    return t.shape is None or len(t.shape) == 1


def _strip(e: Entry) -> Entry:
    """An entry moved by Gather/Slice no longer sits where it is stored."""
    if isinstance(e, Dim):
        return Dim(e.tensor, e.axis, scale=e.scale)
    if isinstance(e, Quotient):
        return replace(e, source=None)
    return Literal(e.value) if isinstance(e, Literal) else e


def quotient_value(e: Quotient, tensor_of: Callable[[str], gs.Tensor | None]) -> int | None:
    """The value of a :class:`Quotient` whose dimension is static (None otherwise)."""
    t = tensor_of(e.tensor)
    shape = None if t is None else t.shape
    d = shape[e.axis] if shape is not None and 0 <= e.axis < len(shape) else None
    if not isinstance(d, (int, np.integer)) or d < 0:
        return None
    return int(d) * e.scale // e.divisor


def resolve_target(
    in_shape: list, entries: list[Entry], tensor_of: Callable[[str], gs.Tensor | None], allowzero: bool = False
) -> list | None:
    """The Reshape output shape implied by the input shape and the target entries.

    Symbolic dimensions (strings) cancel out when computing a -1 entry, so
    ``[batch, 16] -> (Dim(x, 0), -1, 1, 1)`` resolves to ``[batch, 16, 1, 1]``.
    """
    out: list = []
    infer_at = None
    for i, e in enumerate(entries):
        if isinstance(e, Quotient):
            out.append(quotient_value(e, tensor_of))
        elif isinstance(e, Computed):
            out.append(None)
        elif isinstance(e, Dim):
            t = tensor_of(e.tensor)
            if t is None or t.shape is None or e.axis >= len(t.shape):
                return None
            d = t.shape[e.axis]
            out.append(d * e.scale if isinstance(d, (int, np.integer)) else d if e.scale == 1 else None)
        elif e.value == -1:
            if infer_at is not None:
                return None
            infer_at = i
            out.append(None)
        elif e.value == 0 and not allowzero:
            if i >= len(in_shape):
                return None
            out.append(in_shape[i])
        else:
            out.append(e.value)
    if infer_at is not None:
        num_int, num_sym = _split(in_shape)
        den_int, den_sym = _split([d for j, d in enumerate(out) if j != infer_at])
        for s in den_sym:
            if s not in num_sym:
                return None
            num_sym.remove(s)
        if num_sym or den_int == 0 or num_int % den_int:
            return None
        out[infer_at] = num_int // den_int
    return out


def _split(dims) -> tuple[int, list]:
    """Product of the integer dims, and the list of symbolic ones."""
    prod, syms = 1, []
    for d in dims:
        if isinstance(d, (int, np.integer)) and d >= 0:
            prod *= int(d)
        elif d is None:
            syms.append(object())  # unknown: never cancels
        else:
            syms.append(d)
    return prod, syms


# -- static values of small integer tensors ---------------------------------------------------------

_MAX_ELEMENTS = 64  # shape values are short; anything longer is data, not evaluated

# A partly known value: its elements, and which of them are known (``Shape(x)`` of a tensor with a symbolic
# batch axis is known but for that entry, so ``Shape(x)[-1]`` is known).
Partial = tuple[np.ndarray, np.ndarray]


def static_ints(t: gs.Tensor | None) -> np.ndarray | None:
    """The value (int64) of a small integer tensor that only depends on constants and static sizes, computed
    here as ONNX Runtime computes it; None where an element varies or an op on the way is not covered."""
    found = _partial(t, 0)
    return None if found is None or not found[1].all() else found[0]


def _partial(t: gs.Tensor | None, depth: int) -> Partial | None:
    """``t``'s value as far as it is known (None: not followed)."""
    if t is None or depth > 24:
        return None
    v = constant_value(t)
    if v is not None:
        v = np.asarray(v)
        if v.size > _MAX_ELEMENTS or not (np.issubdtype(v.dtype, np.integer) or v.dtype == np.bool_):
            return None
        return v.astype(np.int64), np.ones(v.shape, dtype=bool)
    node = producer(t)
    evaluate = None if node is None or len(node.outputs) != 1 else _EVALUATE.get(node.op)
    found = None if evaluate is None else evaluate(node, depth + 1)
    return None if found is None or found[0].size > _MAX_ELEMENTS else found


def _known_ints(t: gs.Tensor | None, depth: int) -> list[int] | None:
    """``t``'s value as a flat list, if every element is known."""
    found = _partial(t, depth)
    return None if found is None or not found[1].all() else [int(x) for x in found[0].reshape(-1)]


def _eval_shape(node: gs.Node, depth: int) -> Partial | None:
    x = node.inputs[0]
    if x.shape is None:
        return None
    start, end = _shape_range(node, len(x.shape))
    dims = list(x.shape[start:end])
    known = np.asarray([isinstance(d, (int, np.integer)) and d >= 0 for d in dims], dtype=bool)
    return np.asarray([int(d) if k else 0 for d, k in zip(dims, known)], dtype=np.int64), known


def _eval_gather(node: gs.Node, depth: int) -> Partial | None:
    data, idx = _partial(node.inputs[0], depth), _partial(node.inputs[1], depth)
    if data is None or idx is None or not idx[1].all() or data[0].ndim != 1 or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    index = idx[0]
    if np.any(index >= data[0].size) or np.any(index < -data[0].size):
        return None
    return data[0][index], data[1][index]


def _eval_slice(node: gs.Node, depth: int) -> Partial | None:
    data = _partial(node.inputs[0], depth)
    axes_t = optional_input(node, 3) if "starts" not in node.attrs else None
    if data is None or data[0].ndim != 1 or (axes_t is not None and _known_ints(axes_t, depth) not in ([0], [-1])):
        return None
    bounds = _slice_bounds(node, lambda t: _known_ints(t, depth))
    if bounds is None or bounds[2] == 0:
        return None
    return data[0][slice(*bounds)], data[1][slice(*bounds)]


def _axes(node: gs.Node, depth: int) -> list[int] | None:
    """Unsqueeze's or Squeeze's axes: an attribute (older opsets) or input 1 (None: all, for Squeeze)."""
    axes = node.attrs.get("axes")
    if axes is not None:
        return [int(a) for a in axes]
    return _known_ints(node.inputs[1], depth) if optional_input(node, 1) is not None else None


def _eval_unsqueeze(node: gs.Node, depth: int) -> Partial | None:
    data, axes = _partial(node.inputs[0], depth), _axes(node, depth)
    if data is None or axes is None:
        return None
    rank = data[0].ndim + len(axes)
    shape = list(data[0].shape)
    for a in sorted(normalize_axis(a, rank) for a in axes):
        shape.insert(a, 1)
    return data[0].reshape(shape), data[1].reshape(shape)


def _eval_squeeze(node: gs.Node, depth: int) -> Partial | None:
    data, axes = _partial(node.inputs[0], depth), _axes(node, depth)
    if data is None:
        return None
    shape = data[0].shape
    axes = [a for a in range(len(shape)) if shape[a] == 1] if axes is None else [normalize_axis(a, len(shape)) for a in axes]
    if any(shape[a] != 1 for a in axes):
        return None
    kept = [d for a, d in enumerate(shape) if a not in axes]
    return data[0].reshape(kept), data[1].reshape(kept)


def _eval_cast(node: gs.Node, depth: int) -> Partial | None:
    data = _partial(node.inputs[0], depth)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0))))
    except (KeyError, TypeError, ValueError):
        return None
    if data is None or not np.issubdtype(dtype, np.integer):
        return None
    info = np.iinfo(dtype)
    return data if np.all(~data[1] | ((data[0] >= info.min) & (data[0] <= info.max))) else None


def _eval_identity(node: gs.Node, depth: int) -> Partial | None:
    return _partial(node.inputs[0], depth)


def _eval_concat(node: gs.Node, depth: int) -> Partial | None:
    parts = [_partial(t, depth) for t in node.inputs]
    if any(p is None or p[0].ndim != 1 for p in parts) or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _eval_reshape(node: gs.Node, depth: int) -> Partial | None:
    data, target = _partial(node.inputs[0], depth), _known_ints(node.inputs[1], depth)
    if data is None or target is None or 0 in target or target.count(-1) > 1:
        return None
    try:
        return data[0].reshape(target), data[1].reshape(target)
    except ValueError:
        return None


def _eval_arith(node: gs.Node, depth: int) -> Partial | None:
    a, b = (_partial(t, depth) for t in node.inputs) if len(node.inputs) == 2 else (None, None)
    if a is None or b is None:
        return None
    known = a[1] & b[1]
    x, y = np.broadcast_arrays(a[0], b[0])
    if node.op == "Div":  # integer division of non-negatives, which rounds down whatever the runtime's convention
        if np.any(known & ((x < 0) | (y <= 0))):
            return None
        return np.where(known, x // np.where(known, y, 1), 0), known
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[node.op](x, y), known


def _eval_constant_of_shape(node: gs.Node, depth: int) -> Partial | None:
    shape = _known_ints(node.inputs[0], depth)
    value = node.attrs.get("value")
    fill = np.asarray(value.values).reshape(-1) if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
    if shape is None or fill.size != 1 or any(s < 0 for s in shape) or int(np.prod(shape)) > _MAX_ELEMENTS:
        return None
    if not (np.issubdtype(fill.dtype, np.integer) or fill.dtype == np.bool_):
        return None
    return np.full(shape, int(fill[0]), dtype=np.int64), np.ones(shape, dtype=bool)


_EVALUATE: dict[str, Callable[[gs.Node, int], Partial | None]] = {
    "Shape": _eval_shape, "Gather": _eval_gather, "Slice": _eval_slice, "Unsqueeze": _eval_unsqueeze,
    "Squeeze": _eval_squeeze, "Cast": _eval_cast, "Identity": _eval_identity, "Concat": _eval_concat,
    "Reshape": _eval_reshape, "Add": _eval_arith, "Sub": _eval_arith, "Mul": _eval_arith, "Div": _eval_arith,
    "ConstantOfShape": _eval_constant_of_shape,
}



# -- sizes shape inference lost -------------------------------------------------------------------------

Size = int | str | None  # a known size, a symbol (equal wherever it appears), or unknown
TensorOf = Callable[[str], "gs.Tensor | None"]

_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Less", "Greater", "LessOrEqual",
                 "GreaterOrEqual", "Where", "Max", "Min"}
_SAME_SHAPE = {"Cast", "Identity", "Not", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Erf",
               "Softmax", "LogSoftmax", "IsNaN", "IsInf"}


def traced_dim(t: gs.Tensor, axis: int, tensor_of: TensorOf) -> Size:
    """Size of ``t``'s ``axis``, followed back through the ops that made it where shape inference left a
    symbol: TorchScript builds an attention mask with ``Range`` (whose length ONNX shape inference does not
    follow) and ``Expand`` to a computed shape, so the mask, the scores it is added to and what follows
    carry new symbols for what is the batch size. Each step is the op's shape rule (broadcast sizes are
    equal or 1), so the result holds wherever the model runs."""
    return _Tracer(tensor_of).dim(t, axis, 0)


class _Tracer:
    """One :func:`traced_dim` query: sizes found so far, and a bound on the work."""

    def __init__(self, tensor_of: TensorOf) -> None:
        self.tensor_of = tensor_of
        self.memo: dict[tuple[int, int], Size] = {}
        self.budget = 4096

    def dim(self, t: gs.Tensor, axis: int, depth: int) -> Size:
        shape = t.shape
        own = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
        if isinstance(own, (int, np.integer)) and own >= 0:
            return int(own)
        own = own if isinstance(own, str) and own else None
        key = (id(t), axis)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = own  # while it is followed (a cycle cannot occur in a DAG; this bounds the work)
        node = producer(t)
        self.budget -= 1
        if depth > 64 or self.budget < 0 or node is None or not node.outputs or node.outputs[0] is not t or shape is None:
            return own
        trace = _TRACE.get(node.op) or (_trace_same if node.op in _SAME_SHAPE else
                                        _trace_broadcast if node.op in _BROADCASTING else None)
        found = None if trace is None else trace(self, node, axis, len(shape), depth + 1)
        self.memo[key] = found if found is not None else own
        return self.memo[key]

    def entry(self, entry: Entry, depth: int) -> Size:
        """The size a shape entry names: a literal's value, or the traced size a Dim reads."""
        if isinstance(entry, Literal):
            return entry.value if entry.value >= 0 else None
        t = self.tensor_of(entry.tensor) if isinstance(entry, Dim) and entry.scale == 1 else None
        return None if t is None else self.dim(t, entry.axis, depth)


def _join(sizes: list[Size]) -> Size:
    """The broadcast of these sizes, where it is known without the runtime values."""
    if any(s is None for s in sizes):
        return None
    other = {s for s in sizes if s != 1}
    return 1 if not other else other.pop() if len(other) == 1 else None


def _trace_same(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    return tr.dim(node.inputs[0], axis, depth)


def _trace_broadcast(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    sizes: list[Size] = []
    for x in node.inputs:
        if x.shape is None:
            return None
        local = axis - rank + len(x.shape)
        sizes.append(tr.dim(x, local, depth) if local >= 0 else 1)
    return _join(sizes)


def _trace_unsqueeze(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    axes = _axes(node, 0)
    if axes is None:
        return None
    axes = sorted(normalize_axis(a, rank) for a in axes)
    return 1 if axis in axes else tr.dim(node.inputs[0], axis - sum(1 for a in axes if a < axis), depth)


def _trace_transpose(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    perm = node.attrs.get("perm")
    perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
    return tr.dim(node.inputs[0], perm[axis], depth) if len(perm) == rank else None


def _trace_expand(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    x, entries = node.inputs[0], shape_entries(node.inputs[1], None)
    if entries is None or x.shape is None or len(entries) > rank:
        return None
    local, j = axis - rank + len(x.shape), axis - rank + len(entries)
    return _join([tr.dim(x, local, depth) if local >= 0 else 1, tr.entry(entries[j], depth) if j >= 0 else 1])


def _trace_reshape(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    entries = shape_entries(node.inputs[1], None)
    if entries is None or len(entries) != rank or int(node.attrs.get("allowzero", 0)):
        return None
    entry = entries[axis]
    if isinstance(entry, Literal) and entry.value == 0:  # copies the input's size
        return tr.dim(node.inputs[0], axis, depth)
    return tr.entry(entry, depth)


def _trace_range(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    """Range(0, n, 1) has n elements."""
    start, delta = static_ints(node.inputs[0]), static_ints(node.inputs[2])
    if start is None or delta is None or start.size != 1 or delta.size != 1 or int(start.flat[0]) != 0 \
            or int(delta.flat[0]) != 1:
        return None
    entries = shape_entries(node.inputs[1], None)
    return tr.entry(entries[0], depth) if entries is not None and len(entries) == 1 else None


def _trace_matmul(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    """MatMul: the batch axes broadcast, then A's rows and B's columns."""
    a, b = node.inputs[0], node.inputs[1]
    if a.shape is None or b.shape is None or len(a.shape) < 2 or len(b.shape) < 2:
        return None
    if axis == rank - 2:
        return tr.dim(a, len(a.shape) - 2, depth)
    if axis == rank - 1:
        return tr.dim(b, len(b.shape) - 1, depth)
    return _join([tr.dim(x, axis - rank + len(x.shape), depth) if axis - rank + len(x.shape) >= 0 else 1
                  for x in (a, b)])


def _trace_gather(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    """Gather: the data's axes around the indices' shape."""
    data, idx = node.inputs[0], node.inputs[1]
    if data.shape is None or idx.shape is None:
        return None
    g = normalize_axis(int(node.attrs.get("axis", 0)), len(data.shape))
    if axis < g:
        return tr.dim(data, axis, depth)
    if axis < g + len(idx.shape):
        return tr.dim(idx, axis - g, depth)
    return tr.dim(data, axis - len(idx.shape) + 1, depth)


def _trace_slice(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    """Slice (rotary embedding's halves of the head width): an axis it does not slice keeps its size."""
    if "starts" in node.attrs:  # before opset 10
        sliced = node.attrs.get("axes", range(len(node.attrs["starts"])))
    elif optional_input(node, 3) is not None:
        sliced = _known_ints(node.inputs[3], 0)
    else:
        starts = _known_ints(node.inputs[1], 0)
        sliced = None if starts is None else range(len(starts))
    if sliced is None or axis in {normalize_axis(int(a), rank) for a in sliced}:
        return None
    return tr.dim(node.inputs[0], axis, depth)


def _trace_concat(tr: _Tracer, node: gs.Node, axis: int, rank: int, depth: int) -> Size:
    """Concat: every input has the output's size on the other axes."""
    if axis == normalize_axis(int(node.attrs.get("axis", 0)), rank):
        return None
    return _join([tr.dim(x, axis, depth) for x in node.inputs])


_TRACE: dict[str, Callable[[_Tracer, gs.Node, int, int, int], Size]] = {
    "Unsqueeze": _trace_unsqueeze, "Transpose": _trace_transpose, "Expand": _trace_expand,
    "Reshape": _trace_reshape, "Range": _trace_range, "MatMul": _trace_matmul, "Gather": _trace_gather,
    "Slice": _trace_slice, "Concat": _trace_concat,
}
