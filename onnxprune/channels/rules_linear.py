"""Rules for ops that produce new channels from weighted sums: Conv, ConvTranspose, Gemm, MatMul.

These end a channel group: their output channels are a new group (weight
rows), and their inputs are *read* (weight columns). A dead input channel is
deleted together with its weight columns; a constant one is folded into the
bias where that is exact (Gemm, MatMul, unpadded Conv). Each read also names the input channels
whose weights are all zero (``zero_weights``): with ``assume_finite`` they do not make a channel live.

Weights and biases stored quantized (DequantizeLinear of constants) or narrow (a Cast of
float16/bfloat16) are read and cut in that form (:mod:`onnxprune.channels.stored`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext, ReadKind
from onnxprune.channels.rule_base import Barrier, ChannelRule, PlanView, RewriteContext, keep_or_all, take_rows_cols
from onnxprune.channels.rules_products import analyze_activation_matmul
from onnxprune.channels.stored import frozen_axes, input_rounded_by_runtime, set_stored_or_add, stored_weight_and_bias, take
from onnxprune.channels.values import linear_values
from onnxprune.floatbits import reads_any
from onnxprune.graphutil import optional_input
from onnxprune.known_rows import KNOWN_ROWS


def _conv_unpadded(node: gs.Node) -> bool:
    """True if the Conv adds no padding (a constant input channel then stays constant)."""
    pads = [int(p) for p in node.attrs.get("pads", [])]
    return not any(pads) and str(node.attrs.get("auto_pad", "NOTSET")) in ("NOTSET", "VALID")


def _folded_delta(values: np.ndarray, dropped: np.ndarray, weight_sums) -> np.ndarray | None:
    """Bias change that replaces dropped constant input channels (None if all are zero)."""
    idx = dropped[np.isfinite(values[dropped]) & (values[dropped] != 0)]
    if idx.size == 0:
        return None
    return weight_sums(idx) @ values[idx]


def _set_bias(node: gs.Node, rw: RewriteContext, index: int, bias: np.ndarray, dtype: np.dtype) -> None:
    """Make ``bias`` (as ``dtype``) the node's input ``index``, adding that input where it is omitted."""
    set_stored_or_add(rw.graph, node, index, bias.astype(dtype), rw.names, f"{node.name}_bias")


def _take_bias(node: gs.Node, rw: RewriteContext, index: int, kout: np.ndarray) -> None:
    """Keep the entries ``kout`` of the node's bias at input ``index`` (last axis), if it has one with them."""
    if optional_input(node, index) is not None:
        take(rw, node, index, lambda c: np.compress(kout, c, axis=-1))


