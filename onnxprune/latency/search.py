"""Choosing how many channels each group keeps so the pruned model runs fast on a target.

Every channel group can keep any count between its live channels (prune every
dead one) and its full width (do not prune it). Keeping dead channels is exact,
so the choice is free; it is made from measured layer latencies:

    cost = sum over layers of latency(layer at its input and output widths)
         + sum over products of two activations of latency(product at its operands' shapes)
         + layout conversions between consecutive layers whose kernels use
           different layouts (blocked NCHWc vs plain), at the measured cost per byte.

The products are attention's ``Q @ K^T`` and ``P @ V`` (:mod:`onnxprune.latency.products`): a
group of attention heads (its channels are whole heads) is charged its projections and its
products at each head count, so removing 1 of 12 heads is kept only where it is predicted to pay.

Candidates per group are: prune all dead channels, round the kept count up to
a multiple of 8, 16, 32 or 64, or keep the group whole. Groups are optimised one
at a time with the others fixed (coordinate descent, a few sweeps), starting
from maximal pruning.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from onnxprune.channels.analysis import ChannelAnalysis, ChannelGroup
from onnxprune.channels.plan import PrunePlan
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.layers import layer_specs
from onnxprune.latency.measure import Request, measure
from onnxprune.latency.products import OperandShapes, ProductSpec, product_nodes, product_specs
from onnxprune.latency.target import Target

ROUNDINGS = (8, 16, 32, 64)
START_ROUNDINGS = (8, 16)  # descents also start from every group rounded up to these
SWEEPS = 3


@dataclass
class GroupChoice:
    """The decision for one channel group."""

    index: int
    name: str
    total: int
    live_or_kept: int  # channels the maximal plan keeps
    chosen: int
    predicted_us: dict[str, float] = field(default_factory=dict)  # layers touching the group: max_pruned / chosen / unpruned
    # Products of two activations the group reaches (attention's QK^T and PV), see _product_rows
    products: list[dict] = field(default_factory=list)
    heads: bool = False  # its channels are spread over several axes (heads x per-head channels): a channel is a head

    @property
    def kept_for_speed(self) -> int:
        return self.chosen - self.live_or_kept

    @property
    def attention(self) -> bool:
        """True for an attention block: a group of heads whose products of activations were timed with it."""
        return self.heads and bool(self.products)


@dataclass
class LatencyChoice:
    """Kept channels per group and the predicted latency of the layers (microseconds)."""

    targets: dict[int, int]
    groups: list[GroupChoice]
    predicted_us: dict[str, float]
    measured_layers: int = 0
    products: int = 0  # products of two activations (attention's) reaching a group with dead channels, timed

    def to_dict(self) -> dict:
        return {
            "predicted_ms": {k: v / 1000.0 for k, v in self.predicted_us.items()},
            "layers_measured": self.measured_layers,
            "products_timed": self.products,
        }


class WidthModel:
    """Predicts the layers' latency for an assignment of kept channels per group."""

    def __init__(self, analysis: ChannelAnalysis, base: PrunePlan, target: Target, cache: LatencyCache) -> None:
        self.analysis, self.target, self.cache = analysis, target, cache
        self.specs = [s for s in layer_specs(analysis.graph) if analysis.ctx.tracked(s.in_tensor) or analysis.ctx.tracked(s.out_tensor)]
        self.size = {d.group.index: d.channels for d in base.groups}
        self.k_min = {d.group.index: d.kept for d in base.groups}
        self.free = [g for g in self.k_min if self.k_min[g] < self.size[g]]
        self.coef: dict[str, dict[int, int]] = {}
        for spec in self.specs:
            for t in (spec.in_tensor, spec.out_tensor):
                if t not in self.coef:
                    self.coef[t] = self._coefficients(t)
        self.layers_of: dict[int, list[int]] = defaultdict(list)
        for i, spec in enumerate(self.specs):
            for g in set(self.coef[spec.in_tensor]) | set(self.coef[spec.out_tensor]):
                self.layers_of[g].append(i)
        self.edges = self._edges()
        self.products: list[ProductSpec] = []
        self.shapes = OperandShapes(analysis, base)
        if self.free:
            self._add_products()
        self.measured = 0

    def _product_groups(self, tensors: list[str]) -> set[int]:
        return {g for t in tensors for g in self.shapes.groups(t)}

    def _add_products(self) -> None:
        """The products of two activations (attention's) that reach a group with channels to remove, as units after
        the layers, in ``layers_of`` of their groups. (The model is run to size them only if there are some.)"""
        free = set(self.free)
        nodes = [n for n in product_nodes(self.analysis) if self._product_groups([t.name for t in (*n.inputs, *n.outputs)]) & free]
        self.products = product_specs(self.analysis, self.target.batch, self.target.threads, nodes=nodes)
        for j, spec in enumerate(self.products):
            for g in sorted(self._product_groups([spec.a_tensor, spec.b_tensor, spec.out_tensor])):
                self.layers_of[g].append(len(self.specs) + j)

    @property
    def units(self) -> int:
        """Layers and products: indices below ``len(self.specs)`` are layers, the rest products."""
        return len(self.specs) + len(self.products)

    def product(self, i: int) -> ProductSpec | None:
        """The product of unit ``i`` (None for a layer)."""
        return self.products[i - len(self.specs)] if i >= len(self.specs) else None

    def _coefficients(self, tensor: str) -> dict[int, int]:
        """Slots per kept component of each group in ``tensor`` (empty if untracked)."""
        if self.analysis.ctx.tracked(tensor) is None:
            return {}
        groups = self.analysis.group_of_component[self.analysis.components_of(tensor)]
        ids, counts = np.unique(groups, return_counts=True)
        return {int(g): int(c) // self.size[int(g)] for g, c in zip(ids, counts) if self.size[int(g)]}

    def _edges(self) -> list[tuple[int, int]]:
        """(producer layer, consumer layer) pairs over the same channel groups."""
        by_signature: dict[frozenset, list[int]] = defaultdict(list)
        for i, spec in enumerate(self.specs):
            sig = frozenset(self.coef[spec.out_tensor])
            if sig:
                by_signature[sig].append(i)
        edges = []
        for j, spec in enumerate(self.specs):
            for i in by_signature.get(frozenset(self.coef[spec.in_tensor]), []):
                if i != j:
                    edges.append((i, j))
        return edges

    # -- widths and costs -----------------------------------------------------
    def width(self, tensor: str, assign: dict[int, int], original: int) -> int:
        coef = self.coef.get(tensor)
        if not coef:
            return original
        fixed = original - sum(c * self.size[g] for g, c in coef.items())
        return fixed + sum(c * assign[g] for g, c in coef.items())

    def request(self, i: int, assign: dict[int, int]) -> Request:
        """What unit ``i`` is measured as under ``assign``: a layer at its widths, a product at its operands' shapes."""
        product = self.product(i)
        if product is not None:
            return (product, self.shapes.at(product.a_tensor, product.a_shape, assign),
                    self.shapes.at(product.b_tensor, product.b_shape, assign))
        spec = self.specs[i]
        return spec, self.width(spec.in_tensor, assign, spec.in_width), self.width(spec.out_tensor, assign, spec.out_width)

    def entry(self, i: int, assign: dict[int, int]) -> dict | None:
        spec, a, b = self.request(i, assign)
        return self.cache.get(spec.key(a, b, self.target.batch))

    def ensure(self, requests: list[Request], progress: Callable[[int, int], None] | None = None) -> None:
        self.measured += measure(requests, self.target, self.cache, progress=progress)

    def cost(self, layers: list[int], assign: dict[int, int]) -> float:
        """Predicted microseconds of ``layers`` and of the layout conversions around them."""
        total = 0.0
        layout = {}
        for i in layers:
            e = self.entry(i, assign)
            total += e["us"] if e else 0.0
            layout[i] = e["layout"] if e else None
        per_byte = self.cache.constants.get("reorder_ns_per_byte", 0.0) / 1000.0
        chosen = set(layers)
        for p, c in self.edges:
            if p in chosen or c in chosen:
                lp = layout.get(p) or (self.entry(p, assign) or {}).get("layout")
                lc = layout.get(c) or (self.entry(c, assign) or {}).get("layout")
                if lp and lc and lp != lc:
                    spec = self.specs[p]
                    elements = spec.output_elements(self.width(spec.out_tensor, assign, spec.out_width), self.target.batch)
                    total += per_byte * self.target.activation_bytes * elements
        return total

    def total(self, assign: dict[int, int]) -> float:
        return self.cost(list(range(self.units)), assign)


def candidates(k_min: int, total: int) -> list[int]:
    out = {k_min, total}
    for b in ROUNDINGS:
        r = math.ceil(k_min / b) * b
        if k_min < r < total:
            out.add(r)
    return sorted(out)


def _descend(model: WidthModel, assign: dict[int, int], cands: dict[int, list[int]]) -> dict[int, int]:
    """Coordinate descent: each group in turn takes its best candidate with the others fixed."""
    for _ in range(SWEEPS):
        changed = False
        for g in model.free:
            layers = model.layers_of[g]
            trials = [{**assign, g: c} for c in cands[g]]
            model.ensure([model.request(i, t) for t in trials for i in layers])
            costs = [model.cost(layers, t) for t in trials]
            best = cands[g][int(np.argmin(costs))]
            if best != assign[g]:
                assign[g], changed = best, True
        if not changed:
            break
    return assign


def _product_rows(model: WidthModel, g: int, assign: dict[int, int]) -> list[dict]:
    """The products of activations that group ``g`` reaches: operand shapes and measured microseconds with
    every dead channel of ``g`` deleted, as chosen, and with ``g`` whole (the other groups as chosen)."""
    trials = {"max_pruned": {**assign, g: model.k_min[g]}, "chosen": assign, "unpruned": {**assign, g: model.size[g]}}
    rows = []
    for i in model.layers_of[g]:
        product = model.product(i)
        if product is None:
            continue
        row: dict = {"node": product.name, "op": product.op}
        for label, trial in trials.items():
            _, a, b = model.request(i, trial)
            entry = model.entry(i, trial)
            row[label] = {"a": list(a), "b": list(b), "us": entry["us"] if entry else None}
        rows.append(row)
    return rows


def _group_choice(model: WidthModel, group: ChannelGroup, assign: dict[int, int]) -> GroupChoice:
    """The decision for ``group`` and what its layers (and products) are predicted to cost around it."""
    g, layers, ctx = group.index, model.layers_of[group.index], model.analysis.ctx
    return GroupChoice(
        index=g, name=group.name, total=model.size[g], live_or_kept=model.k_min[g], chosen=assign[g],
        predicted_us={
            "max_pruned": model.cost(layers, {**assign, g: model.k_min[g]}),
            "chosen": model.cost(layers, assign),
            "unpruned": model.cost(layers, {**assign, g: model.size[g]}),
        },
        products=_product_rows(model, g, assign),
        heads=any((t := ctx.tracked(name)) is not None and t.layout is not None for name in group.tensors),
    )


def choose_widths(
    analysis: ChannelAnalysis,
    base: PrunePlan,
    target: Target,
    cache: LatencyCache,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyChoice:
    """Kept channels per group minimising the predicted latency (see module docstring)."""
    model = WidthModel(analysis, base, target, cache)
    cands = {g: candidates(model.k_min[g], model.size[g]) for g in model.free}
    starts = [dict(model.k_min)] + [
        {**model.k_min, **{g: min(model.size[g], math.ceil(model.k_min[g] / b) * b) for g in model.free}} for b in START_ROUNDINGS
    ]
    # Measure every layer at every width one group's candidates give it (one batch), then the rest lazily.
    requests = []
    for g in model.free:
        for c in cands[g]:
            for start in starts:
                trial = {**start, g: c}
                requests += [model.request(i, trial) for i in model.layers_of[g]]
    requests += [model.request(i, {g: model.size[g] for g in model.size}) for i in range(model.units)]
    model.ensure(requests, progress)
    best_assign, best_cost = None, math.inf
    for start in starts:
        assign = _descend(model, dict(start), cands)
        cost = model.total(assign)
        if cost < best_cost:
            best_assign, best_cost = assign, cost
    assign = best_assign
    unpruned = {g: model.size[g] for g in model.size}
    groups = [_group_choice(model, d.group, assign) for d in base.groups if d.group.index in cands]
    cache.save()
    return LatencyChoice(
        targets={g: assign[g] for g in model.free},
        groups=groups,
        predicted_us={
            "input": model.total(unpruned),
            "max_pruned": model.total(model.k_min),
            "round16": model.total(starts[START_ROUNDINGS.index(16) + 1]),
            "output": model.total(assign),
        },
        measured_layers=model.measured,
        products=len(model.products),
    )
