"""Channel analysis: run the rule table over a graph, resolve components and groups.

The result says, for every *component* (one channel as it appears in every
tensor it reaches), whether it is live (some consumer sees a value that is not
provably zero, or a constant it cannot fold) and whether it is pinned (it
reaches a graph input/output or an op no rule covers), and why. Components that
span the same tensors form a *group*: "the 64 channels of layer1.0.conv1".

A channel whose only readers multiply it by all-zero weights (a zero ``down_proj`` column) is live
unless ``assume_finite``: its value is not zero, and ``0 * inf`` is NaN, so deleting it is exact only
where the input model's activations are finite. A channel another is derived from (a K/V head that
grouped-query attention repeats for its query heads) is live while a derived one is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext, ReadKind
from onnxprune.channels.rule_base import Barrier
from onnxprune.channels.rules import rule_for
from onnxprune.graphutil import has_subgraphs, producer, walk_subgraph_inputs

CHANNEL_SOURCES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
ZERO_READ_REASON = "read only by zero weights (deleted with --assume-finite)"
SERVES_REASON = "repeated for a live query head (grouped-query attention)"


@dataclass
class ChannelGroup:
    """Components spanning the same set of tensors."""

    index: int
    name: str
    tensors: list[str]
    producers: list[str]
    components: np.ndarray  # component ids, in channel order of the first tensor

    @property
    def size(self) -> int:
        """How many channels the group has."""
        return int(self.components.size)


@dataclass
class ChannelAnalysis:
    """What the analysis found; see the module docstring."""

    graph: gs.Graph
    ctx: AnalysisContext
    component_of_slot: np.ndarray
    live: np.ndarray
    pinned: np.ndarray
    reasons: list[str]
    live_reason: np.ndarray
    pin_reason: np.ndarray
    groups: list[ChannelGroup] = field(default_factory=list)
    group_of_component: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    layer_tensors: set[str] = field(default_factory=set)  # tracked inputs/outputs of Conv/Gemm/MatMul
    needed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # read by a barrier / graph output
    # Outputs of Conv/Gemm/MatMul layers whose channels reach an attention contraction (queries, keys): a head is
    # dead when its values are, so gates for head groups go on the value projection, not on these.
    contracted_outputs: dict[str, np.ndarray] = field(default_factory=dict)  # layer output -> channels (mask)
    # (source, derived) component pairs: the source is kept while the derived one is (grouped-query attention)
    derived: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    # live only because assume_finite is off: every read that sees them non-zero multiplies them by zero weights
    zero_read: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    @property
    def num_components(self) -> int:
        """How many components (channels across all the tensors they reach) the graph has."""
        return int(self.live.size)

    @property
    def removable(self) -> np.ndarray:
        """Components that are provably dead and free to delete everywhere."""
        return ~self.live & ~self.pinned

    def components_of(self, tensor: str) -> np.ndarray:
        """The component of each channel of a tracked tensor."""
        return self.component_of_slot[self.ctx.slots.ids(tensor)]

    @property
    def barriers(self) -> dict[str, str]:
        """Node name -> why channels cannot pass it."""
        return dict(self.ctx.barrier_nodes)


class _Reasons:
    """Reason texts, each stored once and referred to by index."""
    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def id(self, text: str) -> int:
        """Index of ``text`` (added if new)."""
        if text not in self._index:
            self._index[text] = len(self.items)
            self.items.append(text)
        return self._index[text]


def _barrier_with_subgraphs(node: gs.Node, ctx: AnalysisContext) -> None:
    """A node with subgraphs is a barrier, also for the outer tensors its subgraphs read."""
    outer = list(walk_subgraph_inputs(node))
    ctx.barrier(node, "it has subgraphs")
    for name in outer:
        t = ctx.tensor(name)
        if t is not None and ctx.tracked(t) is not None:
            ctx.read(t, node, ReadKind.BARRIER, f"read inside a subgraph of {node.op} '{node.name}'")


# ONNX Runtime's fused attention ops (its transformer optimizer writes them): heads inside cannot be deleted.
FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                   "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "SparseAttention")


def _analyze_node(node: gs.Node, ctx: AnalysisContext) -> None:
    """Run ``node``'s rule; an op without one is a barrier to the channels reaching it."""
    rule = rule_for(node)
    if rule is None and node.domain == "com.microsoft" and node.op in FUSED_ATTENTION:
        ctx.barrier(node, f"com.microsoft.{node.op} is a fused attention op: onnxprune cannot delete heads inside it "
                          "(prune the model before ONNX Runtime's transformer optimizer fuses it)")
        return
    if rule is None:
        if any(ctx.tracked(t) is not None for t in node.inputs):
            domain = f"{node.domain}." if node.domain not in (None, "", "ai.onnx") else ""
            ctx.barrier(node, f"no channel rule for {domain}{node.op}")
        return
    if not rule.handles_layouts and any((t := ctx.tracked(i)) is not None and t.layout is not None for i in node.inputs):
        ctx.barrier(node, "attention heads (channels spread over several axes) reach it, and its rule does not follow them")
        return
    try:
        rule.analyze(node, ctx)
    except Barrier as stop:
        ctx.barrier(node, stop.reason)


