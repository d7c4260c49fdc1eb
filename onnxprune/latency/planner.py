"""Latency-aware plans and the ladder of fall-backs used when a pruned model is not faster."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxprune.channels.analysis import ChannelAnalysis
from onnxprune.channels.plan import PrunePlan, RoundTo, make_plan
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.search import LatencyChoice, choose_widths
from onnxprune.latency.target import Target

COARSE_ROUNDING = 32

# Tried in this order until the result is not slower than the input on the target.
ATTEMPTS = ("latency model", f"round to {COARSE_ROUNDING}", "fewer pruned groups", "nothing pruned")
# Always timed beside the latency model's choice: the model misses some costs (layout
# changes around ops other than Conv/Gemm/MatMul, per-op overheads), the runtime does not.
# (Timing only those predicted within 5 % of the choice let RegNet-X-400MF ship widths
# 4.5 % slower than rounding to 16.)
ALTERNATIVES = ("every dead channel", "round to 16")


@dataclass
class LatencyPlanner:
    """A planner for PruneChannelsPass: one rung of :data:`ATTEMPTS`."""

    target: Target
    cache: LatencyCache
    attempt: str = ATTEMPTS[0]
    progress: Callable[[int, int], None] | None = None
    choice: LatencyChoice | None = None

    def __call__(self, analysis: ChannelAnalysis) -> PrunePlan:
        reason = f"faster on {self.target.name}"
        if self.attempt == "nothing pruned":
            everything = {g.index: g.size for g in analysis.groups}
            return make_plan(analysis, group_targets=everything, group_reason=f"pruning did not pay on {self.target.name}")
        if self.attempt == f"round to {COARSE_ROUNDING}":
            return make_plan(analysis, RoundTo(COARSE_ROUNDING))
        if self.attempt == "round to 16":
            return make_plan(analysis, RoundTo(16))
        if self.attempt == "every dead channel":
            return make_plan(analysis)
        base = make_plan(analysis)
        self.choice = choose_widths(analysis, base, self.target, self.cache, progress=self.progress)
        targets = dict(self.choice.targets)
        if self.attempt == "fewer pruned groups":
            gain = {
                c.index: c.predicted_us["unpruned"] - c.predicted_us["chosen"] for c in self.choice.groups
            }
            ranked = sorted(gain, key=gain.get, reverse=True)
            for g in ranked[len(ranked) // 2 :]:
                targets[g] = next(c.total for c in self.choice.groups if c.index == g)
        return make_plan(analysis, group_targets=targets, group_reason=reason)
