"""Products of two activations: attention's ``Q @ K^T`` and ``P @ V`` (MatMul), and Einsum.

Each output axis lines up the two operands' factors on it (see :mod:`onnxprune.channels.layout`);
a channel factor of either operand becomes a factor of the product, and channels of both summed
over (the head dimension of ``Q @ K^T``) are *contracted*. Every operand channel is tied to the
product channels it takes part in, so a head's Q, K and V channels and the head's output are one
component, and a product channel is zero when every term that makes it is.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.layout import Chan, Factor, Plain, coordinates, cut, dims, parts_from_factors, tensor_factors
from onnxprune.channels.rule_base import Barrier, ChannelRule
from onnxprune.channels.slots import TrackedAxis


def _factors(ctx: AnalysisContext, t: gs.Tensor, rank: int) -> list[list[Factor]]:
    """Every axis of ``t`` taken apart (plain sizes from its shape where it carries no channels)."""
    tracked = ctx.tracked(t)
    return tensor_factors(tracked.parts if tracked is not None else (), ctx.shape(t) or [None] * rank, rank)


def _align(fa: list[Factor], fb: list[Factor]) -> list[tuple[Factor | None, Factor | None]] | None:
    """Line up two operands' factors on one axis (cutting a channel factor where the other cuts finer)."""
    qa = [f for f in fa if not (isinstance(f, Plain) and f.size == 1)]
    qb = [f for f in fb if not (isinstance(f, Plain) and f.size == 1)]
    if not qb:
        return [(f, None) for f in qa]
    if not qa:
        return [(None, f) for f in qb]
    pairs: list[tuple[Factor | None, Factor | None]] = []
    while qa and qb:
        a, b = qa[0], qb[0]
        sa, sb = (a.dim if isinstance(a, Chan) else a.size), (b.dim if isinstance(b, Chan) else b.size)
        if sa == sb or (isinstance(a, Plain) and isinstance(b, Plain)):
            pairs.append((qa.pop(0), qb.pop(0)))
        elif isinstance(sa, int) and isinstance(sb, int) and sa % sb == 0:
            front, qa[0] = cut(a, sb, from_end=False)
            pairs.append((front, qb.pop(0)))
        elif isinstance(sa, int) and isinstance(sb, int) and sb % sa == 0:
            front, qb[0] = cut(b, sa, from_end=False)
            pairs.append((qa.pop(0), front))
        else:
            return None
    return pairs if not qa and not qb else None


class _Product:
    """The channel factors of ``A @ B``: per output axis, and the contracted ones."""

    def __init__(self) -> None:
        self.axes: list[list[Factor]] = []
        self.sources: list[dict[str, tuple[int, ...] | None]] = []  # per output channel factor: operand -> key
        self.collapse: list[int] = []  # output factors an operand repeats without carrying them: kept whole
        self.contracted: list[dict[str, tuple[int, ...]]] = []

    def add_axis(self, pairs: list[tuple[Factor | None, Factor | None]]) -> None:
        axis: list[Factor] = []
        for pa, pb in pairs:
            if not (isinstance(pa, Chan) or isinstance(pb, Chan)):
                axis.append(Plain(None))
                continue
            index = len(self.sources)
            self.sources.append({"a": pa.key if isinstance(pa, Chan) else None,
                                 "b": pb.key if isinstance(pb, Chan) else None})
            if any(isinstance(f, Plain) and f.size != 1 for f in (pa, pb)):
                self.collapse.append(index)
            axis.append(Chan((index,), (pa if isinstance(pa, Chan) else pb).dim))
        self.axes.append(axis)

    @property
    def out_dims(self) -> list[int]:
        return [f.dim for axis in self.axes for f in axis if isinstance(f, Chan)]

    def grid(self) -> tuple[np.ndarray, list[int]]:
        """Every combination of output and contracted channel values, and the size of each column."""
        sizes = [f.dim for axis in self.axes for f in axis if isinstance(f, Chan)]
        sizes += [c["dim"] for c in self.contracted]
        return coordinates(tuple(sizes)), sizes


def analyze_activation_matmul(node: gs.Node, ctx: AnalysisContext) -> None:
    """``A @ B`` of two activations (attention's ``Q @ K^T`` and ``P @ V``)."""
    ra, rb, ry = ctx.rank(node.inputs[0]), ctx.rank(node.inputs[1]), ctx.rank(node.outputs[0])
    if ra is None or rb is None or ry is None or ra < 2 or rb < 2:
        raise Barrier("operand ranks unknown, or a vector operand")
    batch = [f"b{j}" for j in range(ry - 2)]
    analyze_product(node, ctx, [batch[len(batch) - (ra - 2):] + ["m", "k"], batch[len(batch) - (rb - 2):] + ["k", "n"]],
                    batch + ["m", "n"])


