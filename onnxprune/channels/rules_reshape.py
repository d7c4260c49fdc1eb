"""Rules for Flatten and Reshape: a channel becomes a block of features (NCHW -> N, C*H*W), or keeps its axis."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.rule_base import Barrier, ChannelRule, RewriteContext, TrackedInputRule, normalize_axis
from onnxprune.channels.rules_heads import (
    analyze_layout_reshape,
    carries_same_channels,
    fix_channel_count_read,
    fix_heads_read_by_untracked,
    fix_quotient_reads,
    rewrite_repeat,
    rewrite_target,
)
from onnxprune.channels.shape_values import Computed, Dim, Literal, resolve_target, shape_entries
from onnxprune.channels.slots import TrackedAxis
from onnxprune.graphutil import constant_value


def _static(dims) -> bool:
    """True if every dimension in ``dims`` is a known non-negative integer."""
    return dims is not None and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


class FlattenRule(TrackedInputRule):
    """Flatten(axis) with the channel axis outermost in the flattened block: channel k -> features k*inner..."""

    ops = ("Flatten",)

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        x, y = node.inputs[0], node.outputs[0]
        shape = ctx.shape(x)
        if shape is None:
            raise Barrier("input shape unknown")
        axis = normalize_axis(int(node.attrs.get("axis", 1)), len(shape))
        channel_axis = tracked_input.axis
        between, after = shape[axis:channel_axis], shape[channel_axis + 1 :]
        if channel_axis < axis or not _static(between) or any(d != 1 for d in between) or not _static(after):
            raise Barrier("the channel axis is not the outermost flattened axis with static inner size")
        inner = int(np.prod(after, dtype=np.int64)) if after else 1
        _tie_blocks(ctx, node, x, y, 1, tracked_input.size, inner)


def _tie_blocks(
    ctx: AnalysisContext, node: gs.Node, x: gs.Tensor, y: gs.Tensor, out_axis: int, channels: int, per_channel: int
) -> None:
    """Output axis ``out_axis`` holds ``per_channel`` consecutive features per input channel."""
    ctx.track(y, out_axis, channels * per_channel, node, np.repeat(ctx.value(x), per_channel))
    ctx.tie(x, y, np.repeat(np.arange(channels), per_channel), np.arange(channels * per_channel))


def _reshape_block(in_shape: list, out_shape: list, channel_axis: int, channels: int) -> tuple[int, int] | None:
    """(out_axis, features per channel) for a reshape keeping channel blocks contiguous, else None."""
    suffix_in = in_shape[channel_axis:]
    if not _static(suffix_in):
        return None
    total = int(np.prod(suffix_in, dtype=np.int64))
    inner = total // channels if channels else 0
    stride = 1
    for out_axis in range(len(out_shape) - 1, -1, -1):
        dim = out_shape[out_axis]
        if not _static([dim]):
            return None
        if stride * dim == total:
            if stride == 0 or inner % stride:
                return None
            per_channel = inner // stride
            return (out_axis, per_channel) if dim == channels * per_channel else None
        stride *= dim
        if stride > total:
            return None
    return None


class ReshapeRule(TrackedInputRule):
    """Reshape that keeps each channel a contiguous block: channel axis kept ([B, C, H*W]) or flattened.

    The target shape may be a constant or computed at run time (see
    :mod:`onnxprune.channels.shape_values`); the entry at the channel position
    must be -1, a literal we can rewrite, or the input's own channel dimension.
    """

    ops = ("Reshape",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        fix_heads_read_by_untracked(node, ctx)
        super().analyze(node, ctx)

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        x, y = node.inputs[0], node.outputs[0]
        in_shape, out_shape = ctx.shape(x), ctx.shape(y)
        entries = shape_entries(node.inputs[1], ctx.graph)
        if entries is None:
            raise Barrier("its target shape is computed in a way onnxprune does not follow")
        allowzero = bool(int(node.attrs.get("allowzero", 0)))
        if tracked_input.layout is not None:
            analyze_layout_reshape(node, ctx, tracked_input, entries, allowzero)
            return
        fix_quotient_reads(node, ctx, entries)
        if in_shape is not None:  # exact where it resolves; inference may leave -1 entries unknown
            out_shape = resolve_target(in_shape, entries, ctx.tensor, allowzero) or out_shape
        found = None
        if in_shape is not None and out_shape is not None and len(entries) == len(out_shape):
            found = _reshape_block(in_shape, out_shape, tracked_input.axis, tracked_input.size)
        if found is None:  # heads: the channel axis split, or merged with an outer axis
            analyze_layout_reshape(node, ctx, tracked_input, entries, allowzero)
            return
        out_axis, per_channel = found
        for position, entry in enumerate(entries):
            self._check_entry(node, ctx, tracked_input, entry, position, found, allowzero)
        _tie_blocks(ctx, node, x, y, out_axis, tracked_input.size, per_channel)

    @staticmethod
    def _check_entry(
        node: gs.Node,
        ctx: AnalysisContext,
        tracked_input: TrackedAxis,
        entry: Dim | Literal | Computed,
        position: int,
        block: tuple[int, int],
        allowzero: bool,
    ) -> None:
        """A :class:`Barrier` if target-shape ``entry`` pins the channel count where it cannot follow the pruning."""
        out_axis, per_channel = block
        if isinstance(entry, Computed):
            if position == out_axis:
                raise Barrier("its target shape is computed in a way onnxprune does not follow")
        elif isinstance(entry, Dim):
            source = ctx.tracked(entry.tensor)
            tensor = ctx.tensor(entry.tensor)
            follows = position == out_axis and (
                (per_channel == 1 and entry.scale == 1 and entry.tensor == node.inputs[0].name and entry.axis == tracked_input.axis)
                or (entry.source is not None and tensor is not None and ctx.dim(tensor, entry.axis) is not None)
            )
            if source is not None and source.axis == entry.axis and not follows:
                raise Barrier("its target shape reads a channel count")
            if source is not None and source.axis == entry.axis and not carries_same_channels(ctx, node.inputs[0],
                                                                                              entry.tensor):
                fix_channel_count_read(node, ctx, entry)  # rewritten only where this node's channels change
        elif position == out_axis:
            keeps_channels = entry.value == 0 and not allowzero and out_axis == tracked_input.axis and per_channel == 1
            rewritable = entry.value > 0 and (constant_value(node.inputs[1]) is not None or entry.source is not None)
            if not (entry.value == -1 or keeps_channels or rewritable):
                raise Barrier("its target shape names the channel count where onnxprune cannot change it")
        elif entry.value == 0 and not allowzero and position == tracked_input.axis:
            raise Barrier("its target shape copies the channel dimension")

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        if not rewrite_repeat(node, rw):
            rewrite_target(node, rw)


RESHAPE_RULES: list[ChannelRule] = [FlattenRule(), ReshapeRule()]
