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
from onnxprune.channels.context import ReadKind
from onnxprune.channels.layout import dims, product_closure
from onnxprune.channels.rules import RULES
from onnxprune.floatbits import nonzero_rows
from onnxprune.graphutil import constant_value


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
        """Why dead channels are kept for this policy."""
        return f"--round-to {self.n}"

    def __call__(self, tensor: str, needed: int, total: int) -> int:
        return min(total, max(self.n, math.ceil(needed / self.n) * self.n))


def round_to(n: int) -> WidthPolicy:
    """The width policy of ``--round-to n``."""
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
    zero_read: int = 0  # live channels read only by zero weights (deleted with assume_finite)

    @property
    def kept(self) -> int:
        """Channels the group keeps, live or dead."""
        return self.channels - self.removed


@dataclass
class PrunePlan:
    """Which components are deleted, and why the other dead ones are kept."""

    analysis: ChannelAnalysis
    remove: np.ndarray
    reasons: list[str]
    keep_reason: np.ndarray
    groups: list[GroupDecision] = field(default_factory=list)
    # (layer node, tensor) -> channels that layer alone stops reading (zero, but not deletable upstream)
    read_drops: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def keep_mask(self, tensor: str) -> np.ndarray:
        """Boolean mask of the channels of ``tensor`` the plan keeps."""
        return ~self.remove[self.analysis.components_of(tensor)]

    @property
    def removed_channels(self) -> int:
        """How many components the plan deletes."""
        return int(self.remove.sum())

    @property
    def changes_graph(self) -> bool:
        """True if the plan deletes a channel or drops a read."""
        return bool(self.remove.any()) or bool(self.read_drops)

    def release_graph(self) -> None:
        """Drop references to the graph (and its weights); reports need only the decisions."""
        self.analysis.graph = None
        self.analysis.ctx.graph = None


class _View:
    """The :class:`~onnxprune.channels.rule_base.PlanView` that rules' ``constrain`` hooks see."""
    def __init__(self, analysis: ChannelAnalysis, remove: np.ndarray) -> None:
        self.analysis, self.remove = analysis, remove

    def removed(self, t: gs.Tensor) -> np.ndarray:
        """Boolean mask: which channels of ``t`` are currently to be deleted."""
        return self.remove[self.analysis.components_of(t.name)]

    def components(self, t: gs.Tensor) -> np.ndarray:
        """Component index of each channel of ``t``."""
        return self.analysis.components_of(t.name)


class _PlanDraft:
    """The deletion decision while :func:`make_plan` refines it: what goes, and why dead channels stay."""

    def __init__(self, analysis: ChannelAnalysis, width_policy: WidthPolicy | None) -> None:
        self.analysis = analysis
        self.width_policy = width_policy
        self.remove = analysis.removable.copy()
        self.reasons = list(analysis.reasons)
        self._reason_index = {r: i for i, r in enumerate(self.reasons)}
        self.keep_reason = np.where(analysis.pinned & ~analysis.live, analysis.pin_reason, -1)

    def reason_id(self, text: str) -> int:
        """Index of ``text`` in :attr:`reasons` (added if new)."""
        if text not in self._reason_index:
            self._reason_index[text] = len(self.reasons)
            self.reasons.append(text)
        return self._reason_index[text]

    def keep_back(self, comps: np.ndarray, text: str) -> bool:
        """Keep the components of ``comps`` still to be removed, because of ``text``; True if any were."""
        comps = comps[self.remove[comps]]
        if comps.size == 0:
            return False
        self.remove[comps] = False
        self.keep_reason[comps] = self.reason_id(text)
        return True

    def honour_group_targets(self, group_targets: dict[int, int], group_reason: str, group_reasons: dict[int, str]) -> None:
        """Keep dead channels back, in channel order, until each group ``i`` keeps ``group_targets[i]``
        (the reason: ``group_reasons[i]``, else ``group_reason``)."""
        for group in self.analysis.groups:
            want = group_targets.get(group.index)
            if want is None:
                continue
            comps = group.components
            gone = comps[self.remove[comps]]
            extra = want - (comps.size - gone.size)
            if extra > 0:
                self.keep_back(gone[:extra], group_reasons.get(group.index, group_reason))

    def widen(self, name: str, comps: np.ndarray) -> bool:
        """Keep back removed components of one tensor until its width satisfies the rules."""
        gone = self.remove[comps]
        if not gone.any():
            return False
        kept, total = int((~gone).sum()), comps.size
        target, text = 1, "a tensor cannot be empty"
        if self.width_policy is not None and name in self.analysis.layer_tensors:
            wanted = self.width_policy(name, max(kept, 1), total)
            if wanted > max(kept, 1):
                target, text = wanted, self.width_policy.reason
        if kept >= target:
            return False
        uniq, first, counts = np.unique(comps[gone], return_index=True, return_counts=True)
        by_position = np.argsort(first)
        order, per_comp = uniq[by_position], counts[by_position]
        take = int(np.searchsorted(np.cumsum(per_comp), target - kept)) + 1
        return self.keep_back(order[:take], text)

    def settle(self) -> None:
        """Apply every rule's veto and every width requirement until none objects."""
        view = _View(self.analysis, self.remove)
        tensors = [(t.tensor, self.analysis.components_of(t.tensor)) for t in self.analysis.ctx.slots.tracked]
        changed = True
        while changed:
            changed = self.keep_products()
            changed |= self.keep_derived()
            for node in self.analysis.ctx.constraint_nodes:
                veto = RULES[node.op].constrain(node, view)
                if veto is not None:
                    changed |= self.keep_back(*veto)
            for name, comps in tensors:
                changed |= self.widen(name, comps)

    def keep_products(self) -> bool:
        """Channels spread over several axes (heads x per-head channels) can only lose a product of values
        per part, and fixed parts none: keep back what a pruned tensor of that layout could not hold."""
        ctx, changed = self.analysis.ctx, False
        for tracked in ctx.slots.tracked:
            fixed = ctx.fixed.get(tracked.tensor, {})
            if tracked.layout is None and not fixed:
                continue
            comps = self.analysis.components_of(tracked.tensor)
            closure = product_closure(~self.remove[comps], dims(tracked.parts), set(fixed))
            back = comps[closure & self.remove[comps]]
            if back.size:
                text = next(iter(fixed.values())) if fixed else "attention heads go whole"
                changed |= self.keep_back(np.unique(back), text)
        return changed

    def keep_derived(self) -> bool:
        """A source component (a K/V head grouped-query attention repeats) stays while a component derived from
        it (one of its query heads) stays."""
        src, dst = self.analysis.derived
        back = src[self.remove[src] & ~self.remove[dst]]
        return back.size > 0 and self.keep_back(np.unique(back), "a query head it is repeated for is kept")

    def group_decisions(self) -> list[GroupDecision]:
        """What happens to each channel group under the current decision."""
        decisions = []
        for group in self.analysis.groups:
            comps = group.components
            dead = ~self.analysis.live[comps]
            kept_reasons = self.keep_reason[comps][dead & ~self.remove[comps]].tolist()
            kept_dead = Counter(self.reasons[r] for r in kept_reasons if r >= 0)
            decisions.append(
                GroupDecision(
                    group=group,
                    channels=group.size,
                    live=int((~dead).sum()),
                    dead=int(dead.sum()),
                    removed=int(self.remove[comps].sum()),
                    kept_dead=dict(kept_dead),
                    zero_read=int(self.analysis.zero_read[comps].sum()) if self.analysis.zero_read.size else 0,
                )
            )
        return decisions


