"""Rules for ops that move channels along the channel axis without computing on them.

Concat and Split shift channel offsets, Slice selects channels, Pad adds
channels. (Ops that move the channel axis itself are in :mod:`rules_axes`;
Flatten and Reshape in :mod:`rules_reshape`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.rule_base import (
    Barrier,
    ChannelRule,
    RewriteContext,
    TrackedInputRule,
    keep_or_all,
    known_rank,
    normalize_axis,
)
from onnxprune.channels.rules_heads import analyze_layout_slice
from onnxprune.channels.shape_values import static_ints
from onnxprune.channels.slots import TrackedAxis
from onnxprune.channels.values import channel_constant, combine_same
from onnxprune.channels.within_head import analyze_layout_concat, analyze_layout_split
from onnxprune.graphutil import opset_version, optional_input

INT64_MAX = np.iinfo(np.int64).max


class _ConcatPart(NamedTuple):
    """One input of a Concat along the channel axis."""

    tensor: gs.Tensor
    size: int
    values: np.ndarray
    constant: bool


class ConcatRule(ChannelRule):
    """Concat: along the channel axis, offsets; along another axis, every input carries the same channels."""

    ops = ("Concat",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tracked = [ctx.tracked(t) for t in node.inputs if ctx.tracked(t) is not None]
        if not tracked:
            return
        if any(t.layout is not None for t in tracked):
            if len(node.inputs) != 1:  # one input (a key/value cache appended to nothing) is the identity
                analyze_layout_concat(node, ctx)
                return
            ctx.track_parts(node.outputs[0], tracked[0].parts, node, ctx.value(node.inputs[0]))
            ctx.tie(node.inputs[0], node.outputs[0])
            return
        rank = ctx.rank(node.outputs[0])
        channel_axes = {t.axis for t in tracked}
        if rank is None or len(channel_axes) != 1:
            raise Barrier("inputs carry channels on different axes")
        channel_axis = channel_axes.pop()
        if normalize_axis(int(node.attrs["axis"]), rank) == channel_axis:
            self._along_channels(node, ctx, channel_axis)
        else:
            self._across_channels(node, ctx, channel_axis, tracked[0].size)

    @staticmethod
    def _parts(node: gs.Node, ctx: AnalysisContext, axis: int) -> list[_ConcatPart]:
        """The inputs of a Concat along channel ``axis``: tracked, constant or of known width."""
        parts = []
        for t in node.inputs:
            tracked, value = ctx.tracked(t), ctx.const(t)
            if tracked is not None:
                parts.append(_ConcatPart(t, tracked.size, ctx.value(t), False))
            elif value is not None:
                parts.append(_ConcatPart(t, value.shape[axis], channel_constant(value, axis, value.shape[axis]), True))
            else:
                size = ctx.dim(t, axis)
                if size is None or not ctx.demand(t, axis, size, node):
                    raise Barrier("an input's channel count is unknown")
                parts.append(_ConcatPart(t, size, ctx.value(t), False))
        return parts

    def _along_channels(self, node: gs.Node, ctx: AnalysisContext, axis: int) -> None:
        """Concat along the channel axis: each input's channels sit at its offset in the output."""
        y = node.outputs[0]
        parts = self._parts(node, ctx, axis)
        ctx.track(y, axis, sum(p.size for p in parts), node, np.concatenate([p.values for p in parts]))
        offset = 0
        for part in parts:
            span = np.arange(offset, offset + part.size)
            if part.constant:
                ctx.pin(y, f"channels come from constant '{part.tensor.name}' in Concat '{node.name}'", index=span)
            elif part.size:
                ctx.tie(part.tensor, y, None, span)
            offset += part.size

    @staticmethod
    def _across_channels(node: gs.Node, ctx: AnalysisContext, axis: int, channels: int) -> None:
        """Concat along another axis: every input carries the same ``channels`` channels."""
        y = node.outputs[0]
        values, ties = [], []
        for t in node.inputs:
            tracked, value = ctx.tracked(t), ctx.const(t)
            if tracked is not None:
                if tracked.size != channels:
                    raise Barrier("inputs carry different channel counts")
                values.append(ctx.value(t))
                ties.append(t)
            elif value is not None:
                values.append(channel_constant(value, axis, channels))
            elif ctx.demand(t, axis, channels, node):
                values.append(ctx.value(t))
                ties.append(t)
            else:
                raise Barrier("an input's channel count is unknown")
        ctx.track(y, axis, channels, node, combine_same(values))
        for t in ties:
            ctx.tie(t, y)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if not rw.changed(y) or rw.tracked_layout(y):  # heads: every input is tracked, the offsets are fixed
            return
        channel_axis = rw.axis(y)
        if normalize_axis(int(node.attrs["axis"]), len(y.shape)) == channel_axis:
            return
        keep = rw.keep(y)
        for i, t in enumerate(node.inputs):
            value = rw.const(t)
            if value is not None:
                rw.set_const(node, i, np.compress(keep, value, axis=channel_axis))