def _run_rules(graph: gs.Graph) -> AnalysisContext:
    """Run every node's rule over a toposorted graph; channels reaching a graph output are read there."""
    ctx = AnalysisContext(graph)
    for node in graph.nodes:
        if has_subgraphs(node):
            _barrier_with_subgraphs(node, ctx)
        else:
            _analyze_node(node, ctx)
    for t in graph.outputs:
        if ctx.tracked(t) is not None:
            ctx.read(t, None, ReadKind.BARRIER, f"reaches graph output '{t.name}'")
    return ctx


def analyze(graph: gs.Graph, *, assume_finite: bool = False) -> ChannelAnalysis:
    """Analyse a toposorted graph whose tensors carry shapes (see the infer-shapes pass).

    ``assume_finite``: a read that multiplies a channel by all-zero weights does not make it live (exact where
    the input model's activations are finite)."""
    ctx = _run_rules(graph)
    labels = ctx.slots.components()
    roots, comp = np.unique(labels, return_inverse=True)
    k = roots.size
    reasons = _Reasons()
    live, pinned, needed, zero_read = (np.zeros(k, dtype=bool) for _ in range(4))
    live_reason = np.full(k, -1, dtype=np.int64)
    pin_reason = np.full(k, -1, dtype=np.int64)

    def mark(flags, why, ids, text):
        """Flag components of slots ``ids``, recording ``text`` as the reason where they have none yet."""
        c = comp[ids]
        flags[c] = True
        fresh = c[why[c] < 0]
        if fresh.size:
            why[fresh] = reasons.id(text)

    for read in ctx.reads:
        ids = ctx.slots.ids(read.tensor, read.index)
        vals = ctx.values[read.tensor] if read.index is None else ctx.values[read.tensor][read.index]
        if read.kind is ReadKind.FOLD:
            bad = ~np.isfinite(vals)
            text = f"not constant where {read.reason}"
        else:
            bad = vals != 0
            text = f"not zero where {read.reason}" if read.kind is ReadKind.ZERO else f"live: {read.reason}"
        if read.zero_weights is not None and read.kind is not ReadKind.BARRIER:
            zero_read[comp[ids[bad & read.zero_weights]]] = True
            bad = bad & ~read.zero_weights
        if bad.any():
            mark(live, live_reason, ids[bad], text)
        if read.kind is ReadKind.BARRIER:
            mark(pinned, pin_reason, ids, read.reason)
            needed[comp[ids]] = True
    for pin in ctx.pins:
        mark(pinned, pin_reason, ctx.slots.ids(pin.tensor, pin.index), pin.reason)
    zero_read &= ~live
    if not assume_finite:
        live[zero_read] = True
        live_reason[zero_read] = reasons.id(ZERO_READ_REASON)
    derived = _derived_components(ctx, comp)
    _live_through_derived(derived, live, live_reason, reasons.id(SERVES_REASON))

    analysis = ChannelAnalysis(graph, ctx, comp, live, pinned, reasons.items, live_reason, pin_reason)
    analysis.needed = needed
    analysis.derived = derived
    analysis.zero_read = zero_read if not assume_finite else np.zeros(k, dtype=bool)
    analysis.layer_tensors = {
        t.name
        for node in graph.nodes
        if node.op in CHANNEL_SOURCES
        for t in (node.inputs[0], node.outputs[0])
        if ctx.tracked(t) is not None
    }
    analysis.contracted_outputs = _contracted_outputs(graph, ctx)
    _build_groups(analysis)
    return analysis


