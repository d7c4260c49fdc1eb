"""The base of rules for ops that pass channels through one to one, and helpers those rules share."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.rule_base import Barrier, TrackedInputRule, ints_attr_or_input
from onnxprune.channels.slots import TrackedAxis

if TYPE_CHECKING:
    from onnxprune.channels.context import AnalysisContext


class PassThroughRule(TrackedInputRule):
    """Ops whose first output carries their first input's channels one to one.

    ``analyze`` tracks the output on :meth:`output_axis` with :meth:`output_values`
    and ties it to the input; subclasses override only those hooks. Both may raise
    :class:`Barrier` (``output_axis`` runs first).
    """

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if tracked_input.layout is not None:  # heads: every part's axis moves as a channel axis would
            moved = tuple(
                replace(p, axis=self.output_axis(node, ctx, replace(tracked_input, axis=p.axis, layout=None)))
                for p in tracked_input.layout
            )
            ctx.track_parts(y, moved, node, self.output_values(node, ctx, ctx.value(x)))
        else:
            axis = self.output_axis(node, ctx, tracked_input)
            ctx.track(y, axis, tracked_input.size, node, self.output_values(node, ctx, ctx.value(x)))
        ctx.tie(x, y)

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        """The output's channel axis (default: the input's)."""
        return tracked_input.axis

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray | None:
        """The output's per-channel values (default: the input's; None: unknown)."""
        return input_values


def reject_used_extra_outputs(node: gs.Node, ctx: AnalysisContext, reason: str) -> None:
    """A :class:`Barrier` for ``reason`` if anything reads an output of ``node`` but the first."""
    if any(ctx.used(t) for t in node.outputs[1:]):
        raise Barrier(reason)


def constant_axes(node: gs.Node, ctx: AnalysisContext) -> tuple[list[int] | None, int]:
    """The node's ``axes`` (attribute, or constant input 1; None when omitted) and its input's rank."""
    axes, ok = ints_attr_or_input(node, ctx.const, "axes", 1)
    rank = ctx.rank(node.inputs[0])
    if not ok or rank is None:
        raise Barrier("its axes are not constant")
    return axes, rank


def axis_after_removing(axis: int, removed_axes) -> int:
    """Where ``axis`` lands once ``removed_axes`` (none of them ``axis``) are dropped from the shape."""
    return axis - sum(1 for a in removed_axes if a < axis)
