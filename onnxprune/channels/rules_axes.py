"""Rules for ops that move the channel axis: Transpose, Squeeze, Unsqueeze, Gather, and Shape, which reads it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.passthrough import PassThroughRule, axis_after_removing, constant_axes
from onnxprune.channels.rule_base import Barrier, ChannelRule, TrackedInputRule, known_rank, normalize_axis
from onnxprune.channels.slots import TrackedAxis


class TransposeRule(PassThroughRule):
    """Transpose moves the channel axis to ``perm.index(axis)``."""

    ops = ("Transpose",)

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        rank = known_rank(ctx, node.inputs[0])
        perm = [int(p) for p in node.attrs.get("perm", list(range(rank))[::-1])]
        return perm.index(tracked_input.axis)


class SqueezeRule(PassThroughRule):
    """Squeeze of axes other than the channel axis shifts the channel axis down."""

    ops = ("Squeeze",)

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        axes, rank = constant_axes(node, ctx)
        if axes is None:
            axes = [i for i, d in enumerate(ctx.shape(node.inputs[0])) if d == 1]
        squeezed = [normalize_axis(a, rank) for a in axes]
        if tracked_input.axis in squeezed:
            raise Barrier("it squeezes the channel axis")
        return axis_after_removing(tracked_input.axis, squeezed)


class UnsqueezeRule(PassThroughRule):
    """Unsqueeze shifts the channel axis past the inserted axes."""

    ops = ("Unsqueeze",)

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        axes, rank = constant_axes(node, ctx)
        out_rank = rank + len(axes)
        inserted = {normalize_axis(a, out_rank) for a in axes}
        remaining = [i for i in range(out_rank) if i not in inserted]
        return remaining[tracked_input.axis]


class GatherRule(PassThroughRule):
    """Gather along a non-channel axis keeps every channel."""

    ops = ("Gather",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if ctx.tracked(node.inputs[1]) is not None:
            raise Barrier("its indices come from channel data")
        super().analyze(node, ctx)

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        rank, indices_rank = ctx.rank(node.inputs[0]), ctx.rank(node.inputs[1])
        if rank is None or indices_rank is None:
            raise Barrier("ranks unknown")
        axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
        if axis == tracked_input.axis:
            raise Barrier("it gathers along the channel axis")
        return tracked_input.axis if tracked_input.axis < axis else tracked_input.axis + indices_rank - 1


class ShapeRule(TrackedInputRule):
    """Shape is harmless when only non-channel dimensions of its result are used."""

    ops = ("Shape",)

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        y = node.outputs[0]
        rank = known_rank(ctx, node.inputs[0])
        start = normalize_axis(int(node.attrs.get("start", 0)), rank)
        end = node.attrs.get("end")
        end = rank if end is None else min(normalize_axis(int(end), rank), rank)
        if not start <= tracked_input.axis < end:
            return
        position = tracked_input.axis - start
        if any(self._reads_entry(user, ctx, position, end - start) for user in y.outputs):
            raise Barrier("the channel count is read and used in a computation onnxprune does not follow")
        if y.name in ctx.graph_outputs:
            raise Barrier("the shape is a graph output")

    @staticmethod
    def _reads_entry(user: gs.Node, ctx: AnalysisContext, position: int, length: int) -> bool:
        """Whether ``user`` may read entry ``position`` of the shape (all but a Gather of other entries may)."""
        indices = ctx.const(user.inputs[1]) if user.op == "Gather" and len(user.inputs) > 1 else None
        if indices is None or int(user.attrs.get("axis", 0)) != 0:
            return True
        return position in {normalize_axis(int(i), length) for i in np.asarray(indices).reshape(-1)}


AXES_RULES: list[ChannelRule] = [TransposeRule(), SqueezeRule(), UnsqueezeRule(), GatherRule(), ShapeRule()]