def _constant_layer(node: gs.Node, reason: str, covered: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The layer's constant weight and optional bias; a :class:`Barrier` for ``reason`` if either
    varies or the layer's attributes are not ``covered``."""
    found = stored_weight_and_bias(node)
    if found is None or not covered:
        raise Barrier(reason)
    return found


def _guard_stored_axes(node: gs.Node, ctx: AnalysisContext, in_axis: int, out_axis: int) -> None:
    """Weight axes its storage cannot cut (quantized in blocks along them, or rounded by the runtime along the
    input channels): the channels on the input axis are read as a barrier, those on the output axis pinned."""
    for axis, why in frozen_axes(node.inputs[1]).items():
        if axis == in_axis:
            ctx.read(node.inputs[0], node, ReadKind.BARRIER, f"read by {node.op} '{node.name}': {why}")
        if axis == out_axis:
            ctx.pin(node.outputs[0], f"{node.op} '{node.name}': {why}")
    rounded = input_rounded_by_runtime(node)
    if rounded is not None:
        ctx.read(node.inputs[0], node, ReadKind.BARRIER, f"read by {node.op} '{node.name}': {rounded}")


_SAMPLE = 64  # weights per input channel looked at first: they decide almost every channel of a trained layer


def zero_inputs(w: np.ndarray, in_axis: int) -> np.ndarray:
    """For each input channel of weight ``w`` (on ``in_axis``): True where all its weights are zero. What the
    subnormal scan found of ``w``'s rows decides without a read where it can (:mod:`onnxprune.known_rows`): with
    the input channels on axis 0, they are the zero rows; on another axis, none is zero if a row holds no zero.
    Else the weights of the first output rows (about ``_SAMPLE`` per channel, one block of memory) decide most
    channels; only the channels still undecided are read whole. The weight is viewed, not copied
    (:func:`reads_any` on the bits)."""
    known = KNOWN_ROWS.lookup(w, w.dtype) if w.ndim >= 2 else None
    if known is not None and in_axis == 0:
        return known.zero.copy()
    if known is not None and known.full.any():
        return np.zeros(w.shape[in_axis], dtype=bool)
    v = _inputs_first(w, in_axis)
    head = v[:, : max(1, _SAMPLE // max(1, v.shape[2]))]
    zero = ~reads_any(head)
    rest = np.flatnonzero(zero)
    if rest.size and head.shape[1] < v.shape[1]:
        zero[rest] = ~reads_any(v[rest])
    return zero


def _inputs_first(w: np.ndarray, in_axis: int) -> np.ndarray:
    """``w`` as (input channel, output channel, window): a view where its layout allows."""
    v = np.moveaxis(w, in_axis, 0)
    if v.ndim == 1:
        return v[:, None, None]
    if v.ndim == 2:
        return v[:, :, None]
    return v.reshape(v.shape[0], v.shape[1], -1)


def _grouped_zero_inputs(w: np.ndarray, group: int) -> np.ndarray:
    """:func:`zero_inputs` of a grouped Conv's weight (out, in / group, ...): each input channel meets its group's rows."""
    cout, cpg = w.shape[0], w.shape[1]
    return ~w.reshape(group, cout // group, cpg, -1).any(axis=(1, 3)).reshape(-1)


def _demand_input(node: gs.Node, ctx: AnalysisContext, axis: int, channels: int, reason: str) -> None:
    """The layer reads ``channels`` channels of its input on ``axis``; a :class:`Barrier` if they are elsewhere."""
    x = node.inputs[0]
    tracked_input = ctx.tracked(x)
    if (tracked_input is not None and tracked_input.axis != axis) or not ctx.demand(x, axis, channels, node):
        raise Barrier(reason)


class ConvRule(ChannelRule):
    """Conv: plain (reads its input), depthwise (ties input to output) or grouped (equal group sizes)."""

    ops = ("Conv",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        w, b = _constant_layer(node, "its weights or bias are not constant")
        group = int(node.attrs.get("group", 1))
        cout, cin = w.shape[0], w.shape[1] * group
        _demand_input(node, ctx, 1, cin, "its input's channels are not on axis 1")
        bias = np.zeros(cout) if b is None else b.astype(np.float64)
        unpadded = _conv_unpadded(node)
        v = ctx.value(x)
        if group == 1:
            ctx.read(x, node, ReadKind.FOLD if unpadded else ReadKind.ZERO, f"read by Conv '{node.name}'",
                     zero_weights=zero_inputs(w, 1))
            out = linear_values(v, w, bias, allow_constant=unpadded)
            ctx.track(y, 1, cout, node, out)
        elif w.shape[1] == 1 and cout % cin == 0:
            mult = cout // cin
            src = np.repeat(np.arange(cin), mult)
            wsum = w.reshape(cout, -1).astype(np.float64)
            allzero = ~np.any(wsum != 0, axis=1)
            vin = v[src]
            const_ok = np.isfinite(vin) & unpadded
            out = np.where(allzero | (vin == 0), bias, np.where(const_ok, vin * wsum.sum(axis=1) + bias, np.nan))
            ctx.track(y, 1, cout, node, out)
            ctx.tie(x, y, src, np.arange(cout))
        else:
            if cin % group or cout % group:
                raise Barrier("its group count does not divide its channels")
            ctx.read(x, node, ReadKind.ZERO, f"read by grouped Conv '{node.name}'",
                     zero_weights=_grouped_zero_inputs(w, group))
            cpg, opg = cin // group, cout // group
            out = np.empty(cout)
            for g in range(group):
                rows = slice(g * opg, (g + 1) * opg)
                out[rows] = linear_values(v[g * cpg : (g + 1) * cpg], w[rows], bias[rows], allow_constant=False)
            ctx.track(y, 1, cout, node, out)
            ctx.add_constraint(node)
        _guard_stored_axes(node, ctx, 1, 0)

    def constrain(self, node: gs.Node, view: PlanView):
        """Grouped Conv: groups go whole, and the remaining ones keep equal sizes."""
        x, y = node.inputs[0], node.outputs[0]
        group = int(node.attrs.get("group", 1))
        rem_in = view.removed(x).reshape(group, -1).copy()
        rem_out = view.removed(y).reshape(group, -1).copy()
        comp_in = view.components(x).reshape(group, -1)
        comp_out = view.components(y).reshape(group, -1)
        full = rem_in.all(axis=1) & rem_out.all(axis=1)
        if full.all():
            full[0] = False
        alive = np.flatnonzero(~full)
        d_in = min(int(rem_in[alive].sum(axis=1).min()), rem_in.shape[1] - 1)
        d_out = min(int(rem_out[alive].sum(axis=1).min()), rem_out.shape[1] - 1)
        keep: list[int] = []
        for g in alive:
            for rem, comp, d in ((rem_in, comp_in, d_in), (rem_out, comp_out, d_out)):
                idx = np.flatnonzero(rem[g])
                keep.extend(comp[g, idx[d:]].tolist())
        if not keep:
            return None
        return np.unique(np.asarray(keep)), f"grouped Conv '{node.name}' needs equal group sizes"

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if not (rw.changed_read(node, x) or rw.changed(y)):
            return
        w, b = stored_weight_and_bias(node)
        group = int(node.attrs.get("group", 1))
        cout, cin = w.shape[0], w.shape[1] * group
        kin, kout = keep_or_all(rw.keep_read(node, x), cin), keep_or_all(rw.keep(y), cout)
        bias = np.zeros(cout) if b is None else b.astype(np.float64)
        if group == 1:
            dropped = np.flatnonzero(~kin)
            delta = _folded_delta(rw.values(x), dropped, lambda idx: w[:, idx].reshape(cout, idx.size, -1).sum(axis=2))
            if delta is not None:
                bias = bias + delta
            take(rw, node, 1, lambda a: take_rows_cols(a, kout, kin))
            if delta is not None:
                _set_bias(node, rw, 2, bias[kout], w.dtype)
            else:
                _take_bias(node, rw, 2, kout)
            rw.gather_input(node, 0)
        elif w.shape[1] == 1 and cout % cin == 0:
            take(rw, node, 1, lambda a: np.compress(kout, a, axis=0))
            _take_bias(node, rw, 2, kout)
            node.attrs["group"] = int(kin.sum())
        else:
            kin_g, kout_g = kin.reshape(group, -1), kout.reshape(group, -1)
            opg = cout // group
            alive = np.flatnonzero(kout_g.any(axis=1))
            take(rw, node, 1, lambda a: np.concatenate([take_rows_cols(a[g * opg : (g + 1) * opg], kout_g[g], kin_g[g]) for g in alive]))
            _take_bias(node, rw, 2, kout)
            node.attrs["group"] = int(alive.size)


class ConvTransposeRule(ChannelRule):
    """ConvTranspose with group 1: weights are (in, out, ...)."""

    ops = ("ConvTranspose",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        group_one = int(node.attrs.get("group", 1)) == 1
        w, b = _constant_layer(node, "only group-1 ConvTranspose with constant weights is covered", group_one)
        cin, cout = w.shape[0], w.shape[1]
        _demand_input(node, ctx, 1, cin, "its input's channels are not on axis 1")
        ctx.read(x, node, ReadKind.ZERO, f"read by ConvTranspose '{node.name}'", zero_weights=zero_inputs(w, 0))
        bias = np.zeros(cout) if b is None else b.astype(np.float64)
        out = linear_values(ctx.value(x), np.swapaxes(w, 0, 1), bias, allow_constant=False)
        ctx.track(y, 1, cout, node, out)
        _guard_stored_axes(node, ctx, 0, 1)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if not (rw.changed(x) or rw.changed(y)):
            return
        w = rw.const(node.inputs[1])
        kin, kout = keep_or_all(rw.keep(x), w.shape[0]), keep_or_all(rw.keep(y), w.shape[1])
        take(rw, node, 1, lambda a: take_rows_cols(a, kin, kout))
        _take_bias(node, rw, 2, kout)


class GemmRule(ChannelRule):
    """Gemm: A's axis 1 is read through B's K axis; the output's axis 1 is B's N axis (transB aware)."""

    ops = ("Gemm",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a, y = node.inputs[0], node.outputs[0]
        plain_a = not int(node.attrs.get("transA", 0))
        bmat, c = _constant_layer(node, "B (or C) is not constant, or A is transposed", plain_a)
        w = bmat if int(node.attrs.get("transB", 0)) else bmat.T  # (N, K)
        n, k = w.shape
        _demand_input(node, ctx, 1, k, "A's features are not on axis 1")
        ctx.read(a, node, ReadKind.FOLD, f"read by Gemm '{node.name}'", zero_weights=zero_inputs(w, 1))
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        cvals = np.zeros(n) if c is None else _row_constant(c, n)
        out = alpha * linear_values(ctx.value(a), w, 0.0, allow_constant=True) + beta * cvals
        ctx.track(y, 1, n, node, out)
        _guard_stored_axes(node, ctx, *((1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)))

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        a, y = node.inputs[0], node.outputs[0]
        if not (rw.changed_read(node, a) or rw.changed(y)):
            return
        bmat = rw.const(node.inputs[1])
        trans_b = int(node.attrs.get("transB", 0))
        w = bmat if trans_b else bmat.T
        n, k = w.shape
        kin, kout = keep_or_all(rw.keep_read(node, a), k), keep_or_all(rw.keep(y), n)
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        delta = _folded_delta(rw.values(a), np.flatnonzero(~kin), lambda idx: w[:, idx].astype(np.float64))
        take(rw, node, 1, lambda m: take_rows_cols(m, kout, kin) if trans_b else take_rows_cols(m, kin, kout))
        c_t = optional_input(node, 2)
        c = rw.const(c_t) if c_t is not None else None
        if delta is not None:
            if c is None or beta == 0:
                new_c = alpha * delta
                node.attrs["beta"] = 1.0
            else:
                c64 = np.asarray(c, dtype=np.float64)
                new_c = np.broadcast_to(c64, c64.shape[:-1] + (n,)) + alpha * delta / beta
            _set_bias(node, rw, 2, np.compress(kout, new_c, axis=-1), bmat.dtype)
        elif c is not None and c.ndim >= 1 and c.shape[-1] == n and n > 1:
            _take_bias(node, rw, 2, kout)
        rw.gather_input(node, 0)


def _row_constant(c: np.ndarray, n: int) -> np.ndarray:
    """Per-output-column value of Gemm's C (NaN where it varies over rows)."""
    c2 = np.broadcast_to(np.asarray(c, dtype=np.float64), (1, n) if c.ndim <= 1 else (c.shape[0], n))
    first = c2[0]
    return np.where(np.all(c2 == first, axis=0), first, np.nan)


class MatMulRule(ChannelRule):
    """MatMul by a constant 2-D matrix: the last axis is the channel axis (2-D and 3-D inputs alike).

    A MatMul of two activations (attention) is :func:`~onnxprune.channels.rules_products.analyze_activation_matmul`.
    """

    ops = ("MatMul",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a, y = node.inputs[0], node.outputs[0]
        bmat = ctx.const(node.inputs[1])
        rank = ctx.rank(a)
        if bmat is None and ctx.const(a) is None:
            analyze_activation_matmul(node, ctx)
            return
        if bmat is None or bmat.ndim != 2 or rank is None or rank < 2:
            if ctx.tracked(a) is not None or ctx.tracked(node.inputs[1]) is not None:
                raise Barrier("only activation @ constant 2-D matrix and activation @ activation are covered")
            return
        if ctx.tracked(a) is not None and ctx.tracked(a).layout is not None:
            raise Barrier("it multiplies attention heads by a constant matrix")
        k, n = bmat.shape
        _demand_input(node, ctx, rank - 1, k, "its input's channels are not on the last axis")
        ctx.read(a, node, ReadKind.FOLD, f"read by MatMul '{node.name}'", zero_weights=zero_inputs(bmat, 0))
        out = linear_values(ctx.value(a), bmat.T, 0.0, allow_constant=True)
        ctx.track(y, rank - 1, n, node, out)
        _guard_stored_axes(node, ctx, 0, 1)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        a, y = node.inputs[0], node.outputs[0]
        if not (rw.changed_read(node, a) or rw.changed(y)):
            return
        bmat = rw.const(node.inputs[1])
        if bmat is None:  # two activations: their shapes follow the operands
            return
        k, n = bmat.shape
        kin, kout = keep_or_all(rw.keep_read(node, a), k), keep_or_all(rw.keep(y), n)
        delta = _folded_delta(rw.values(a), np.flatnonzero(~kin), lambda idx: bmat[idx].T.astype(np.float64))
        take(rw, node, 1, lambda a: take_rows_cols(a, kin, kout))
        if delta is not None:
            rw.add_bias_after(node, np.compress(kout, delta).astype(bmat.dtype))
        rw.gather_input(node, 0)


LINEAR_RULES: list[ChannelRule] = [ConvRule(), ConvTransposeRule(), GemmRule(), MatMulRule()]
