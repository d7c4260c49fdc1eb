"""Rules that follow attention heads: channels spread over several axes (see :mod:`onnxprune.channels.layout`).

* Reshape that splits the channel axis into heads, merges heads with the batch or back
  into one axis (:func:`analyze_layout_reshape`, used by the Reshape rule);
* (products of two activations are in :mod:`onnxprune.channels.rules_products`: a head is one
  component, dead when its output is zero everywhere it is read, which is when its V slice is:
  ``P @ 0 = 0`` whatever Q and K are);
* Where (masking), Expand (grouped-query attention's repeated K/V heads), and Gather of
  one of Q, K, V from a packed projection.

Targets computed at run time (:mod:`onnxprune.channels.shape_values`) are followed where the rewrite can
keep them exact: a static size or ``embed_dim // num_heads`` alone in a Concat input becomes the new constant,
``batch * num_heads`` is read again times the heads kept; a channel count a target reads and does not rewrite
keeps its channels. TorchScript's attention masks (Expand behind its ``Where(Equal(s, -1), 1, s)`` guard) get
the sizes shape inference left unknown filled in, so they are shown to broadcast along the heads.

A layout tensor can only lose a product of values per part (whole heads): the planner
keeps back whatever else (:meth:`onnxprune.channels.plan._PlanDraft.keep_products`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.layout import (
    Chan,
    Factor,
    Part,
    Size,
    axis_factors,
    coordinates,
    dims,
    kept_per_part,
    match_reshape,
    move_axes,
    normalize,
    parts_from_factors,
    plain_size,
    tensor_factors,
)
from onnxprune.channels.rule_base import Barrier, ChannelRule, RewriteContext
from onnxprune.channels.shape_values import (
    Computed,
    Dim,
    Literal,
    Quotient,
    quotient_value,
    shape_entries,
    traced_dim,
)
from onnxprune.channels.slots import TrackedAxis
from onnxprune.channels.values import channel_constant, combine_same
from onnxprune.channels.within_head import broadcast_operand_values
from onnxprune.graphutil import constant_value, producer


def _axis_size(ctx: AnalysisContext, t: gs.Tensor, axis: int) -> Size:
    """Size of ``t``'s axis: from its channel parts where it carries some, else its shape."""
    tracked = ctx.tracked(t)
    shape = ctx.shape(t)
    if shape is None or not 0 <= axis < len(shape):
        return None
    if tracked is not None and any(p.axis == axis for p in tracked.parts):
        total = 1
        for f in axis_factors(tracked.parts, shape, axis):
            s = f.dim if isinstance(f, Chan) else f.size
            if not isinstance(s, int):
                return None
            total *= s
        return total
    return plain_size(shape[axis])


def _dim_size(ctx: AnalysisContext, entry: Dim) -> Size:
    """The size a target's Dim entry reads (its tensor's axis, times the entry's scale)."""
    t = ctx.tensor(entry.tensor)
    size = None if t is None else _axis_size(ctx, t, entry.axis)
    return size * entry.scale if isinstance(size, int) else size if entry.scale == 1 else None


# -- Reshape ---------------------------------------------------------------------------------------


def analyze_layout_reshape(node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis, entries: list,
                           allowzero: bool) -> None:
    """A Reshape that splits channels into heads, merges heads with another axis, or merges them back."""
    x, y = node.inputs[0], node.outputs[0]
    parts = tracked_input.parts
    fix_quotient_reads(node, ctx, entries)
    matched = _match_target(node, ctx, tracked_input, entries, allowzero, traced=False)
    if matched is None:  # shape inference may have lost a size on the way (a TorchScript attention mask)
        matched = _match_target(node, ctx, tracked_input, entries, allowzero, traced=True)
    out_parts = None if matched is None else parts_from_factors(matched, len(parts))
    if out_parts is None:
        raise Barrier("it splits or merges the channel axis in a way onnxprune does not follow")
    on_channel_axes = {p.axis for p in out_parts}
    if tracked_input.layout is None and any(isinstance(entries[p], Computed) and not _known_quotient(ctx, entries[p])
                                            for p in on_channel_axes):
        raise Barrier("its target shape is computed in a way onnxprune does not follow")
    if len(out_parts) == 1 and out_parts[0].above == 1 and out_parts[0].inner > 1:  # channel blocks (a flatten)
        part = out_parts[0]
        ctx.track(y, part.axis, part.dim * part.inner, node, np.repeat(ctx.value(x), part.inner))
        ctx.tie(x, y, np.repeat(np.arange(part.dim), part.inner), np.arange(part.dim * part.inner))
        return
    order = _memory_order(out_parts, matched)
    if order is not None:  # all channels back on one axis, in another order (a channel shuffle)
        values = np.empty(order.size)
        values[order] = ctx.value(x)
        ctx.track(y, out_parts[0].axis, order.size, node, values)
        ctx.tie(x, y, np.arange(order.size), order)
        return
    repeat = _head_repeat(node, ctx, tracked_input, out_parts)
    if repeat is not None:  # grouped-query attention: each query head's copy of its K/V head is derived from it
        out_parts, source = repeat
        ctx.track_parts(y, out_parts, node, ctx.value(x)[source])
        ctx.derive(x, y, source, np.arange(source.size))
        ctx.repeats[node.name] = source
    else:
        ctx.track_parts(y, out_parts, node, ctx.value(x))
        ctx.tie(x, y)
    tracked_output = ctx.tracked(y)
    for position, entry in enumerate(entries):
        _check_layout_entry(node, ctx, tracked_output, position, entry, allowzero)


