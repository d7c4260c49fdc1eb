"""Symbolic values of small shape tensors (the targets of Reshape).

Exporters often compute a Reshape target at run time, e.g. ``x.view(x.size(0), -1, 1, 1)``
becomes ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1], [1], [1])`` (TorchScript) or
``Concat(Reshape(Squeeze(Shape(x, end=1)), [-1]), [-1, 1, 1])`` (dynamo, unoptimised). Each entry of
such a tensor is either a literal (and where it is stored, so a rewrite can
change it) or "dimension j of tensor t" read at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.rule_base import normalize_axis
from onnxprune.graphutil import constant_value, opset_version, optional_input, producer


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


Entry = Literal | Dim | Computed


def _ints(t: gs.Tensor) -> list[int] | None:
    """The value of a constant integer tensor as a list (None if not constant)."""
    v = constant_value(t)
    return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]


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
    op = node.op
    if op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        out: list[Entry] = []
        for i, part in enumerate(node.inputs):
            entries = shape_entries(part, graph, depth + 1)
            if entries is None:
                length = part.shape[0] if part.shape is not None and len(part.shape) == 1 else None
                if not isinstance(length, (int, np.integer)) or length < 0:
                    return None
                entries = [Computed()] * int(length)
            if constant_value(part) is not None:
                entries = [Literal(e.value, (node, i, k)) for k, e in enumerate(entries)]
            elif len(entries) == 1 and isinstance(entries[0], Dim):
                entries = [Dim(entries[0].tensor, entries[0].axis, (node, i), entries[0].scale)]
            out += entries
        return out
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return shape_entries(node.inputs[0], graph, depth + 1)
    if op == "Mul":  # a size times a constant (TorchScript's ``num_key_value_heads * n_rep``)
        factors = [constant_value(t) for t in node.inputs]
        for k in (0, 1):
            c = factors[1 - k]
            if c is not None and np.asarray(c).size == 1:
                entries = shape_entries(node.inputs[k], graph, depth + 1)
                if entries is not None and len(entries) == 1 and isinstance(entries[0], Dim):
                    e, c = entries[0], int(np.asarray(c).reshape(-1)[0])
                    return [Dim(e.tensor, e.axis, scale=e.scale * c)]
        return None
    if op == "Where":  # TorchScript's Expand: Where(Equal(s, -1), 1, s), which is s when no entry of s is -1
        test = producer(node.inputs[0])
        entries = shape_entries(node.inputs[2], graph, depth + 1)
        if test is None or test.op != "Equal" or node.inputs[2] not in test.inputs or entries is None:
            return None
        return None if any(isinstance(e, Literal) and e.value == -1 for e in entries) else entries
    if op == "Reshape":  # to one axis: the elements in order (dynamo's ``Reshape(Squeeze(Shape(x, end=1)), [-1])``)
        target = _ints(node.inputs[1])
        return shape_entries(node.inputs[0], graph, depth + 1) if target is not None and len(target) <= 1 else None
    if op == "Shape":
        x = node.inputs[0]
        if x.shape is None:
            return None
        rank = len(x.shape)
        start = normalize_axis(int(node.attrs.get("start", 0)), rank)
        end = node.attrs.get("end")
        end = rank if end is None else min(normalize_axis(int(end), rank), rank)
        return [Dim(x.name, j) for j in range(start, end)]
    if op in ("Gather", "Slice") and not _one_axis(node.inputs[0]):
        return None  # rows of a 2-D shape value, not entries
    if op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        data, idx = shape_entries(node.inputs[0], graph, depth + 1), _ints(node.inputs[1])
        if data is None or idx is None:
            return None
        return [_strip(data[normalize_axis(i, len(data))]) for i in idx]
    if op == "Slice":
        data = shape_entries(node.inputs[0], graph, depth + 1)
        if data is None:
            return None
        if opset_version(graph) < 10:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            steps = [1]
        else:
            starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
            steps_t = optional_input(node, 4)
            steps = _ints(steps_t) if steps_t is not None else [1]
        if not starts or not ends or steps is None or len(starts) != 1:
            return None
        return [_strip(e) for e in data[slice(starts[0], ends[0], steps[0])]]
    return None


def _one_axis(t: gs.Tensor) -> bool:
    """False when ``t`` is known to have another rank than 1."""
    return t.shape is None or len(t.shape) == 1


def _strip(e: Entry) -> Entry:
    """An entry moved by Gather/Slice no longer sits where it is stored."""
    if isinstance(e, Dim):
        return Dim(e.tensor, e.axis, scale=e.scale)
    return Literal(e.value) if isinstance(e, Literal) else e


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
        if isinstance(e, Computed):
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
