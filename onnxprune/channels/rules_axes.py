"""Rules for ops that move the channel axis: Transpose, Squeeze, Unsqueeze, Gather, and Shape, which reads it."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.passthrough import PassThroughRule, axis_after_removing, constant_axes
from onnxprune.channels.rule_base import Barrier, ChannelRule, TrackedInputRule, known_rank, normalize_axis
from onnxprune.channels.rules_heads import analyze_select, axes_read_for_computation, squeezed_layout
from onnxprune.channels.slots import TrackedAxis


class TransposeRule(PassThroughRule):
    """Transpose moves the channel axis to ``perm.index(axis)``."""

    ops = ("Transpose",)
    handles_layouts = True

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        rank = known_rank(ctx, node.inputs[0])
        perm = [int(p) for p in node.attrs.get("perm", list(range(rank))[::-1])]
        return perm.index(tracked_input.axis)


class SqueezeRule(PassThroughRule):
    """Squeeze of axes other than the channel axis shifts the channel axis down."""

    ops = ("Squeeze",)
    handles_layouts = True

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        if tracked_input.layout is None:
            super().analyze_tracked(node, ctx, tracked_input)
            return
        parts = squeezed_layout(tracked_input, self._squeezed(node, ctx))
        ctx.track_parts(node.outputs[0], parts, node, ctx.value(node.inputs[0]))
        ctx.tie(node.inputs[0], node.outputs[0])

    @staticmethod
    def _squeezed(node: gs.Node, ctx: AnalysisContext) -> list[int]:
        """The axes Squeeze removes, counted from the front."""
        axes, rank = constant_axes(node, ctx)
        if axes is None:
            axes = [i for i, d in enumerate(ctx.shape(node.inputs[0])) if d == 1]
        return [normalize_axis(a, rank) for a in axes]

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        squeezed = self._squeezed(node, ctx)
        if tracked_input.axis in squeezed:
            raise Barrier("it squeezes the channel axis")
        return axis_after_removing(tracked_input.axis, squeezed)


class UnsqueezeRule(PassThroughRule):
    """Unsqueeze shifts the channel axis past the inserted axes."""

    ops = ("Unsqueeze",)
    handles_layouts = True

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        axes, rank = constant_axes(node, ctx)
        out_rank = rank + len(axes)
        inserted = {normalize_axis(a, out_rank) for a in axes}
        remaining = [i for i in range(out_rank) if i not in inserted]
        return remaining[tracked_input.axis]


class GatherRule(PassThroughRule):
    """Gather along a non-channel axis keeps every channel."""

    ops = ("Gather",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if ctx.tracked(node.inputs[1]) is not None:
            raise Barrier("its indices come from channel data")
        tracked = ctx.tracked(node.inputs[0])
        rank = ctx.rank(node.inputs[0])
        if tracked is not None and tracked.layout is not None and rank is not None:
            axis = normalize_axis(int(node.attrs.get("axis", 0)), rank)
            if any(p.axis == axis for p in tracked.parts):
                analyze_select(node, ctx, tracked, axis)
                return
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
    handles_layouts = True

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        y = node.outputs[0]
        rank = known_rank(ctx, node.inputs[0])
        start = normalize_axis(int(node.attrs.get("start", 0)), rank)
        end = node.attrs.get("end")
        end = rank if end is None else min(normalize_axis(int(end), rank), rank)
        if tracked_input.layout is not None:
            read = axes_read_for_computation(ctx, y, list(range(start, end)))
            for i, part in enumerate(tracked_input.parts):
                if part.axis in read:
                    ctx.fix(tracked_input.tensor, i, f"Shape '{node.name}' reads the head count for a computation")
            return
        if not start <= tracked_input.axis < end:
            return
        if tracked_input.axis in axes_read_for_computation(ctx, y, list(range(start, end))):
            raise Barrier("the channel count is read and used in a computation onnxprune does not follow")


AXES_RULES: list[ChannelRule] = [TransposeRule(), SqueezeRule(), UnsqueezeRule(), GatherRule(), ShapeRule()]