ConstOf = Callable[[gs.Tensor], "np.ndarray | None"]


def _constant_input(node: gs.Node, const_of: ConstOf, index: int, reason: str) -> np.ndarray | None:
    """Optional input ``index`` flattened (None when omitted); a :class:`Barrier` for ``reason`` if not constant."""
    t = optional_input(node, index)
    if t is None:
        return None
    value = const_of(t)
    if value is None:
        raise Barrier(reason)
    return np.asarray(value).reshape(-1)


def _constant_ints(node: gs.Node, const_of: ConstOf, index: int, reason: str) -> list[int] | None:
    """Optional input ``index`` as a list of ints (None when omitted); a :class:`Barrier` if not constant."""
    value = _constant_input(node, const_of, index, reason)
    return None if value is None else [int(v) for v in value]


def _split_sizes(node: gs.Node, const_of: ConstOf, opset: int, length: int) -> list[int]:
    """The size of each output of a Split of ``length`` channels."""
    reason = "its split sizes are not constant"
    if opset < 13:
        sizes = node.attrs.get("split")
        sizes = [int(s) for s in sizes] if sizes else None
    else:
        sizes = _constant_ints(node, const_of, 1, reason)
    if sizes is None:
        chunk = math.ceil(length / len(node.outputs))
        sizes = [min(chunk, max(0, length - i * chunk)) for i in range(len(node.outputs))]
    if sum(sizes) != length:
        raise Barrier(reason)
    return sizes


class SplitRule(TrackedInputRule):
    """Split along the channel axis hands each output its range of channels."""

    ops = ("Split",)
    handles_layouts = True

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        x = node.inputs[0]
        rank = known_rank(ctx, x)
        if tracked_input.layout is not None:
            axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
            sizes = lambda length: _split_sizes(node, ctx.const, opset_version(ctx.graph), length)  # noqa: E731
            analyze_layout_split(node, ctx, tracked_input, axis, sizes)
            return
        values = ctx.value(x)
        if normalize_axis(int(node.attrs.get("axis", 0)), rank) != tracked_input.axis:
            for out in node.outputs:
                ctx.track(out, tracked_input.axis, tracked_input.size, node, values)
                ctx.tie(x, out)
            return
        sizes = _split_sizes(node, ctx.const, opset_version(ctx.graph), tracked_input.size)
        offset = 0
        for out, size in zip(node.outputs, sizes):
            ctx.track(out, tracked_input.axis, size, node, values[offset : offset + size])
            if size:
                ctx.tie(x, out, np.arange(offset, offset + size), None)
            offset += size

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x = node.inputs[0]
        if not rw.changed(x) or rw.tracked_layout(x):  # heads: a split part is fixed, the sizes stay
            return
        if rw.axis(node.outputs[0]) != normalize_axis(int(node.attrs.get("axis", 0)), len(x.shape)):
            return
        sizes = [int(keep_or_all(rw.keep(o), 0).sum()) for o in node.outputs]
        node.attrs.pop("num_outputs", None)
        if opset_version(rw.graph) < 13:
            node.attrs["split"] = sizes
        else:
            rw.set_const_or_add(node, 1, np.asarray(sizes, dtype=np.int64))


class _ConstantParamsRule(TrackedInputRule):
    """Ops whose constant parameters (attributes in old opsets, inputs in new) say where channels go.

    Subclasses read the parameters (:meth:`params`, a :class:`Barrier` if not constant),
    declare the output from them (:meth:`track_output`) and write them back for the
    channels kept (:meth:`write_params`).
    """

    not_constant: ClassVar[str] = "its parameters are not constant"

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        rank = ctx.rank(node.inputs[0])
        if rank is None:
            raise Barrier(self.not_constant)
        self.track_output(node, ctx, tracked_input, self.params(node, ctx.const, opset_version(ctx.graph), rank))

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x = node.inputs[0]
        if rw.changed(x) or rw.changed(node.outputs[0]):
            opset = opset_version(rw.graph)
            self.write_params(node, rw, self.params(node, rw.const, opset, len(x.shape)), opset)

    def params(self, node: gs.Node, const_of: ConstOf, opset: int, rank: int) -> NamedTuple:
        """The op's parameters for an input of rank ``rank`` (a :class:`Barrier` for ``not_constant`` if they vary)."""
        raise NotImplementedError

    def track_output(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis, params: NamedTuple) -> None:
        """Declare the output's channels and tie them to the input's."""
        raise NotImplementedError

    def write_params(self, node: gs.Node, rw: RewriteContext, params: NamedTuple, opset: int) -> None:
        """Edit the parameters so the op maps the kept input channels to the kept output channels."""
        raise NotImplementedError


