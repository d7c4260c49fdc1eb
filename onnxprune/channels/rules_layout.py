"""Rules for ops that move channels around without computing on them.

Concat and Split shift channel offsets, Slice selects channels, Pad adds
channels, Transpose/Squeeze/Unsqueeze/Gather move the channel axis, and
Flatten/Reshape map a channel to a block of features (NCHW -> N, C*H*W).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.rule_base import ChannelRule, RewriteContext, ints_attr_or_input, keep_or_all, normalize_axis
from onnxprune.channels.shape_values import Dim, Literal, resolve_target, shape_entries
from onnxprune.channels.values import channel_constant, combine_same
from onnxprune.graphutil import constant_value, opset_version, optional_input

INT64_MAX = np.iinfo(np.int64).max


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


class ConcatRule(ChannelRule):
    """Concat: along the channel axis, offsets; along another axis, every input carries the same channels."""

    ops = ("Concat",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        y = node.outputs[0]
        tracked = [ctx.tracked(t) for t in node.inputs if ctx.tracked(t) is not None]
        if not tracked:
            return
        rank = ctx.rank(y)
        axes = {t.axis for t in tracked}
        if rank is None or len(axes) != 1:
            ctx.barrier(node, "inputs carry channels on different axes")
            return
        a = axes.pop()
        axis = normalize_axis(int(node.attrs["axis"]), rank)
        if axis == a:
            self._along_channels(node, ctx, a)
        else:
            self._across_channels(node, ctx, a)

    def _along_channels(self, node, ctx: AnalysisContext, a: int) -> None:
        y = node.outputs[0]
        parts = []  # (tensor, size, values, is_const)
        for t in node.inputs:
            tt, c = ctx.tracked(t), ctx.const(t)
            if tt is not None:
                parts.append((t, tt.size, ctx.value(t), False))
            elif c is not None:
                parts.append((t, c.shape[a], channel_constant(c, a, c.shape[a]), True))
            else:
                d = ctx.dim(t, a)
                if d is None or not ctx.demand(t, a, d, node):
                    ctx.barrier(node, "an input's channel count is unknown")
                    return
                parts.append((t, d, ctx.value(t), False))
        total = sum(p[1] for p in parts)
        ctx.track(y, a, total, node, np.concatenate([p[2] for p in parts]))
        offset = 0
        for t, size, _, is_const in parts:
            span = np.arange(offset, offset + size)
            if is_const:
                ctx.pin(y, f"channels come from constant '{t.name}' in Concat '{node.name}'", index=span)
            elif size:
                ctx.tie(t, y, None, span)
            offset += size

    def _across_channels(self, node, ctx: AnalysisContext, a: int) -> None:
        y = node.outputs[0]
        channels = ctx.tracked(next(t for t in node.inputs if ctx.tracked(t) is not None)).size
        values, ties = [], []
        for t in node.inputs:
            c = ctx.const(t)
            if ctx.tracked(t) is not None:
                if ctx.tracked(t).size != channels:
                    ctx.barrier(node, "inputs carry different channel counts")
                    return
                values.append(ctx.value(t))
                ties.append(t)
            elif c is not None:
                values.append(channel_constant(c, a, channels))
            elif ctx.demand(t, a, channels, node):
                values.append(ctx.value(t))
                ties.append(t)
            else:
                ctx.barrier(node, "an input's channel count is unknown")
                return
        ctx.track(y, a, channels, node, combine_same(values))
        for t in ties:
            ctx.tie(t, y)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if not rw.changed(y):
            return
        a = rw.axis(y)
        if normalize_axis(int(node.attrs["axis"]), len(y.shape)) == a:
            return
        keep = rw.keep(y)
        for i, t in enumerate(node.inputs):
            c = rw.const(t)
            if c is not None:
                rw.set_const(node, i, np.compress(keep, c, axis=a))


def _split_sizes(node: gs.Node, ctx_const, opset: int, length: int) -> list[int] | None:
    n_out = len(node.outputs)
    if opset < 13:
        sizes = node.attrs.get("split")
        sizes = [int(s) for s in sizes] if sizes else None
    else:
        t = optional_input(node, 1)
        if t is None:
            sizes = None
        else:
            c = ctx_const(t)
            if c is None:
                return None
            sizes = [int(s) for s in np.asarray(c).reshape(-1)]
    if sizes is None:
        chunk = math.ceil(length / n_out)
        sizes = [min(chunk, max(0, length - i * chunk)) for i in range(n_out)]
    return sizes if sum(sizes) == length else None


class SplitRule(ChannelRule):
    """Split along the channel axis hands each output its range of channels."""

    ops = ("Split",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = node.inputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        if rank is None:
            ctx.barrier(node, "input rank unknown")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        v = ctx.value(x)
        if axis != tx.axis:
            for out in node.outputs:
                ctx.track(out, tx.axis, tx.size, node, v)
                ctx.tie(x, out)
            return
        sizes = _split_sizes(node, ctx.const, opset_version(ctx.graph), tx.size)
        if sizes is None:
            ctx.barrier(node, "its split sizes are not constant")
            return
        offset = 0
        for out, size in zip(node.outputs, sizes):
            ctx.track(out, tx.axis, size, node, v[offset : offset + size])
            if size:
                ctx.tie(x, out, np.arange(offset, offset + size), None)
            offset += size

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x = node.inputs[0]
        if not rw.changed(x) or rw.axis(node.outputs[0]) != normalize_axis(int(node.attrs.get("axis", 0)), len(x.shape)):
            return
        sizes = [int(keep_or_all(rw.keep(o), 0).sum()) for o in node.outputs]
        node.attrs.pop("num_outputs", None)
        if opset_version(rw.graph) < 13:
            node.attrs["split"] = sizes
        elif optional_input(node, 1) is not None:
            rw.set_const(node, 1, np.asarray(sizes, dtype=np.int64))
        else:
            rw.set_const_or_add(node, 1, np.asarray(sizes, dtype=np.int64))


def _slice_params(node: gs.Node, ctx_const, opset: int, rank: int):
    """(starts, ends, axes, steps) as lists, or None if not constant."""
    if opset < 10:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals = []
        for i in range(1, 5):
            t = optional_input(node, i)
            if t is None:
                vals.append(None)
                continue
            c = ctx_const(t)
            if c is None:
                return None
            vals.append([int(v) for v in np.asarray(c).reshape(-1)])
        starts, ends, axes, steps = vals
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, [normalize_axis(a, rank) for a in axes], steps


class SliceRule(ChannelRule):
    """Slice: a channel-axis slice selects channels start, start+step, ...; other axes keep them."""

    ops = ("Slice",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        params = _slice_params(node, ctx.const, opset_version(ctx.graph), rank) if rank is not None else None
        if params is None:
            ctx.barrier(node, "its starts/ends/axes/steps are not constant")
            return
        starts, ends, axes, steps = params
        v = ctx.value(x)
        if tx.axis not in axes:
            ctx.track(y, tx.axis, tx.size, node, v)
            ctx.tie(x, y)
            return
        i = axes.index(tx.axis)
        idx = np.arange(tx.size)[slice(starts[i], ends[i], steps[i])]
        ctx.track(y, tx.axis, idx.size, node, v[idx])
        if idx.size:
            ctx.tie(x, y, idx, np.arange(idx.size))

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if not (rw.changed(x) or rw.changed(y)):
            return
        rank = len(x.shape)
        opset = opset_version(rw.graph)
        starts, ends, axes, steps = _slice_params(node, rw.const, opset, rank)
        a = rw.axis(x)
        if a not in axes:
            return
        i = axes.index(a)
        kin = rw.keep(x)
        idx = np.arange(kin.size)[slice(starts[i], ends[i], steps[i])]
        kept_idx = idx[keep_or_all(rw.keep(y), idx.size)]
        new_pos = (np.cumsum(kin) - 1)[kept_idx]
        diffs = np.diff(new_pos)
        if new_pos.size and (new_pos.size == 1 or (np.all(diffs == diffs[0]) and diffs[0] != 0)):
            step = int(diffs[0]) if new_pos.size > 1 else 1
            start, end = int(new_pos[0]), int(new_pos[-1]) + step
            if end < 0:
                end = -int(kin.sum()) - 1
            gather = None
        else:
            start, end, step = 0, INT64_MAX, 1
            gather = new_pos
        starts[i], ends[i], steps[i] = start, end, step
        if opset < 10:
            node.attrs["starts"], node.attrs["ends"] = starts, ends
        else:
            for k, vals in ((1, starts), (2, ends), (4, steps)):
                if optional_input(node, k) is None and k == 4 and all(s == 1 for s in steps):
                    continue
                arr = np.asarray(vals, dtype=np.int64)
                if optional_input(node, k) is not None:
                    rw.set_const(node, k, arr.astype(rw.const(node.inputs[k]).dtype))
                else:
                    if optional_input(node, 3) is None:
                        rw.set_const_or_add(node, 3, np.asarray(axes, dtype=np.int64))
                    rw.set_const_or_add(node, k, arr)
        if gather is not None:
            rw.insert_after(node, "Gather", [np.asarray(gather, dtype=np.int64)], {"axis": a})


def _pad_params(node: gs.Node, ctx_const, opset: int, rank: int):
    """(before, after, value) per axis, or None if not constant."""
    if opset < 11:
        pads = list(node.attrs.get("pads", node.attrs.get("paddings", [])))
        value = float(node.attrs.get("value", 0.0))
        axes = list(range(rank))
    else:
        pads = ctx_const(node.inputs[1])
        if pads is None:
            return None
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        vt = optional_input(node, 2)
        value = 0.0
        if vt is not None:
            c = ctx_const(vt)
            if c is None:
                return None
            value = float(np.asarray(c).reshape(-1)[0]) if np.asarray(c).size else 0.0
        at = optional_input(node, 3)
        if at is not None:
            c = ctx_const(at)
            if c is None:
                return None
            axes = [normalize_axis(int(v), rank) for v in np.asarray(c).reshape(-1)]
        else:
            axes = list(range(rank))
    n = len(axes)
    before, after = [0] * rank, [0] * rank
    for j, ax in enumerate(axes):
        before[ax], after[ax] = pads[j], pads[j + n]
    return before, after, value, axes


class PadRule(ChannelRule):
    """Pad: channels padded with a constant are new channels of that value."""

    ops = ("Pad",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        params = _pad_params(node, ctx.const, opset_version(ctx.graph), rank) if rank is not None else None
        if params is None:
            ctx.barrier(node, "its pads or value are not constant")
            return
        before, after, value, _ = params
        mode = str(node.attrs.get("mode", "constant"))
        a = tx.axis
        b, e = before[a], after[a]
        if b < 0 or e < 0 or ((b or e) and mode != "constant"):
            ctx.barrier(node, "it crops or reflects the channel axis")
            return
        v = ctx.value(x)
        spatial = any(before[i] or after[i] for i in range(rank) if i != a)
        if spatial and mode == "constant":
            v = np.where(v == value, v, np.nan)
        out = np.concatenate([np.full(b, value), v, np.full(e, value)])
        ctx.track(y, a, b + tx.size + e, node, out)
        ctx.tie(x, y, None, np.arange(b, b + tx.size))

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if not rw.changed(y):
            return
        rank = len(x.shape)
        opset = opset_version(rw.graph)
        before, after, _, axes = _pad_params(node, rw.const, opset, rank)
        a = rw.axis(x)
        size = keep_or_all(rw.keep(x), 0).size
        kout = rw.keep(y)
        b, e = before[a], after[a]
        new_b, new_e = int(kout[:b].sum()), int(kout[b + size :].sum())
        j, n = axes.index(a), len(axes)
        if opset < 11:
            key = "pads" if "pads" in node.attrs else "paddings"
            pads = list(node.attrs[key])
            pads[j], pads[j + n] = new_b, new_e
            node.attrs[key] = pads
        else:
            pads = np.asarray(rw.const(node.inputs[1])).reshape(-1).copy()
            pads[j], pads[j + n] = new_b, new_e
            rw.set_const(node, 1, pads)


class TransposeRule(ChannelRule):
    """Transpose moves the channel axis to ``perm.index(axis)``."""

    ops = ("Transpose",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        if rank is None:
            ctx.barrier(node, "input rank unknown")
            return
        perm = [int(p) for p in node.attrs.get("perm", list(range(rank))[::-1])]
        ctx.track(y, perm.index(tx.axis), tx.size, node, ctx.value(x))
        ctx.tie(x, y)


class SqueezeRule(ChannelRule):
    """Squeeze/Unsqueeze shift the channel axis index."""

    ops = ("Squeeze", "Unsqueeze")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        axes, ok = ints_attr_or_input(node, ctx.const, "axes", 1)
        if not ok or rank is None:
            ctx.barrier(node, "its axes are not constant")
            return
        if node.op == "Squeeze":
            if axes is None:
                shape = ctx.shape(x)
                axes = [i for i, d in enumerate(shape) if d == 1]
            axes = [normalize_axis(a, rank) for a in axes]
            if tx.axis in axes:
                ctx.barrier(node, "it squeezes the channel axis")
                return
            out_axis = tx.axis - sum(1 for a in axes if a < tx.axis)
        else:
            out_rank = rank + len(axes)
            inserted = sorted(normalize_axis(a, out_rank) for a in axes)
            remaining = [i for i in range(out_rank) if i not in inserted]
            out_axis = remaining[tx.axis]
        ctx.track(y, out_axis, tx.size, node, ctx.value(x))
        ctx.tie(x, y)


class GatherRule(ChannelRule):
    """Gather along a non-channel axis keeps every channel."""

    ops = ("Gather",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
        tx = ctx.tracked(x)
        rank, idx_rank = ctx.rank(x), ctx.rank(idx)
        if ctx.tracked(idx) is not None:
            ctx.barrier(node, "its indices come from channel data")
            return
        if tx is None:
            return
        if rank is None or idx_rank is None:
            ctx.barrier(node, "ranks unknown")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        if axis == tx.axis:
            ctx.barrier(node, "it gathers along the channel axis")
            return
        out_axis = tx.axis if tx.axis < axis else tx.axis + idx_rank - 1
        ctx.track(y, out_axis, tx.size, node, ctx.value(x))
        ctx.tie(x, y)


class ShapeRule(ChannelRule):
    """Shape is harmless when only non-channel dimensions of its result are used."""

    ops = ("Shape",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        if rank is None:
            ctx.barrier(node, "input rank unknown")
            return
        start = normalize_axis(int(node.attrs.get("start", 0)), rank)
        end = node.attrs.get("end")
        end = rank if end is None else min(normalize_axis(int(end), rank), rank)
        if not start <= tx.axis < end:
            return
        position = tx.axis - start
        for user in y.outputs:
            indices = ctx.const(user.inputs[1]) if user.op == "Gather" and len(user.inputs) > 1 else None
            if (
                indices is None
                or int(user.attrs.get("axis", 0)) != 0
                or position in {normalize_axis(int(i), end - start) for i in np.asarray(indices).reshape(-1)}
            ):
                ctx.barrier(node, "the channel count is read and used in a computation onnxprune does not follow")
                return
        if y.name in ctx.graph_outputs:
            ctx.barrier(node, "the shape is a graph output")


class FlattenRule(ChannelRule):
    """Flatten(axis) with the channel axis outermost in the flattened block: channel k -> features k*inner..."""

    ops = ("Flatten",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        shape = ctx.shape(x)
        if tx is None:
            return
        if shape is None:
            ctx.barrier(node, "input shape unknown")
            return
        axis = normalize_axis(int(node.attrs.get("axis", 1)), len(shape))
        a = tx.axis
        between, after = shape[axis:a], shape[a + 1 :]
        if a < axis or not _static(between) or any(d != 1 for d in between) or not _static(after):
            ctx.barrier(node, "the channel axis is not the outermost flattened axis with static inner size")
            return
        inner = int(np.prod(after, dtype=np.int64)) if after else 1
        _tie_blocks(ctx, node, x, y, 1, tx.size, inner)


def _tie_blocks(ctx: AnalysisContext, node: gs.Node, x: gs.Tensor, y: gs.Tensor, out_axis: int, channels: int, m: int):
    """Output axis ``out_axis`` holds ``m`` consecutive features per input channel."""
    ctx.track(y, out_axis, channels * m, node, np.repeat(ctx.value(x), m))
    ctx.tie(x, y, np.repeat(np.arange(channels), m), np.arange(channels * m))


def _reshape_block(in_shape, out_shape, a: int, channels: int):
    """(out_axis, features per channel) for a reshape keeping channel blocks contiguous, else None."""
    suffix_in = in_shape[a:]
    if not _static(suffix_in):
        return None
    total = int(np.prod(suffix_in, dtype=np.int64))
    inner = total // channels if channels else 0
    prod = 1
    for b in range(len(out_shape) - 1, -1, -1):
        d = out_shape[b]
        if not _static([d]):
            return None
        if prod * d == total:
            stride = prod
            if stride == 0 or inner % stride:
                return None
            m = inner // stride
            return (b, m) if d == channels * m else None
        prod *= d
        if prod > total:
            return None
    return None


class ReshapeRule(ChannelRule):
    """Reshape that keeps each channel a contiguous block: channel axis kept ([B, C, H*W]) or flattened.

    The target shape may be a constant or computed at run time (see
    :mod:`onnxprune.channels.shape_values`); the entry at the channel position
    must be -1, a literal we can rewrite, or the input's own channel dimension.
    """

    ops = ("Reshape",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        if tx is None:
            return
        in_shape, out_shape = ctx.shape(x), ctx.shape(y)
        entries = shape_entries(node.inputs[1], ctx.graph)
        if entries is None:
            ctx.barrier(node, "its target shape is computed in a way onnxprune does not follow")
            return
        allowzero = int(node.attrs.get("allowzero", 0))
        if in_shape is not None:  # exact where it resolves; inference may leave -1 entries unknown
            out_shape = resolve_target(in_shape, entries, ctx.graph, bool(allowzero)) or out_shape
        if in_shape is None or out_shape is None or len(entries) != len(out_shape):
            ctx.barrier(node, "shapes unknown")
            return
        found = _reshape_block(in_shape, out_shape, tx.axis, tx.size)
        if found is None:
            ctx.barrier(node, "it splits the channel axis or merges it with an outer axis")
            return
        b, m = found
        for i, e in enumerate(entries):
            if isinstance(e, Dim):
                src = ctx.tracked(e.tensor)
                follows = i == b and m == 1 and e.tensor == x.name and e.axis == tx.axis
                if src is not None and src.axis == e.axis and not follows:
                    ctx.barrier(node, "its target shape reads a channel count")
                    return
            elif i == b:
                keeps_channels = e.value == 0 and not allowzero and b == tx.axis and m == 1
                rewritable = e.value > 0 and (constant_value(node.inputs[1]) is not None or e.source is not None)
                if not (e.value == -1 or keeps_channels or rewritable):
                    ctx.barrier(node, "its target shape names the channel count where onnxprune cannot change it")
                    return
            elif e.value == 0 and not allowzero and i == tx.axis:
                ctx.barrier(node, "its target shape copies the channel dimension")
                return
        _tie_blocks(ctx, node, x, y, b, tx.size, m)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if not rw.changed(y):
            return
        b = rw.axis(y)
        new_size = int(rw.keep(y).sum())
        target = rw.const(node.inputs[1])
        if target is not None:
            target = np.asarray(target).reshape(-1).copy()
            if target[b] > 0:
                target[b] = new_size
                rw.set_const(node, 1, target)
            return
        e = shape_entries(node.inputs[1], rw.graph)[b]
        if isinstance(e, Literal) and e.value > 0:
            holder, index, pos = e.source
            part = np.asarray(rw.const(holder.inputs[index])).copy()
            flat = part.reshape(-1)
            flat[pos] = new_size
            rw.set_const(holder, index, part)


LAYOUT_RULES: list[ChannelRule] = [
    ConcatRule(),
    SplitRule(),
    SliceRule(),
    PadRule(),
    TransposeRule(),
    SqueezeRule(),
    GatherRule(),
    ShapeRule(),
    FlattenRule(),
    ReshapeRule(),
]
