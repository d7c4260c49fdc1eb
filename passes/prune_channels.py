"""The pruning pass: delete provably dead channels across every dependent node."""

from __future__ import annotations

from collections.abc import Callable

import onnx_graphsurgeon as gs

from onnxprune.channels.analysis import ChannelAnalysis, analyze
from onnxprune.channels.plan import PrunePlan, WidthPolicy, make_plan
from onnxprune.channels.rewrite import apply_plan
from onnxprune.pass_infra import GraphPass, PassResult


class PruneChannelsPass(GraphPass):
    name = "prune-channels"
    summary = "delete channels that are provably zero (or constant and foldable) from every node they reach"
    requires = frozenset({"toposorted", "shapes", "constants-folded"})
    ensures = frozenset({"toposorted"})

    def __init__(
        self,
        width_policy: WidthPolicy | None = None,
        planner: Callable[[ChannelAnalysis], PrunePlan] | None = None,
        *,
        assume_finite: bool = False,
    ) -> None:
        """``planner`` (e.g. a latency-aware one) replaces the default: every dead channel, ``width_policy`` aside.
        ``assume_finite``: channels read only by zero weights go too (see :func:`~onnxprune.channels.analysis.analyze`)."""
        self.width_policy = width_policy
        self.planner = planner
        self.assume_finite = assume_finite

    def call(self, graph: gs.Graph) -> PassResult:
        analysis = analyze(graph, assume_finite=self.assume_finite)
        plan = self.planner(analysis) if self.planner else make_plan(analysis, self.width_policy)
        set_shapes = apply_plan(graph, plan).set_shapes if plan.changes_graph else True
        groups = sum(1 for g in plan.groups if g.removed)
        return PassResult(
            modified=plan.changes_graph,
            summary=f"{plan.removed_channels} channel(s) removed from {groups} group(s)",
            details={"plan": plan},
            preserved=frozenset({"shapes"}) if set_shapes else frozenset(),  # channel counts set by the rewrite
        )
