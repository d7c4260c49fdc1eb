"""Deciding which removable channels actually go.

Starts from every removable component and keeps some back, each with a reason:
an op that cannot express the deletion (grouped Conv needs equal group sizes),
a tensor that would become empty, or a *width policy* (``--round-to N``, or a
latency model) that prefers a wider layer. Keeping a dead channel is always
exact, so every decision here is safe; the loop runs until no rule objects.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.analysis import ChannelAnalysis, ChannelGroup
from onnxprune.channels.rules import RULES

# (group, channels that must stay, channels in all) -> channels to keep (>= the first)
WidthPolicy = Callable[[ChannelGroup, int, int], int]


def round_to(n: int) -> WidthPolicy:
    """Keep just enough dead channels that a pruned group's width is a multiple of ``n``."""

    def policy(group: ChannelGroup, needed: int, total: int) -> int:
        if needed >= total:
            return total
        return min(total, max(n, math.ceil(needed / n) * n))

    return policy


@dataclass
class GroupDecision:
    """What happens to one channel group."""

    group: ChannelGroup
    channels: int
    live: int
    dead: int
    removed: int
    kept_dead: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.channels - self.removed


@dataclass
class PrunePlan:
    """Which components are deleted, and why the other dead ones are kept."""

    analysis: ChannelAnalysis
    remove: np.ndarray
    reasons: list[str]
    keep_reason: np.ndarray
    groups: list[GroupDecision] = field(default_factory=list)

    def keep_mask(self, tensor: str) -> np.ndarray:
        return ~self.remove[self.analysis.components_of(tensor)]

    @property
    def removed_channels(self) -> int:
        return int(self.remove.sum())

    @property
    def changes_graph(self) -> bool:
        return bool(self.remove.any())

    def release_graph(self) -> None:
        """Drop references to the graph (and its weights); reports need only the decisions."""
        self.analysis.graph = None
        self.analysis.ctx.graph = None


class _View:
    def __init__(self, analysis: ChannelAnalysis, remove: np.ndarray) -> None:
        self.analysis, self.remove = analysis, remove

    def removed(self, t: gs.Tensor) -> np.ndarray:
        return self.remove[self.analysis.components_of(t.name)]

    def components(self, t: gs.Tensor) -> np.ndarray:
        return self.analysis.components_of(t.name)


def make_plan(analysis: ChannelAnalysis, width_policy: WidthPolicy | None = None) -> PrunePlan:
    """Decide the deletions (see module docstring)."""
    remove = analysis.removable.copy()
    reasons = list(analysis.reasons)
    index = {r: i for i, r in enumerate(reasons)}

    def reason_id(text: str) -> int:
        if text not in index:
            index[text] = len(reasons)
            reasons.append(text)
        return index[text]

    keep_reason = np.where(analysis.pinned & ~analysis.live, analysis.pin_reason, -1)
    view = _View(analysis, remove)

    def keep_back(comps: np.ndarray, text: str) -> bool:
        comps = comps[remove[comps]]
        if comps.size == 0:
            return False
        remove[comps] = False
        keep_reason[comps] = reason_id(text)
        return True

    changed = True
    while changed:
        changed = False
        for node in analysis.ctx.constraint_nodes:
            veto = RULES[node.op].constrain(node, view)
            if veto is not None:
                changed |= keep_back(*veto)
        for group in analysis.groups:
            comps = group.components
            gone = comps[remove[comps]]
            if gone.size == 0:
                continue
            needed = group.size - gone.size
            target = max(needed, 1)
            text = "a tensor cannot be empty"
            if width_policy is not None:
                wanted = width_policy(group, target, group.size)
                if wanted > target:
                    target, text = wanted, "width policy (--round-to / --target)"
            extra = target - needed
            if extra > 0:
                changed |= keep_back(gone[:extra], text)

    plan = PrunePlan(analysis, remove, reasons, keep_reason)
    for group in analysis.groups:
        comps = group.components
        dead = ~analysis.live[comps]
        kept_dead = Counter(reasons[r] for r in keep_reason[comps][dead & ~remove[comps]].tolist() if r >= 0)
        plan.groups.append(
            GroupDecision(
                group=group,
                channels=group.size,
                live=int((~dead).sum()),
                dead=int(dead.sum()),
                removed=int(remove[comps].sum()),
                kept_dead=dict(kept_dead),
            )
        )
    return plan