def _alone(parts: tuple[Part, ...], i: int) -> bool:
    """True if part ``i`` fills its axis alone (nothing above or inside it there)."""
    p = parts[i]
    return p.inner == 1 and p.above == 1 and sum(q.axis == p.axis for q in parts) == 1


def _head_repeat(node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis,
                 out_parts: tuple[Part, ...]) -> tuple[tuple[Part, ...], np.ndarray] | None:
    """Grouped-query attention's repeat of K/V heads (Hugging Face's ``repeat_kv``: Unsqueeze, Expand, Reshape):
    the Reshape merges a part of heads alone on its axis with the axis right inside it, which the Expand before
    it broadcast from size 1 to ``R``. Then query head ``kv * R + r`` holds a copy of K/V head ``kv``: returns the
    output's layout with that part of ``KV * R`` values, and the input channel each output channel copies. None for
    any other Reshape, or where an output part shares its axis (the rewrite selects kept heads with a Gather)."""
    x = node.inputs[0]
    expand = producer(x)
    if expand is None or expand.op != "Expand" or ctx.tracked_by.get(x.name) != expand.name:
        return None
    parts, in_shape, src_shape = tracked_input.parts, ctx.shape(x), ctx.shape(expand.inputs[0])
    if in_shape is None or src_shape is None or dims(out_parts) != dims(parts):
        return None
    shift = len(in_shape) - len(src_shape)
    for i, part in enumerate(parts):
        axis = part.axis + 1
        if not _alone(parts, i) or axis >= len(in_shape) or any(p.axis == axis for p in parts) or axis - shift < 0:
            continue
        times = in_shape[axis]
        if not isinstance(times, (int, np.integer)) or times < 2 or src_shape[axis - shift] != 1:
            continue
        if out_parts[i].inner != times or out_parts[i].above != 1:
            continue
        new = tuple(Part(p.axis, p.dim * int(times)) if j == i else p for j, p in enumerate(out_parts))
        if normalize(new) != new or not all(_alone(new, j) for j in range(len(new))):
            return None
        coords = coordinates(dims(new))
        coords[:, i] //= int(times)
        return new, np.ravel_multi_index(tuple(coords.T), dims(parts))
    return None


def rewrite_repeat(node: gs.Node, rw: RewriteContext) -> bool:
    """A head repeat (:func:`_head_repeat`) that keeps query heads of some K/V heads but not all of them: the
    Reshape repeats every kept K/V head as before (its target rewritten for that), and a Gather per axis picks the
    kept query heads (and channels) out of it. False where the plain target rewrite is exact (every K/V head
    keeps all its query heads or none)."""
    source = rw.repeat_source(node)
    y = node.outputs[0]
    if source is None or not rw.changed(y):
        return False
    keep, full = rw.keep(y), rw.keep(node.inputs[0])[source]  # what the repeat of the kept K/V heads holds
    if np.array_equal(keep, full):
        return False
    parts = rw.parts(y)
    per_part, full_per_part = kept_per_part(keep, dims(parts)), kept_per_part(full, dims(parts))
    rewrite_target(node, rw, per_axis={p.axis: (p.dim, int(m.sum())) for p, m in zip(parts, full_per_part)})
    for part, kept, held in zip(parts, per_part, full_per_part):
        if not np.array_equal(kept, held):
            rw.insert_after(node, "Gather", [np.flatnonzero(kept[held]).astype(np.int64)], {"axis": part.axis})
    return True


def _match_target(node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis, entries: list, allowzero: bool,
                  traced: bool) -> list[list[Factor]] | None:
    """The input's factors matched to the target's entries (see :func:`match_reshape`); ``traced``: sizes that
    are symbols followed back through the ops that made them (:func:`traced_dim`)."""
    x, y = node.inputs[0], node.outputs[0]
    in_shape = ctx.shape(x)
    if in_shape is None:
        raise Barrier("input shape unknown")
    if traced:
        in_shape = [d if plain_size(d) is None or isinstance(d, int) else traced_dim(x, a, ctx.tensor)
                    for a, d in enumerate(in_shape)]
    out_sizes: list = []
    out_shape = ctx.shape(y) or [None] * len(entries)
    for position, entry in enumerate(entries):
        if _known_quotient(ctx, entry):
            out_sizes.append(quotient_value(entry, ctx.tensor))
        elif isinstance(entry, Computed):
            out_sizes.append(plain_size(out_shape[position]) if position < len(out_shape) else None)
        elif isinstance(entry, Dim):
            size = _dim_size(ctx, entry)
            out_sizes.append(_traced_entry(ctx, entry) if traced and isinstance(size, str) else size)
        elif entry.value == -1:
            out_sizes.append("-1")
        elif entry.value == 0 and not allowzero:
            size = _axis_size(ctx, x, position)
            out_sizes.append(in_shape[position] if traced and isinstance(size, str) else size)
        else:
            out_sizes.append(entry.value)
    return match_reshape(tensor_factors(tracked_input.parts, in_shape, len(in_shape)), out_sizes)