class _SliceParams(NamedTuple):
    """Slice's parameters as lists, axes counted from the front."""

    starts: list[int]
    ends: list[int]
    axes: list[int]
    steps: list[int]


def _as_slice(positions: np.ndarray, kept_count: int) -> tuple[int, int, int] | None:
    """(start, end, step) selecting exactly ``positions`` of a ``kept_count``-long axis, if evenly spaced."""
    diffs = np.diff(positions)
    if not positions.size or (positions.size > 1 and (not np.all(diffs == diffs[0]) or diffs[0] == 0)):
        return None
    step = int(diffs[0]) if positions.size > 1 else 1
    start, end = int(positions[0]), int(positions[-1]) + step
    return start, (end if end >= 0 else -kept_count - 1), step


def _static_or_const(const_of: ConstOf) -> ConstOf:
    """``const_of``, falling back on the value of an integer tensor computed from constants and static sizes.

    Such a value is what the graph computes before pruning; a size it reads may change with the pruning
    only where it is the channel count of the sliced tensor itself (the Shape rule lets no other read
    through), and then the Slice's rewrite writes the parameters as constants for the channels kept."""

    def value(t: gs.Tensor) -> np.ndarray | None:
        v = const_of(t)
        return v if v is not None else static_ints(t)

    return value