def make_plan(
    analysis: ChannelAnalysis,
    width_policy: WidthPolicy | None = None,
    *,
    group_targets: dict[int, int] | None = None,
    group_reason: str = "faster on the target",
    group_reasons: dict[int, str] | None = None,
) -> PrunePlan:
    """Decide the deletions (see module docstring).

    ``group_targets`` asks group ``i`` to keep at least that many channels
    (dead ones are kept back in channel order, with ``group_reasons[i]`` if
    given, else ``group_reason``).
    """
    draft = _PlanDraft(analysis, width_policy)
    draft.honour_group_targets(group_targets or {}, group_reason, group_reasons or {})
    draft.settle()
    plan = PrunePlan(analysis, draft.remove, draft.reasons, draft.keep_reason)
    plan.read_drops = _read_drops(analysis, draft.remove)
    plan.groups = draft.group_decisions()
    return plan


# A layer stops reading zero channels it cannot have deleted upstream only if that drops at
# least this share of its input: the Gather it then needs costs a copy of what it keeps.
MIN_READ_DROP = 0.1
READ_DROP_OPS = ("Gemm", "MatMul")  # a Gather of a feature vector is cheap; of a feature map, not


def _zero_weight_columns(node, tensor: str, features: int) -> np.ndarray:
    """Features of ``tensor`` (the data input of a Gemm/MatMul) whose weights are all zero:
    the layer ignores them whatever they hold (e.g. input pixels a folded gate rejected)."""
    none = np.zeros(features, dtype=bool)
    if len(node.inputs) < 2 or node.inputs[0].name != tensor:
        return none
    w = constant_value(node.inputs[1])
    if w is None or w.ndim != 2:
        return none
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return none
        cols = w.T if int(node.attrs.get("transB", 0)) else w  # one row per input feature
    else:
        cols = w
    if cols.shape[0] != features:
        return none
    return ~nonzero_rows(cols)


def _read_drops(analysis: ChannelAnalysis, remove: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Zero channels that cannot be deleted because their producer cannot drop them (they come from
    a graph input, e.g. input features a gate rejected, or from an op no rule covers): the layers
    reading them drop their weight columns and read the kept channels through a Gather. Exact: those
    channels contribute nothing where they are read. Not applied to channels a graph output or a
    barrier needs, nor to channels kept on purpose (for speed)."""
    if analysis.graph is None:
        return {}
    ops = {n.name: n for n in analysis.graph.nodes}
    drops: dict[tuple[str, str], np.ndarray] = {}
    for read in analysis.ctx.reads:
        node = ops.get(read.node)
        if read.kind is ReadKind.BARRIER or read.index is not None or node is None or node.op not in READ_DROP_OPS:
            continue
        comps = analysis.components_of(read.tensor)
        ignored = (analysis.ctx.values[read.tensor] == 0) | _zero_weight_columns(node, read.tensor, len(comps))
        drop = ignored & ~remove[comps] & analysis.pinned[comps] & ~analysis.needed[comps]
        kept = int((~remove[comps]).sum())
        if drop.any() and drop.sum() >= MIN_READ_DROP * kept and drop.sum() < kept:
            drops[(read.node, read.tensor)] = drop
    return drops
