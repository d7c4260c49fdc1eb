"""Ops that act alike inside every attention head: rotary position embeddings.

Rotary embedding (Llama, GPT-NeoX, ...) rotates pairs of positions inside each head of Q and K:
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = Concat(-x[..., D/2:], x[..., :D/2])`` along the
head width D, and cos/sin tables that vary along the sequence and D but are the same for every head
(``[1, 1, S, D]`` or ``[B, 1, S, D]``). Head h's output channels come from head h's input channels only, so
the heads can be deleted through these ops; the positions inside a head cannot (the tables and the slice
bounds name them).

How the channels are followed (the layouts of :mod:`onnxprune.channels.layout`): where D is itself a channel
part of the tensor (it is after ``[B, S, H*D] -> [B, H, S, D]``), the rules track the mapping exactly, channel
(h, d) to (h, d') (a slice picks values of the part, a concat puts them at offsets), and *fix* that part: it
keeps every value, so no slice bound, split size, concat offset or table ever needs rewriting and the part
never loses a position. That is the simplest exact choice: the slot model gives a tensor one slot per channel,
so D cannot be turned into a plain size on the way, and the exact mapping costs nothing more than the
mapping Slice already used (:func:`onnxprune.channels.rules_heads.analyze_layout_slice`). Only whole heads
(the outermost part) can then go, and only because every op here acts on each head alike. Where the axis
carries no channel part, the op moves data inside each channel and every channel keeps its index.

* :func:`analyze_layout_concat`: Concat of tensors that carry heads;
* :func:`analyze_layout_split`: Split of a tensor that carries heads;
* :func:`broadcast_operand_values`: an elementwise operand that carries no channels and varies along an axis
  holding a within-head part (the cos/sin tables), broadcast over the heads.

Anything else stays a barrier, with its reason: inputs laid out differently, an input that carries no heads,
an axis that mixes a part with other data, an operand that varies along the heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.layout import Part, coordinates, dims
from onnxprune.channels.rule_base import Barrier, known_rank, normalize_axis
from onnxprune.channels.slots import TrackedAxis
from onnxprune.channels.values import combine_same


def sole_part(parts: tuple[Part, ...], axis: int) -> int | None:
    """The index of the part that fills ``axis`` alone (None when no part is on it); a :class:`Barrier` when
    the axis mixes channels with other data (several parts, or a part with a plain factor above or below)."""
    on_axis = [i for i, p in enumerate(parts) if p.axis == axis]
    if not on_axis:
        return None
    if len(on_axis) != 1 or parts[on_axis[0]].inner != 1 or parts[on_axis[0]].above != 1:
        raise Barrier("it works along an axis that mixes channels with other data")
    return on_axis[0]


def _fix_reason(node: gs.Node) -> str:
    return f"{node.op} '{node.name}' works along this within-head position (rotary embedding): it keeps every value"


def _place(parts: tuple[Part, ...], part: int, offset: int, out_parts: tuple[Part, ...]) -> np.ndarray:
    """Where each channel of a tensor laid out as ``parts`` sits in one laid out as ``out_parts`` (the same
    parts, ``part`` longer) when its values of ``part`` start at ``offset``."""
    coords = coordinates(dims(parts))
    coords[:, part] += offset
    return np.ravel_multi_index(tuple(coords.T), dims(out_parts))


def analyze_layout_concat(node: gs.Node, ctx: AnalysisContext) -> None:
    """Concat of tensors that carry heads (``rotate_half``'s ``cat(-x2, x1)``): along an axis that holds a part
    alone, each input's values of that part sit at its offset (the part is fixed); along an axis that holds
    none, every input carries the same channels."""
    y = node.outputs[0]
    inputs = list(node.inputs)
    tracked = [ctx.tracked(t) for t in inputs]
    if any(t is None or t.layout is None for t in tracked):
        raise Barrier("it concatenates tensors that carry attention heads with data that does not")
    axis = normalize_axis(int(node.attrs["axis"]), known_rank(ctx, y))
    parts = tracked[0].parts
    i = sole_part(parts, axis)
    if i is None:
        if any(t.parts != parts for t in tracked):
            raise Barrier("its inputs carry heads laid out differently")
        ctx.track_parts(y, parts, node, combine_same([ctx.value(t) for t in inputs]))
        for t in inputs:
            ctx.tie(t, y)
        return
    others = [p for j, p in enumerate(parts) if j != i]
    if any(len(t.parts) != len(parts) or [p for j, p in enumerate(t.parts) if j != i] != others
           or sole_part(t.parts, axis) != i for t in tracked):
        raise Barrier("its inputs carry heads laid out differently")
    sizes = [t.parts[i].dim for t in tracked]
    out_parts = tuple(replace(p, dim=sum(sizes)) if j == i else p for j, p in enumerate(parts))
    values = np.full(int(np.prod(dims(out_parts))), np.nan)
    placed = []
    offset = 0
    for t, tr, size in zip(inputs, tracked, sizes):
        outer = _place(tr.parts, i, offset, out_parts)
        values[outer] = ctx.value(t)
        placed.append((t, outer))
        offset += size
    ctx.track_parts(y, out_parts, node, values)
    for t, outer in placed:
        if outer.size:
            ctx.tie(t, y, np.arange(outer.size), outer)
    ctx.fix(y, i, _fix_reason(node))


def analyze_layout_split(node: gs.Node, ctx: AnalysisContext, tracked: TrackedAxis, axis: int,
                         split_sizes: Callable[[int], list[int]]) -> None:
    """Split of a tensor that carries heads (``torch.chunk`` of the head width): along an axis that holds a
    part alone, each output takes its range of that part's values (the part is fixed); along an axis that
    holds none, every output carries the input's channels. ``split_sizes(length)``: the outputs' sizes."""
    x = node.inputs[0]
    i = sole_part(tracked.parts, axis)
    if i is None:
        for out in node.outputs:
            ctx.track_parts(out, tracked.parts, node, ctx.value(x))
            ctx.tie(x, out)
        return
    offset = 0
    for out, size in zip(node.outputs, split_sizes(tracked.parts[i].dim)):
        if size <= 0:
            raise Barrier("it splits a part of the heads into an empty output")
        out_parts = tuple(replace(p, dim=size) if j == i else p for j, p in enumerate(tracked.parts))
        outer = _place(out_parts, i, offset, tracked.parts)
        ctx.track_parts(out, out_parts, node, ctx.value(x)[outer])
        ctx.tie(x, out, outer, np.arange(outer.size))
        offset += size
    ctx.fix(x, i, _fix_reason(node))


def broadcast_operand_values(node: gs.Node, ctx: AnalysisContext, t: gs.Tensor, parts: tuple[Part, ...],
                             shift: int, tracked: list[gs.Tensor]) -> np.ndarray:
    """Per-channel values of operand ``t`` of an elementwise op over heads laid out as ``parts`` (``t``'s axes
    ``shift`` fewer than the output's), which carries no channels and varies along some part: allowed where
    each such part is a within-head one (not the outermost, the heads) filling its axis, and ``t`` has its
    size there. Those parts of the ``tracked`` operands are fixed (the operand is never cut); a value is
    known where a constant ``t`` is uniform over the other axes (a cos/sin table varies along the sequence:
    unknown, but a zero channel times it stays zero)."""
    varying = [i for i, p in enumerate(parts) if p.axis - shift >= 0 and ctx.dim(t, p.axis - shift) != 1]
    if 0 in varying:
        raise Barrier("an operand varies along the heads without carrying them")
    for i in varying:
        if sole_part(parts, parts[i].axis) != i or ctx.dim(t, parts[i].axis - shift) != parts[i].dim:
            raise Barrier("an operand varies along a channel axis without matching its channels")
    for u in tracked:
        for i in varying:
            ctx.fix(u, i, _fix_reason(node))
    size = int(np.prod(dims(parts)))
    c = ctx.const(t)
    if c is None:
        return np.full(size, np.nan)
    a = np.asarray(c, dtype=np.float64).reshape((1,) * shift + tuple(np.shape(c)))
    axes = [parts[i].axis for i in varying]
    moved = np.moveaxis(a, axes, list(range(len(axes))))
    flat = moved.reshape(moved.shape[: len(axes)] + (-1,))
    first = flat[..., 0]
    per = np.where(np.all(flat == first[..., None], axis=-1), first, np.nan)
    coords = coordinates(dims(parts))
    return per[tuple(coords[:, i] for i in varying)]
