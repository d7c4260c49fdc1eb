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
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.analysis import ChannelAnalysis, ChannelGroup
from onnxprune.channels.rules import RULES

class WidthPolicy(Protocol):
    """Chooses how many channels a layer tensor keeps: at least ``needed``, at most ``total``.

    Called for every tensor a Conv/ConvTranspose/Gemm/MatMul reads or writes
    whose width the plan changes; ``reason`` explains the dead channels it keeps.
    """

    reason: str

    def __call__(self, tensor: str, needed: int, total: int) -> int: ...


@dataclass(frozen=True)
class RoundTo:
    """Keep just enough dead channels that every pruned layer width is a multiple of ``n``."""

    n: int

    @property
    def reason(self) -> str:
        return f"--round-to {self.n}"

    def __call__(self, tensor: str, needed: int, total: int) -> int:
        return min(total, max(self.n, math.ceil(needed / self.n) * self.n))


def round_to(n: int) -> WidthPolicy:
    return RoundTo(n)


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


def make_plan(
    analysis: ChannelAnalysis,
    width_policy: WidthPolicy | None = None,
    *,
    group_targets: dict[int, int] | None = None,
    group_reason: str = "faster on the target",
) -> PrunePlan:
    """Decide the deletions (see module docstring).

    ``group_targets`` asks group ``i`` to keep at least that many channels
    (dead ones are kept back in channel order, with ``group_reason``).
    """
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

    tensors = [(t.tensor, analysis.components_of(t.tensor)) for t in analysis.ctx.slots.tracked]
    layer_tensors = analysis.layer_tensors

    def widen(name: str, comps: np.ndarray) -> bool:
        """Keep back removed components of one tensor until its width satisfies the rules."""
        gone = remove[comps]
        if not gone.any():
            return False
        kept, total = int((~gone).sum()), comps.size
        target, text = 1, "a tensor cannot be empty"
        if width_policy is not None and name in layer_tensors:
            wanted = width_policy(name, max(kept, 1), total)
            if wanted > max(kept, 1):
                target, text = wanted, width_policy.reason
        if kept >= target:
            return False
        uniq, first, counts = np.unique(comps[gone], return_index=True, return_counts=True)
        by_position = np.argsort(first)
        order, per_comp = uniq[by_position], counts[by_position]
        take = int(np.searchsorted(np.cumsum(per_comp), target - kept)) + 1
        return keep_back(order[:take], text)

    for group in analysis.groups:
        want = (group_targets or {}).get(group.index)
        if want is None:
            continue
        comps = group.components
        gone = comps[remove[comps]]
        extra = want - (comps.size - gone.size)
        if extra > 0:
            keep_back(gone[:extra], group_reason)

    changed = True
    while changed:
        changed = False
        for node in analysis.ctx.constraint_nodes:
            veto = RULES[node.op].constrain(node, view)
            if veto is not None:
                changed |= keep_back(*veto)
        for name, comps in tensors:
            changed |= widen(name, comps)

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