def _derived_components(ctx: AnalysisContext, comp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (source, derived) component pairs of the slots' derivations, each pair once."""
    src, dst = ctx.slots.derived()
    if src.size == 0:
        return src, dst
    pairs = np.unique(np.stack([comp[src], comp[dst]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _live_through_derived(derived: tuple[np.ndarray, np.ndarray], live: np.ndarray, live_reason: np.ndarray,
                          reason: int) -> None:
    """A source component is live while a component derived from it is (followed through chains of derivations)."""
    src, dst = derived
    while src.size:
        fresh = live[dst] & ~live[src]
        if not fresh.any():
            return
        newly = np.unique(src[fresh])
        live[newly] = True
        live_reason[newly[live_reason[newly] < 0]] = reason


def _contracted_outputs(graph: gs.Graph, ctx: AnalysisContext) -> dict[str, np.ndarray]:
    """Channels of each layer's output that flow (through ties, backwards from the product) into an
    operand whose channels an attention product sums over: queries and keys, not values."""
    if not ctx.contracted:
        return {}
    reached = np.zeros(ctx.slots.size, dtype=bool)
    for name in ctx.contracted:
        reached[ctx.slots.ids(name)] = True
    src, dst = ctx.slots.ties()
    dsrc, ddst = ctx.slots.derived()  # a repeated key head reaches its source (the key projection) too
    src, dst = np.concatenate([src, dsrc]), np.concatenate([dst, ddst])
    while True:
        fresh = reached[dst] & ~reached[src]
        if not fresh.any():
            break
        reached[src[fresh]] = True
    out = {}
    for node in graph.nodes:
        if node.op in CHANNEL_SOURCES and ctx.tracked(node.outputs[0]) is not None:
            mask = reached[ctx.slots.ids(node.outputs[0].name)]
            if mask.any():
                out[node.outputs[0].name] = mask
    return out


def _build_groups(analysis: ChannelAnalysis) -> None:
    """Group the components by the set of tensors they span, each group labelled by its first layer."""
    ctx = analysis.ctx
    tracked = ctx.slots.tracked
    if not tracked:
        analysis.group_of_component = np.zeros(0, dtype=np.int64)
        return
    signatures, group_of = _signatures(analysis, len(tracked))
    analysis.group_of_component = group_of
    by_group = np.argsort(group_of, kind="stable")  # each group's components, in increasing order
    ends = np.cumsum(np.bincount(group_of, minlength=len(signatures)))
    for sig, gid in signatures.items():
        names = [tracked[i].tensor for i in sig]
        first = tracked[sig[0]].tensor
        members = by_group[(ends[gid - 1] if gid else 0) : ends[gid]]
        order = np.argsort(_position_in(analysis, first, members))
        producers = []
        for n in names:
            t = ctx.tensor(n)  # the analysis's map of the graph's tensors
            node = producer(t) if t is not None else None
            if node is not None and node.op in CHANNEL_SOURCES:
                producers.append(node.name)
        label = producers[0] if producers else first
        analysis.groups.append(ChannelGroup(gid, label, names, producers, members[order]))


def _signatures(analysis: ChannelAnalysis, tensors: int) -> tuple[dict[tuple[int, ...], int], np.ndarray]:
    """The tensors (by tracking order) each component spans: every distinct set numbered in order of its
    first component, and each component's number."""
    key_of_slot = np.repeat(np.arange(tensors), [t.size for t in analysis.ctx.slots.tracked])
    pairs = _sorted_unique(analysis.component_of_slot * tensors + key_of_slot)  # by component, then tensor
    if pairs.size == 0:
        return {}, np.zeros(analysis.num_components, dtype=np.int64)
    comp, keys = pairs // tensors, pairs % tensors
    starts = np.flatnonzero(np.concatenate(([True], comp[1:] != comp[:-1])))
    counts = np.diff(np.append(starts, pairs.size))
    found = _same_sets(keys, starts, counts, tensors)
    if found is None:  # two different sets met under one hash: compare them one by one
        return _signatures_one_by_one(comp, keys, starts, analysis.num_components)
    first, class_of = found
    order = np.argsort(first, kind="stable")  # classes by their first component
    number = np.empty(order.size, dtype=np.int64)
    number[order] = np.arange(order.size)
    group_of = np.empty(analysis.num_components, dtype=np.int64)
    group_of[comp[starts]] = number[class_of]
    listed, starts_at, counts_of = keys.tolist(), starts.tolist(), counts.tolist()
    signatures = {}
    for c in first[order].tolist():  # numbered 0, 1, ... in this order
        signatures[tuple(listed[starts_at[c] : starts_at[c] + counts_of[c]])] = len(signatures)
    return signatures, group_of


def _same_sets(keys: np.ndarray, starts: np.ndarray, counts: np.ndarray, tensors: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Components (runs of ``keys`` from ``starts``, ``counts`` long) with the same keys, found by a hash of
    their keys and checked key by key: (the first component of each class, each component's class), or
    None if the check fails (a hash collision)."""
    weights = _mixed(np.arange(1, tensors + 1, dtype=np.uint64))
    hashes = np.add.reduceat(weights[keys], starts) * np.uint64(1_000_003) + counts.astype(np.uint64)  # wraps round
    _, first, class_of = np.unique(hashes, return_index=True, return_inverse=True)
    rep = first[class_of]  # each component's representative
    if not np.array_equal(counts[rep], counts):
        return None
    offset = np.arange(keys.size) - np.repeat(starts, counts)
    if not np.array_equal(keys[np.repeat(starts[rep], counts) + offset], keys):
        return None
    return first, class_of


def _mixed(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: well-spread 64-bit values for the integers ``x`` (uint64; arithmetic wraps)."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _signatures_one_by_one(
    comp: np.ndarray, keys: np.ndarray, starts: np.ndarray, components: int
) -> tuple[dict[tuple[int, ...], int], np.ndarray]:
    """:func:`_signatures` by a dictionary of each component's keys (``comp``, ``keys``: the sorted pairs)."""
    listed, bounds = keys.tolist(), [*starts.tolist(), keys.size]
    signatures: dict[tuple[int, ...], int] = {}
    group_of = np.empty(components, dtype=np.int64)
    group_of[comp[starts]] = [signatures.setdefault(tuple(listed[a:b]), len(signatures)) for a, b in zip(bounds, bounds[1:])]
    return signatures, group_of


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` for an integer array, by sorting (numpy's hashing is slower on these)."""
    out = np.sort(values)
    return out[np.concatenate(([True], out[1:] != out[:-1]))] if out.size else out


def _position_in(analysis: ChannelAnalysis, tensor: str, members: np.ndarray) -> np.ndarray:
    """First position of each component along ``tensor``'s channel axis (``1 << 40`` where it has none)."""
    comps = analysis.components_of(tensor)
    if comps.size == 0:
        return np.full(members.size, 1 << 40, dtype=np.int64)
    present, first = np.unique(comps, return_index=True)  # first: where each component first appears
    at = np.minimum(np.searchsorted(present, members), present.size - 1)
    return np.where(present[at] == members, first[at], 1 << 40)