def _traced_entry(ctx: AnalysisContext, entry: Dim) -> Size:
    """The size a Dim entry reads, followed back (:func:`traced_dim`) where it is a symbol."""
    t = ctx.tensor(entry.tensor)
    size = None if t is None else traced_dim(t, entry.axis, ctx.tensor)
    return size * entry.scale if isinstance(size, int) else size if entry.scale == 1 else None


def _known_quotient(ctx: AnalysisContext, entry) -> bool:
    """True for a :class:`Quotient` whose value is known (its dimension is static)."""
    return isinstance(entry, Quotient) and quotient_value(entry, ctx.tensor) is not None


def _memory_order(parts: tuple[Part, ...], matched: list[list[Factor]]) -> np.ndarray | None:
    """Where each channel lands when several parts fill one axis alone in another order (None otherwise)."""
    axis = parts[0].axis
    if len(parts) < 2 or any(p.axis != axis or p.above != 1 for p in parts):
        return None
    if not all(isinstance(f, Chan) for f in matched[axis]):
        return None
    coords = coordinates(dims(parts))
    return coords @ np.asarray([p.inner for p in parts], dtype=np.int64)


def _check_layout_entry(node: gs.Node, ctx: AnalysisContext, out: TrackedAxis, position: int, entry,
                        allowzero: bool) -> None:
    """Target entry ``position`` must follow the pruning of the channel parts on that axis, or they stay whole."""
    on_axis = [i for i, p in enumerate(out.parts) if p.axis == position]
    if not on_axis:
        if isinstance(entry, Dim):  # a size it does not rewrite: a channel count there must not change
            fix_channel_count_read(node, ctx, entry)
        return
    if isinstance(entry, Quotient) and _rewritable_quotient(node, ctx, out, on_axis, entry):
        return
    if isinstance(entry, Computed):
        for i in on_axis:
            ctx.fix(out.tensor, i, f"the target shape of Reshape '{node.name}' computes this size in a way onnxprune "
                                   "does not follow")
        return
    if isinstance(entry, Literal):
        if entry.value == -1:
            return
        if entry.value == 0 and not allowzero:
            entry = Dim(node.inputs[0].name, position)
        elif entry.value > 0 and (constant_value(node.inputs[1]) is not None or entry.source is not None):
            return
        else:
            for i in on_axis:
                ctx.fix(out.tensor, i, f"the target shape of Reshape '{node.name}' names the head count where "
                                       "onnxprune cannot change it")
            return
    _follow_dim(node, ctx, out, on_axis, entry)


def _channel_values(out: TrackedAxis, on_axis: list[int]) -> int:
    """How many channel values the parts ``on_axis`` of ``out`` hold together (their share of the axis)."""
    return int(np.prod([out.parts[i].dim for i in on_axis]))


def sole_reader(holder: gs.Node, node: gs.Node, index: int = 1) -> bool:
    """True if ``holder`` (a Concat of int64 shape entries) reaches only input ``index`` of ``node`` (through
    one-reader tensors): a rewrite of its inputs changes nothing else."""
    t = holder.outputs[0]
    if t.dtype is not None and np.dtype(t.dtype) != np.int64:
        return False
    for _ in range(8):
        if t is node.inputs[index]:
            return len(t.outputs) == sum(1 for i in node.inputs if i is t)
        if len(t.outputs) != 1 or len(t.outputs[0].outputs) != 1:
            return False
        t = t.outputs[0].outputs[0]
    return False


def _rewritable_quotient(node: gs.Node, ctx: AnalysisContext, out: TrackedAxis, on_axis: list[int],
                         entry: Quotient) -> bool:
    """A Quotient (``embed_dim // num_heads``) on an axis that carries channels: its value is known and sits
    alone in a Concat input only this target reads, so a rewrite writes the new size there as a constant."""
    value = quotient_value(entry, ctx.tensor)
    return (value is not None and entry.source is not None and value % _channel_values(out, on_axis) == 0
            and sole_reader(entry.source[0], node))


# Ops whose rules tie every input channel to the output's (a channel deleted in the input is deleted there too).
_MOVES = ("Unsqueeze", "Squeeze", "Transpose", "Identity", "Cast", "Expand", "Reshape", "Flatten")


def carries_same_channels(ctx: AnalysisContext, x: gs.Tensor, name: str) -> bool:
    """True if ``x`` is tensor ``name``, or made from it by ops that keep every channel (each declared by that
    op's rule, which ties every input channel to the output): ``x`` loses channels whenever ``name`` does."""
    t = x
    for _ in range(8):
        if t.name == name:
            return True
        node = producer(t)
        if node is None or node.op not in _MOVES or ctx.tracked_by.get(t.name) != node.name:
            return False
        t = node.inputs[0]
    return False


