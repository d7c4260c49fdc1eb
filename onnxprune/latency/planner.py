"""Latency-aware plans and the ladder of fall-backs used when a pruned model is not faster.

Every way of choosing widths is a named :class:`Rung`: a stable ``id`` that code
dispatches on, the ``label`` that reports and the command line show, and the
function that makes its plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxprune.channels.analysis import ChannelAnalysis
from onnxprune.channels.plan import PrunePlan, RoundTo, make_plan
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.search import LatencyChoice, choose_widths
from onnxprune.latency.target import Target

COARSE_ROUNDING = 32
FINE_ROUNDING = 16


@dataclass(frozen=True)
class Rung:
    """One named way of choosing widths for a target."""

    id: str
    label: str
    plan: Callable[[ChannelAnalysis, LatencyPlanner], PrunePlan]


def faster_reason(target: Target) -> str:
    """Why the latency model keeps a group's dead channels."""
    return f"faster on {target.name}"


def heads_reason(target: Target) -> str:
    """Why the latency model keeps dead heads of an attention block (shown by ``--explain``)."""
    return f"faster on {target.name}: removing these heads does not pay (projections and attention products timed)"


def _plan_for(analysis: ChannelAnalysis, planner: LatencyPlanner, choice: LatencyChoice, targets: dict[int, int]) -> PrunePlan:
    """The plan keeping ``targets`` channels per group; an attention block's kept heads say so."""
    heads = {c.index: heads_reason(planner.target) for c in choice.groups if c.attention}
    return make_plan(analysis, group_targets=targets, group_reason=faster_reason(planner.target), group_reasons=heads)


def _latency_model(analysis: ChannelAnalysis, planner: LatencyPlanner) -> PrunePlan:
    choice = planner.choose(analysis)
    return _plan_for(analysis, planner, choice, dict(choice.targets))


def _fewer_pruned_groups(analysis: ChannelAnalysis, planner: LatencyPlanner) -> PrunePlan:
    """The latency model's widths, with the half of the groups that gain least left whole (an attention block's
    gain counts its products)."""
    choice = planner.choose(analysis)
    targets = dict(choice.targets)
    gain = {c.index: c.predicted_us["unpruned"] - c.predicted_us["chosen"] for c in choice.groups}
    ranked = sorted(gain, key=gain.get, reverse=True)
    totals = {c.index: c.total for c in choice.groups}
    for group in ranked[len(ranked) // 2 :]:
        targets[group] = totals[group]
    return _plan_for(analysis, planner, choice, targets)


def _nothing_pruned(analysis: ChannelAnalysis, planner: LatencyPlanner) -> PrunePlan:
    everything = {g.index: g.size for g in analysis.groups}
    return make_plan(analysis, group_targets=everything, group_reason=f"pruning did not pay on {planner.target.name}")


def _every_dead_channel(analysis: ChannelAnalysis, planner: LatencyPlanner) -> PrunePlan:
    return make_plan(analysis)


def _rounded_to(multiple: int) -> Callable[[ChannelAnalysis, LatencyPlanner], PrunePlan]:
    def plan(analysis: ChannelAnalysis, planner: LatencyPlanner) -> PrunePlan:
        return make_plan(analysis, RoundTo(multiple))

    return plan


LATENCY_MODEL = Rung("latency-model", "latency model", _latency_model)
ROUND_TO_COARSE = Rung(f"round-to-{COARSE_ROUNDING}", f"round to {COARSE_ROUNDING}", _rounded_to(COARSE_ROUNDING))
FEWER_PRUNED_GROUPS = Rung("fewer-pruned-groups", "fewer pruned groups", _fewer_pruned_groups)
NOTHING_PRUNED = Rung("nothing-pruned", "nothing pruned", _nothing_pruned)
EVERY_DEAD_CHANNEL = Rung("every-dead-channel", "every dead channel", _every_dead_channel)
ROUND_TO_FINE = Rung(f"round-to-{FINE_ROUNDING}", f"round to {FINE_ROUNDING}", _rounded_to(FINE_ROUNDING))

@dataclass
class LatencyPlanner:
    """A planner for PruneChannelsPass: the plan of one :class:`Rung` (the latency model's by default)."""

    target: Target
    cache: LatencyCache
    rung: Rung = LATENCY_MODEL
    progress: Callable[[int, int], None] | None = None
    choice: LatencyChoice | None = None

    def __call__(self, analysis: ChannelAnalysis) -> PrunePlan:
        return self.rung.plan(analysis, self)

    def choose(self, analysis: ChannelAnalysis) -> LatencyChoice:
        """The latency model's widths for ``analysis`` (kept as :attr:`choice`)."""
        base = make_plan(analysis)
        self.choice = choose_widths(analysis, base, self.target, self.cache, progress=self.progress)
        return self.choice


# Tried in this order until the result is not slower than the input on the target.
ATTEMPTS = (LATENCY_MODEL, ROUND_TO_COARSE, FEWER_PRUNED_GROUPS, NOTHING_PRUNED)
FALL_BACKS = ATTEMPTS[1:]  # when no first-rung candidate beats the input; the last one is always accepted
# Always timed beside the latency model's choice: the model misses some costs (layout
# changes around ops other than Conv/Gemm/MatMul, per-op overheads), the runtime does not.
# (Timing only those predicted within 5 % of the choice let RegNet-X-400MF ship widths
# 4.5 % slower than rounding to 16.)
ALTERNATIVES = (EVERY_DEAD_CHANNEL, ROUND_TO_FINE)
RUNGS = {rung.id: rung for rung in (*ATTEMPTS, *ALTERNATIVES)}