def analyze_einsum(node: gs.Node, ctx: AnalysisContext) -> None:
    """Einsum of two activations with one letter per axis (torchvision MaxViT's attention)."""
    equation = str(node.attrs.get("equation", "")).replace(" ", "")
    if "->" not in equation or "..." in equation or len(node.inputs) != 2:
        raise Barrier("only two-operand einsum equations with an explicit output and no ellipsis are covered")
    ins, out = equation.split("->")
    letters = ins.split(",")
    ranks = [ctx.rank(t) for t in node.inputs]
    if any(r != len(lt) or len(set(lt)) != len(lt) for r, lt in zip(ranks, letters)) or len(set(out)) != len(out):
        raise Barrier("its equation repeats a letter or does not match its operands' ranks")
    analyze_product(node, ctx, [list(lt) for lt in letters], list(out))


def analyze_product(node: gs.Node, ctx: AnalysisContext, letters: list[list[str]], out_letters: list[str]) -> None:
    """A product of two activations with one letter per axis: letters in the output are kept (batch and free
    axes), letters of both operands missing from it are summed over (contracted)."""
    a, b = node.inputs[0], node.inputs[1]
    fa, fb = _factors(ctx, a, len(letters[0])), _factors(ctx, b, len(letters[1]))
    by_letter = [dict(zip(letters[0], fa)), dict(zip(letters[1], fb))]
    for side, factors in enumerate(by_letter):
        for letter, axis_factors_ in factors.items():
            if letter not in out_letters and letter not in by_letter[1 - side] and any(isinstance(f, Chan) for f in axis_factors_):
                raise Barrier("it sums one operand's channels away")
    product = _Product()
    for letter in out_letters:
        pairs = _align(by_letter[0].get(letter, [Plain(1)]), by_letter[1].get(letter, [Plain(1)]))
        if pairs is None:
            raise Barrier("its operands' heads do not line up")
        product.add_axis(pairs)
    for letter in [lt for lt in letters[0] if lt in by_letter[1] and lt not in out_letters]:
        kpairs = _align(by_letter[0][letter], by_letter[1][letter])
        if kpairs is None or any(isinstance(pa, Chan) != isinstance(pb, Chan) for pa, pb in kpairs):
            raise Barrier("it sums channels against data that carries none")
        product.contracted += [{"a": pa.key, "b": pb.key, "dim": pa.dim} for pa, pb in kpairs if isinstance(pa, Chan)]
    if product.contracted:
        if not product.sources:
            raise Barrier("it sums channels into a value that carries none")
        ctx.contracted.update(t.name for t in (a, b) if ctx.tracked(t) is not None)
    if product.sources:
        _declare_product(node, ctx, product)


class EinsumRule(ChannelRule):
    """Einsum of two activations: see :func:`analyze_product`."""

    ops = ("Einsum",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if any(ctx.tracked(t) is not None for t in node.inputs):
            analyze_einsum(node, ctx)


def _declare_product(node: gs.Node, ctx: AnalysisContext, product: _Product) -> None:
    """Track the product's channels, tie each operand's channels to them, and find the zero ones."""
    y = node.outputs[0]
    out_parts = parts_from_factors(product.axes, len(product.sources))
    if out_parts is None:
        raise Barrier("its product's heads sit below an axis of unknown size")
    grid, sizes = product.grid()
    out_dims = product.out_dims
    out_index = np.ravel_multi_index(tuple(grid[:, : len(out_dims)].T), out_dims)
    term_zero = np.zeros(len(grid), dtype=bool)
    slots = {}
    for name, t in (("a", node.inputs[0]), ("b", node.inputs[1])):
        tracked = ctx.tracked(t)
        if tracked is None:
            continue
        slots[name] = _operand_slots(tracked, name, product, grid, sizes)
        term_zero |= ctx.value(t)[slots[name]] == 0
    out_zero = np.ones(int(np.prod(out_dims)), dtype=bool)
    np.logical_and.at(out_zero, out_index, term_zero)
    ctx.track_parts(y, out_parts, node, np.where(out_zero, 0.0, np.nan))
    for name, t in (("a", node.inputs[0]), ("b", node.inputs[1])):
        if name in slots:
            ctx.tie(t, y, slots[name], out_index)
    for column in product.collapse:
        whole = grid[:, : len(out_dims)].copy()
        whole[:, column] = 0
        ctx.tie(y, y, out_index, np.ravel_multi_index(tuple(whole.T), out_dims))


def _operand_slots(tracked: TrackedAxis, name: str, product: _Product, grid: np.ndarray, sizes: list[int]) -> np.ndarray:
    """For every point of the product's grid, the operand's channel that takes part in it."""
    columns: dict[int, list[tuple[tuple[int, ...], int]]] = {}
    for column, source in enumerate(product.sources):
        if source[name] is not None:
            columns.setdefault(source[name][0], []).append((source[name], column))
    for c, pair in enumerate(product.contracted):
        columns.setdefault(pair[name][0], []).append((pair[name], len(product.sources) + c))
    coords = np.zeros((len(grid), len(tracked.parts)), dtype=np.int64)
    for i, part in enumerate(tracked.parts):
        pieces = sorted(columns.get(i, []))
        if int(np.prod([sizes[col] for _, col in pieces])) != part.dim:
            raise Barrier("an operand's heads do not all reach its product")
        for _, col in pieces:
            coords[:, i] = coords[:, i] * sizes[col] + grid[:, col]
    return np.ravel_multi_index(tuple(coords.T), dims(tracked.parts))


PRODUCT_RULES: list[ChannelRule] = [EinsumRule()]