def fix_channel_count_read(node: gs.Node, ctx: AnalysisContext, entry: Dim) -> None:
    """A target entry reads a size that carries channels, and the rewrite does not follow it there (it
    rewrites an entry only where this node's own channels change): those channels keep every value."""
    source = ctx.tracked(entry.tensor)
    for i, part in enumerate(source.parts if source is not None else ()):
        if part.axis == entry.axis:
            ctx.fix(source.tensor, i, f"{node.op} '{node.name}' reads this channel count into its target shape")


def fix_quotient_reads(node: gs.Node, ctx: AnalysisContext, entries: list) -> None:
    """A Quotient reads a size it divides: channels on that axis keep every value (the quotient is
    rewritten only with the target's own channels, so it must not change on its own)."""
    for entry in entries:
        source = ctx.tracked(entry.tensor) if isinstance(entry, Quotient) else None
        for i, part in enumerate(source.parts if source is not None else ()):
            if part.axis == entry.axis:
                ctx.fix(source.tensor, i, f"{node.op} '{node.name}' divides this channel count in its target shape")


def _rescalable(node: gs.Node, ctx: AnalysisContext, out: TrackedAxis, on_axis: list[int], entry: Dim) -> bool:
    """A size read at run time times a literal that names the head count (TorchScript's ``batch * num_heads``):
    the read axis carries no channels and the literal is a multiple of the channels on this axis, so a rewrite
    can read the same size times the new count (:func:`_rescale_entry`), into a Concat input only this reads."""
    source = ctx.tracked(entry.tensor)
    reads_channels = source is not None and any(p.axis == entry.axis for p in source.parts)
    return (entry.scale != 1 and entry.source is not None and not reads_channels
            and entry.scale % _channel_values(out, on_axis) == 0 and sole_reader(entry.source[0], node))


def _follow_dim(node: gs.Node, ctx: AnalysisContext, out: TrackedAxis, on_axis: list[int], entry: Dim) -> None:
    """A target entry read at run time from ``entry.tensor``. Where that size is static and the entry has
    a place of its own, the rewrite writes the new size there; otherwise the source tensor must lose the
    same heads: the outermost part (the heads) is tied value by value to the source's, inner parts stay whole."""
    tensor = ctx.tensor(entry.tensor)
    size = None if tensor is None else _axis_size(ctx, tensor, entry.axis)
    if entry.source is not None and isinstance(size, int):
        if ctx.dim(tensor, entry.axis) is None:  # known from its channel parts: recorded for the rewrite
            shape = list(tensor.shape)
            shape[entry.axis] = size
            tensor.shape = shape
        if not carries_same_channels(ctx, node.inputs[0], entry.tensor):  # rewritten only with this node's
            fix_channel_count_read(node, ctx, entry)
        return
    if not isinstance(size, int) and _rescalable(node, ctx, out, on_axis, entry):
        return
    source = ctx.tracked(entry.tensor) if entry.scale == 1 else None
    reason = f"the target shape of Reshape '{node.name}' reads a channel count at run time"
    src_parts = [] if source is None else [i for i, p in enumerate(source.parts) if p.axis == entry.axis]
    if source is None or [source.parts[i].dim for i in src_parts] != [out.parts[i].dim for i in on_axis]:
        for i in on_axis:
            ctx.fix(out.tensor, i, reason)
        return
    for k, (i_src, i_out) in enumerate(zip(src_parts, on_axis)):
        if k == 0 and i_src == 0 and i_out == 0:
            _tie_by_coordinate(ctx, source, 0, out, 0)
        else:
            ctx.fix(source.tensor, i_src, reason)
            ctx.fix(out.tensor, i_out, reason)


def _tie_by_coordinate(ctx: AnalysisContext, a: TrackedAxis, part_a: int, b: TrackedAxis, part_b: int) -> None:
    """Tie every channel of ``a`` and ``b`` that has the same value on the given parts (the same head)."""
    ca, cb = coordinates(dims(a.parts))[:, part_a], coordinates(dims(b.parts))[:, part_b]
    first_b = np.full(b.parts[part_b].dim, -1)
    for slot, c in enumerate(cb):
        if first_b[c] < 0:
            first_b[c] = slot
    ctx.tie(a.tensor, b.tensor, np.arange(ca.size), first_b[ca])
    ctx.tie(b.tensor, b.tensor, np.arange(cb.size), first_b[cb])