class SliceRule(_ConstantParamsRule):
    """Slice: a channel-axis slice selects channels start, start+step, ...; other axes keep them."""

    ops = ("Slice",)
    handles_layouts = True

    not_constant = "its starts/ends/axes/steps are not constant"

    def params(self, node: gs.Node, const_of: ConstOf, opset: int, rank: int) -> _SliceParams:
        """Slice's parameters: attributes before opset 10, inputs after, constant or computed from static
        sizes (``torch.chunk``'s bounds, from the channel count: see :func:`_static_or_const`)."""
        const_of = _static_or_const(const_of)
        if opset < 10:
            starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
            axes = list(node.attrs.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends, axes, steps = (_constant_ints(node, const_of, i, self.not_constant) for i in range(1, 5))
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
        return _SliceParams(starts, ends, [normalize_axis(a, rank) for a in axes], steps)

    def track_output(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis, params: _SliceParams) -> None:
        x, y = node.inputs[0], node.outputs[0]
        values = ctx.value(x)
        if tracked_input.layout is not None:
            analyze_layout_slice(node, ctx, tracked_input, *params)
            return
        if tracked_input.axis not in params.axes:
            ctx.track(y, tracked_input.axis, tracked_input.size, node, values)
            ctx.tie(x, y)
            return
        i = params.axes.index(tracked_input.axis)
        selected = np.arange(tracked_input.size)[slice(params.starts[i], params.ends[i], params.steps[i])]
        ctx.track(y, tracked_input.axis, selected.size, node, values[selected])
        if selected.size:
            ctx.tie(x, y, selected, np.arange(selected.size))

    def write_params(self, node: gs.Node, rw: RewriteContext, params: _SliceParams, opset: int) -> None:
        x, y = node.inputs[0], node.outputs[0]
        computed = opset >= 10 and any(
            (t := optional_input(node, i)) is not None and rw.const(t) is None for i in range(1, 5))
        if rw.tracked_layout(x) or rw.axis(x) not in params.axes:  # heads: the sliced parts stay whole
            if computed:  # computed from sizes that may change: the values they had, as constants
                self._write_slice(node, rw, params, opset)
            return
        channel_axis = rw.axis(x)
        i = params.axes.index(channel_axis)
        keep_in = rw.keep(x)
        selected = np.arange(keep_in.size)[slice(params.starts[i], params.ends[i], params.steps[i])]
        kept_selected = selected[keep_or_all(rw.keep(y), selected.size)]
        new_positions = (np.cumsum(keep_in) - 1)[kept_selected]
        as_slice = _as_slice(new_positions, int(keep_in.sum()))
        params.starts[i], params.ends[i], params.steps[i] = as_slice or (0, INT64_MAX, 1)
        self._write_slice(node, rw, params, opset)
        if as_slice is None:
            rw.insert_after(node, "Gather", [np.asarray(new_positions, dtype=np.int64)], {"axis": channel_axis})

    @staticmethod
    def _write_slice(node: gs.Node, rw: RewriteContext, params: _SliceParams, opset: int) -> None:
        """Write Slice's parameters back: attributes before opset 10, constant inputs after."""
        if opset < 10:
            node.attrs["starts"], node.attrs["ends"] = params.starts, params.ends
            return
        axes = optional_input(node, 3)
        if axes is not None and rw.const(axes) is None:  # computed: the values it had
            rw.set_const(node, 3, np.asarray(params.axes, dtype=np.int64))
        for index, ints in ((1, params.starts), (2, params.ends), (4, params.steps)):
            present = optional_input(node, index) is not None
            if not present and index == 4 and all(s == 1 for s in params.steps):
                continue
            array = np.asarray(ints, dtype=np.int64)
            if present:
                old = rw.const(node.inputs[index])
                rw.set_const(node, index, array.astype(old.dtype) if old is not None else array)
            else:
                if optional_input(node, 3) is None:
                    rw.set_const_or_add(node, 3, np.asarray(params.axes, dtype=np.int64))
                rw.set_const_or_add(node, index, array)


class _PadParams(NamedTuple):
    """Pad's parameters: padding before and after every axis, the fill value, and the padded axes."""

    before: list[int]
    after: list[int]
    value: float
    axes: list[int]


class PadRule(_ConstantParamsRule):
    """Pad: channels padded with a constant are new channels of that value."""

    ops = ("Pad",)

    not_constant = "its pads or value are not constant"

    def params(self, node: gs.Node, const_of: ConstOf, opset: int, rank: int) -> _PadParams:
        """Pad's parameters: attributes before opset 11, inputs after."""
        if opset < 11:
            pads = list(node.attrs.get("pads", node.attrs.get("paddings", [])))
            fill = float(node.attrs.get("value", 0.0))
            axes = list(range(rank))
        else:
            pads = _constant_ints(node, const_of, 1, self.not_constant)
            if pads is None:
                raise Barrier(self.not_constant)
            fill_value = _constant_input(node, const_of, 2, self.not_constant)
            fill = float(fill_value[0]) if fill_value is not None and fill_value.size else 0.0
            padded_axes = _constant_ints(node, const_of, 3, self.not_constant)
            axes = list(range(rank)) if padded_axes is None else [normalize_axis(a, rank) for a in padded_axes]
        count = len(axes)
        before, after = [0] * rank, [0] * rank
        for j, axis in enumerate(axes):
            before[axis], after[axis] = pads[j], pads[j + count]
        return _PadParams(before, after, fill, axes)

    def track_output(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis, params: _PadParams) -> None:
        x, y = node.inputs[0], node.outputs[0]
        mode = str(node.attrs.get("mode", "constant"))
        axis = tracked_input.axis
        before, after = params.before[axis], params.after[axis]
        if before < 0 or after < 0 or ((before or after) and mode != "constant"):
            raise Barrier("it crops or reflects the channel axis")
        values = ctx.value(x)
        spatial = any(params.before[i] or params.after[i] for i in range(len(params.before)) if i != axis)
        if spatial and mode == "constant":
            values = np.where(values == params.value, values, np.nan)
        out = np.concatenate([np.full(before, params.value), values, np.full(after, params.value)])
        ctx.track(y, axis, before + tracked_input.size + after, node, out)
        ctx.tie(x, y, None, np.arange(before, before + tracked_input.size))

    def write_params(self, node: gs.Node, rw: RewriteContext, params: _PadParams, opset: int) -> None:
        x, y = node.inputs[0], node.outputs[0]
        channel_axis = rw.axis(x)
        size = keep_or_all(rw.keep(x), 0).size
        keep_out = rw.keep(y)
        before = params.before[channel_axis]
        new_before, new_after = int(keep_out[:before].sum()), int(keep_out[before + size :].sum())
        j, count = params.axes.index(channel_axis), len(params.axes)
        if opset < 11:
            key = "pads" if "pads" in node.attrs else "paddings"
            pads = list(node.attrs[key])
            pads[j], pads[j + count] = new_before, new_after
            node.attrs[key] = pads
        else:
            pads = np.asarray(rw.const(node.inputs[1])).reshape(-1).copy()
            pads[j], pads[j + count] = new_before, new_after
            rw.set_const(node, 1, pads)


LAYOUT_RULES: list[ChannelRule] = [ConcatRule(), SplitRule(), SliceRule(), PadRule()]