def rewrite_target(node: gs.Node, rw: RewriteContext, index: int = 1,
                   per_axis: dict[int, tuple[int, int]] | None = None) -> None:
    """Scale every literal of a shape input (Reshape's or Expand's) on an axis whose channels change (``per_axis``:
    the output's channel values before and kept per axis, by default what the plan keeps of it)."""
    y = node.outputs[0]
    if not rw.changed(y):
        return
    per_axis = rw.kept_per_axis(y) if per_axis is None else per_axis
    target = rw.const(node.inputs[index])
    if target is not None:
        target = np.asarray(target).reshape(-1).copy()
        for axis, (before, kept) in per_axis.items():
            if target[axis] > 0 and target[axis] % before == 0:
                target[axis] = target[axis] // before * kept
        rw.set_const(node, index, target)
        return
    entries = shape_entries(node.inputs[index], rw.graph)
    for axis, (before, kept) in per_axis.items():
        entry = entries[axis]
        if isinstance(entry, Literal) and entry.value > 0 and entry.value % before == 0 and entry.source is not None:
            holder, slot, position = entry.source
            part = np.asarray(rw.const(holder.inputs[slot])).copy()
            part.reshape(-1)[position] = entry.value // before * kept
            rw.set_const(holder, slot, part)
        elif isinstance(entry, Dim) and entry.source is not None:
            tensor = rw.graph.tensors()[entry.tensor]
            size = tensor.shape[entry.axis] if tensor.shape is not None else None
            size = size * entry.scale if isinstance(size, (int, np.integer)) else None
            if size is not None and size % before == 0:
                holder, slot = entry.source
                rw.set_const(holder, slot, np.asarray([size // before * kept], dtype=np.int64))
            elif size is None and entry.scale % before == 0 and kept != before:
                _rescale_entry(rw, tensor, entry, entry.scale // before * kept)
        elif isinstance(entry, Quotient) and entry.source is not None and kept != before:
            value = quotient_value(entry, rw.graph.tensors().get)
            if value is not None and value % before == 0:
                holder, slot = entry.source
                rw.set_const(holder, slot, np.asarray([value // before * kept], dtype=np.int64))


def _rescale_entry(rw: RewriteContext, tensor: gs.Tensor, entry: Dim, scale: int) -> None:
    """Replace the Concat input holding ``entry`` by ``Shape(tensor)[axis] * scale``, computed by new nodes
    (the old ones may feed other targets)."""
    holder, slot = entry.source
    base = f"{holder.name}_input{slot}"
    rank = [len(tensor.shape)] if tensor.shape is not None else None
    shape = gs.Variable(rw.names.fresh(f"{base}_shape"), dtype=np.int64, shape=rank)
    size = gs.Variable(rw.names.fresh(f"{base}_size"), dtype=np.int64, shape=[1])
    scaled = gs.Variable(rw.names.fresh(f"{base}_scaled"), dtype=np.int64, shape=[1])
    index = gs.Constant(rw.names.fresh(f"{base}_axis"), np.asarray([entry.axis], dtype=np.int64))
    factor = gs.Constant(rw.names.fresh(f"{base}_factor"), np.asarray([scale], dtype=np.int64))
    rw.graph.nodes += [
        gs.Node("Shape", name=rw.names.fresh(f"{base}_Shape"), inputs=[tensor], outputs=[shape]),
        gs.Node("Gather", name=rw.names.fresh(f"{base}_Gather"), attrs={"axis": 0}, inputs=[shape, index], outputs=[size]),
        gs.Node("Mul", name=rw.names.fresh(f"{base}_Mul"), inputs=[size, factor], outputs=[scaled]),
    ]
    holder.inputs[slot] = scaled


# -- MatMul of two activations -----------------------------------------------------------------------


# -- elementwise ops, Where, Expand, Gather and Shape on heads -----------------------------------------


def layout_operands(node: gs.Node, ctx: AnalysisContext, inputs: list[gs.Tensor]) -> tuple[tuple[Part, ...], list, list]:
    """The common layout of ``inputs`` (aligned to the output's rank), each one's values, and those to tie.

    Operands that carry channels must share the layout; the others must not vary along any axis
    that carries channels (they broadcast there)."""
    out_rank = ctx.rank(node.outputs[0])
    if out_rank is None or any(ctx.rank(t) is None for t in inputs):
        raise Barrier("operand ranks are unknown")
    layouts = {
        move_axes(ctx.tracked(t).parts, lambda axis, t=t: axis + out_rank - ctx.rank(t))
        for t in inputs if ctx.tracked(t) is not None
    }
    if len(layouts) != 1:
        raise Barrier("operands carry heads laid out differently")
    parts = layouts.pop()
    size = int(np.prod(dims(parts)))
    values, ties = [], []
    for t in inputs:
        if ctx.tracked(t) is not None:
            values.append(ctx.value(t))
            ties.append(t)
            continue
        shift = out_rank - ctx.rank(t)
        if any(p.axis - shift >= 0 and ctx.dim(t, p.axis - shift) != 1 for p in parts):  # rotary's cos/sin
            values.append(broadcast_operand_values(node, ctx, t, parts, shift, [u for u in inputs if ctx.tracked(u) is not None]))
            continue
        c = ctx.const(t)
        values.append(channel_constant(c, None, size) if c is not None else np.full(size, np.nan))
    return parts, values, ties


def declare_elementwise(node: gs.Node, ctx: AnalysisContext, inputs: list[gs.Tensor], combine) -> None:
    """An elementwise op over heads: the output has the operands' layout, values from ``combine``."""
    parts, values, ties = layout_operands(node, ctx, inputs)
    with np.errstate(all="ignore"):
        out = combine(values)
    out = np.where(np.isfinite(out), out, np.nan)
    ctx.track_parts(node.outputs[0], parts, node, out)
    for t in ties:
        ctx.tie(t, node.outputs[0])


class WhereRule(ChannelRule):
    """Where(condition, x, y) (attention masks): operands that carry channels are tied to the output, the
    others broadcast along them; a channel is known where x and y agree."""

    ops = ("Where",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if not any(ctx.tracked(t) is not None for t in node.inputs):
            refine_broadcast_shape(node, ctx)  # an attention mask: show it broadcasts along the heads
            return
        parts, values, ties = layout_operands(node, ctx, list(node.inputs))
        with np.errstate(all="ignore"):
            out = combine_same(values[1:])
        ctx.track_parts(node.outputs[0], parts, node, np.where(np.isfinite(out), out, np.nan))
        for t in ties:
            ctx.tie(t, node.outputs[0])


class ExpandRule(ChannelRule):
    """Expand of axes that carry no channels (grouped-query attention repeats each K/V head for its queries)."""

    ops = ("Expand",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tracked = ctx.tracked(x)
        if tracked is None:
            if ctx.tracked(node.inputs[1]) is not None:
                raise Barrier("its shape comes from channel data")
            fix_heads_read_by_untracked(node, ctx)
            _refine_untracked_expand(node, ctx)
            return
        entries = shape_entries(node.inputs[1], ctx.graph)
        rank = ctx.rank(x)
        if entries is None or rank is None or len(entries) < rank:
            raise Barrier("its target shape is computed in a way onnxprune does not follow")
        shift = len(entries) - rank
        fix_quotient_reads(node, ctx, entries)
        _refine_expand_shape(ctx, node, entries, shift)
        parts = move_axes(tracked.parts, lambda axis: axis + shift)
        ctx.track_parts(y, parts, node, ctx.value(x))
        ctx.tie(x, y)
        out = ctx.tracked(y)
        for position, entry in enumerate(entries):
            if not (isinstance(entry, Literal) and entry.value in (0, 1)):
                _check_layout_entry(node, ctx, out, position, entry, allowzero=True)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        rewrite_target(node, rw)


def _refine_expand_shape(ctx: AnalysisContext, node: gs.Node, entries: list, shift: int) -> None:
    """Fill in the output sizes shape inference left unknown where the target's entries give them."""
    x, y = node.inputs[0], node.outputs[0]
    known = list(ctx.shape(y) or [None] * len(entries))
    if len(known) != len(entries):
        return
    for axis, entry in enumerate(entries):
        if isinstance(known[axis], (int, np.integer)) or isinstance(entry, Computed):
            continue
        size = _dim_size(ctx, entry) if isinstance(entry, Dim) else entry.value
        if size == 1 and axis - shift >= 0:
            size = _axis_size(ctx, x, axis - shift)
        if size is not None and size != -1:
            known[axis] = size
    y.shape = known


def _static_dim(d) -> int | None:
    """A shape entry as a known size (None for a symbol or unknown)."""
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def _broadcast(sizes: list[int | None]) -> int | None:
    """The size numpy-style broadcasting gives an axis of operands of these sizes (None: not known, or an error)."""
    if any(s is None for s in sizes):
        return None
    big = {s for s in sizes if s != 1}
    return 1 if not big else big.pop() if len(big) == 1 else None


def refine_broadcast_shape(node: gs.Node, ctx: AnalysisContext) -> None:
    """Fill in output sizes of a broadcasting op that shape inference left unknown, where every operand's
    size on that axis is known (an attention mask is then shown to have one row for every head)."""
    y = node.outputs[0]
    ranks = [ctx.rank(t) for t in node.inputs]
    out = ctx.shape(y)
    if out is None or any(r is None for r in ranks):
        return
    known = list(out)
    for axis in range(len(out)):
        if _static_dim(out[axis]) is None:
            sizes = [_static_dim(ctx.shape(t)[axis - len(out) + r]) if axis - len(out) + r >= 0 else 1
                     for t, r in zip(node.inputs, ranks)]
            size = _broadcast(sizes)
            known[axis] = out[axis] if size is None else size
    if known != out:
        y.shape = known


def _refine_untracked_expand(node: gs.Node, ctx: AnalysisContext) -> None:
    """Expand of data that carries no channels (an attention mask): fill in the output sizes shape inference
    left unknown where the input's size and the target's entry give them."""
    x, y = node.inputs[0], node.outputs[0]
    entries, in_shape, out = shape_entries(node.inputs[1], ctx.graph), ctx.shape(x), ctx.shape(y)
    if entries is None or in_shape is None or out is None or len(out) != max(len(entries), len(in_shape)):
        return
    known = list(out)
    for axis in range(len(out)):
        j, k = axis - len(out) + len(entries), axis - len(out) + len(in_shape)
        target = entries[j].value if j >= 0 and isinstance(entries[j], Literal) and entries[j].value >= 1 else None
        target = 1 if j < 0 else target
        size = _broadcast([target, _static_dim(in_shape[k]) if k >= 0 else 1])
        if _static_dim(out[axis]) is None and size is not None:
            known[axis] = size
    if known != out:
        y.shape = known


def analyze_select(node: gs.Node, ctx: AnalysisContext, tracked: TrackedAxis, axis: int) -> None:
    """Gather of one index on an axis holding a whole part (Q, K or V out of a packed projection)."""
    index = ctx.const(node.inputs[1])
    on_axis = [i for i, p in enumerate(tracked.parts) if p.axis == axis]
    if index is None or np.asarray(index).ndim != 0 or len(on_axis) != 1 or len(tracked.parts) < 2:
        raise Barrier("it gathers along the channel axis")
    i = on_axis[0]
    part = tracked.parts[i]
    if part.inner != 1 or part.above != 1:
        raise Barrier("it gathers along an axis that mixes channels with other data")
    chosen = int(index) % part.dim
    rest = tuple(replace(p, axis=p.axis - (p.axis > axis)) for j, p in enumerate(tracked.parts) if j != i)
    picked = np.flatnonzero(coordinates(dims(tracked.parts))[:, i] == chosen)
    ctx.fix(tracked.tensor, i, f"Gather '{node.name}' picks a fixed position along the channel parts")
    ctx.track_parts(node.outputs[0], rest, node, ctx.value(node.inputs[0])[picked])
    ctx.tie(node.inputs[0], node.outputs[0], picked, np.arange(picked.size))


def axes_read_for_computation(ctx: AnalysisContext, t: gs.Tensor, positions: list[int], depth: int = 0,
                              source: gs.Tensor | None = None, computed: bool = False) -> set[int]:
    """Axes (``positions`` holds the axis each entry of shape value ``t`` reports, -1 for others) whose
    size feeds something other than the target of a Reshape or Expand (whose rules check what they
    read), following ops that only move shape entries: Slice, Gather, Concat, Unsqueeze, Squeeze, Cast.

    A size may also go through integer arithmetic (``computed``; TorchScript's ``torch.chunk`` computes its
    Slice bounds from the channel count) into the starts or ends of a Slice of ``source`` (the tensor whose
    shape ``t`` is): the Slice rule evaluates them and its rewrite writes them as constants."""
    every = {p for p in positions if p >= 0}
    if source is None and depth == 0:
        shape = producer(t)
        source = shape.inputs[0] if shape is not None and shape.op == "Shape" else None
    if depth > 12 or t.name in ctx.graph_outputs:
        return every
    read: set[int] = set()
    for user in t.outputs:
        if _bound_of_slice(user, t, source) or user.op == "Shape":
            continue
        if not computed and user.op in ("Reshape", "Expand") and len(user.inputs) > 1 and user.inputs[1] is t \
                and user.inputs[0] is not t:
            continue
        if not computed and user.op == "Equal" and _only_guards_where(user, t):
            continue  # TorchScript's Where(Equal(s, -1), 1, s) guard
        moved = _moved_positions(ctx, user, t, positions)
        now_computed = computed
        if moved is None and _integer_arithmetic(ctx, user, t):
            moved, now_computed = positions, True
        if moved is None:
            read |= every
            continue
        for out in user.outputs:
            read |= axes_read_for_computation(ctx, out, moved, depth + 1, source, now_computed)
    return read


def _bound_of_slice(user: gs.Node, t: gs.Tensor, source: gs.Tensor | None) -> bool:
    """True if ``t`` is only the starts or ends of ``user``, a Slice of ``source``."""
    if source is None or user.op != "Slice" or not user.inputs or user.inputs[0] is not source:
        return False
    return any(i is t for i in user.inputs[1:3]) and all(i is not t for j, i in enumerate(user.inputs) if j not in (1, 2))


def _integer_arithmetic(ctx: AnalysisContext, user: gs.Node, t: gs.Tensor) -> bool:
    """Add, Sub, Mul or Div of ``t`` and an integer constant (a size computed from a size)."""
    if user.op not in ("Add", "Sub", "Mul", "Div") or len(user.inputs) != 2:
        return False
    other = user.inputs[1] if user.inputs[0] is t else user.inputs[0]
    value = ctx.const(other)
    return other is not t and value is not None and np.issubdtype(np.asarray(value).dtype, np.integer)


def _only_guards_where(equal: gs.Node, t: gs.Tensor) -> bool:
    """True if ``equal``'s result only chooses, in Where nodes, between ``t`` and something else."""
    users = equal.outputs[0].outputs
    return bool(users) and all(u.op == "Where" and u.inputs[0] is equal.outputs[0] and u.inputs[2] is t for u in users)


def _moved_positions(ctx: AnalysisContext, user: gs.Node, t: gs.Tensor, positions: list[int]) -> list[int] | None:
    """Where the entries of ``t`` land in ``user``'s output (None: the op computes with them)."""
    if user.op in ("Unsqueeze", "Squeeze", "Cast", "Identity") and user.inputs[0] is t:
        return positions
    if user.op == "Reshape" and user.inputs[0] is t and ctx.const(user.inputs[1]) is not None \
            and np.asarray(ctx.const(user.inputs[1])).size <= 1:  # the shape value kept as one axis
        return positions
    if user.op == "Where" and user.inputs[2] is t and user.inputs[0] is not t and user.inputs[1] is not t:
        return positions
    if user.op == "Mul" and len(positions) == 1 and any(  # a size times a constant, followed as a scaled Dim
            other is not t and ctx.const(other) is not None and np.asarray(ctx.const(other)).size == 1 for other in user.inputs):
        return positions
    if user.op == "Gather" and user.inputs[0] is t and int(user.attrs.get("axis", 0)) == 0:
        idx = ctx.const(user.inputs[1])
        return None if idx is None else [positions[int(i)] for i in np.asarray(idx).reshape(-1)]
    if user.op == "Slice" and user.inputs[0] is t and len(user.inputs) >= 3:
        starts, ends = ctx.const(user.inputs[1]), ctx.const(user.inputs[2])
        steps = ctx.const(user.inputs[4]) if len(user.inputs) > 4 else np.ones(1, dtype=np.int64)
        if starts is None or ends is None or steps is None or np.asarray(starts).size != 1:
            return None
        return positions[slice(int(np.asarray(starts).reshape(-1)[0]), int(np.asarray(ends).reshape(-1)[0]),
                               int(np.asarray(steps).reshape(-1)[0]))]
    if user.op == "Concat":
        out: list[int] = []
        for part in user.inputs:
            if part is t:
                out += positions
            else:
                length = ctx.dim(part, 0) if ctx.rank(part) == 1 else None
                if length is None:
                    return None
                out += [-1] * length
        return out
    return None


def fix_heads_read_by_untracked(node: gs.Node, ctx: AnalysisContext) -> None:
    """A Reshape or Expand of data that carries no channels, whose target reads a head count: those heads stay."""
    if len(node.inputs) < 2 or ctx.tracked(node.inputs[0]) is not None:
        return
    for entry in shape_entries(node.inputs[1], ctx.graph) or []:
        source = ctx.tracked(entry.tensor) if isinstance(entry, (Dim, Quotient)) else None
        if source is not None:
            for i, part in enumerate(source.parts):
                if part.axis == entry.axis:
                    what = "head" if source.layout is not None else "channel"
                    ctx.fix(source.tensor, i, f"{node.op} '{node.name}' reads the {what} count to shape other data")


HEAD_RULES: list[ChannelRule] = [WhereRule(), ExpandRule()]


def analyze_layout_slice(node: gs.Node, ctx: AnalysisContext, tracked: TrackedAxis, starts: list[int], ends: list[int],
                         axes: list[int], steps: list[int]) -> None:
    """Slice of a tensor split into parts: along an axis holding one whole part (Q, K or V of a packed
    projection, as timm's ``unbind`` is exported) it picks that part's values, which then stay whole."""
    picked = [np.arange(p.dim) for p in tracked.parts]
    for axis, start, end, step in zip(axes, starts, ends, steps):
        on_axis = [i for i, p in enumerate(tracked.parts) if p.axis == axis]
        if not on_axis:
            continue
        part = tracked.parts[on_axis[0]]
        if len(on_axis) != 1 or part.inner != 1 or part.above != 1:
            raise Barrier("it slices an axis that mixes channels with other data")
        picked[on_axis[0]] = np.arange(part.dim)[slice(start, end, step)]
        ctx.fix(tracked.tensor, on_axis[0], f"Slice '{node.name}' picks fixed positions along the channel parts")
    if any(p.size == 0 for p in picked):
        raise Barrier("it slices every channel away")
    grid = np.stack(np.meshgrid(*picked, indexing="ij"), axis=-1).reshape(-1, len(picked))
    source = np.ravel_multi_index(tuple(grid.T), dims(tracked.parts))
    parts = tuple(replace(p, dim=int(k.size)) for p, k in zip(tracked.parts, picked))
    ctx.track_parts(node.outputs[0], parts, node, ctx.value(node.inputs[0])[source])
    ctx.tie(node.inputs[0], node.outputs[0], source, np.arange(source.size))


def squeezed_layout(tracked: TrackedAxis, squeezed: list[int]) -> tuple[Part, ...]:
    """The layout once ``squeezed`` axes go: a part there must have one value (a sliced-out Q, K or V)."""
    if any(p.axis in squeezed and p.dim != 1 for p in tracked.parts):
        raise Barrier("it squeezes an axis that carries channels")
    kept = tuple(p for p in tracked.parts if p.axis not in squeezed) or None
    if kept is None:
        raise Barrier("it squeezes every channel axis")
    return tuple(replace(p, axis=p.axis - sum(1 for a in squeezed if a < p.axis)) for p in kept)
