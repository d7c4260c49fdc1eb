"""The standard ONNX ``Attention`` op (opset 23): ``softmax(Q @ K^T * scale + mask) @ V`` inside one node.

Head h of Q, K, V and the output is one unit, as the products of :mod:`onnxprune.channels.rules_products` make it
for a hand-written ``Q @ K^T`` and ``P @ V``: every channel of query head h and of its K/V head is tied to every
channel of output head h, and output channel (h, v) is known zero where V's (h, v) is (``P @ 0 = 0``, whatever
Q, K and the mask are), so a head is dead exactly when its V slice is. Only whole heads go: a head's channels are
one component, so the head width D never loses a position (and the default scale ``1/sqrt(D)`` stays right).

* 4-D form: Q ``[B, Hq, S, D]``, K ``[B, Hkv, T, D]``, V ``[B, Hkv, T, Dv]``, output ``[B, Hq, S, Dv]``, each
  tracked with heads alone on axis 1 and the head width alone on axis 3 (what a Reshape and Transpose of a
  projection make);
* 3-D form: Q ``[B, S, Hq*D]`` (K, V alike) with ``q_num_heads`` / ``kv_num_heads``, which the rewrite updates;
* grouped-query attention inside the op (Hq = G * Hkv): K/V head kv is tied to its G query heads, so it goes
  only with all of them and the group size stays G;
* an attention mask that broadcasts over the heads (size 1 there, or rank < 3) is left as it is; a constant mask
  with one slice per query head is sliced with the heads.

A barrier, with its reason: Q, K and V that do not all carry the heads in those layouts, a mask that carries
channels or varies along the heads at run time, past key/value inputs, and the present key/value or the
``qk_matmul_output`` outputs when something reads them. ``scale``, ``is_causal``, ``softcap`` and
``softmax_precision`` act alike on every head and change nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.layout import Part
from onnxprune.channels.rule_base import Barrier, ChannelRule, RewriteContext


@dataclass(frozen=True)
class _Heads:
    """Channel (h, w) of an operand is slot ``h * width + w``."""

    heads: int
    width: int


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node`` (None where it is omitted)."""
    if index >= len(node.inputs):
        return None
    t = node.inputs[index]
    return t if isinstance(t, gs.Constant) or t.name else None


def _operand_heads(ctx: AnalysisContext, t: gs.Tensor, rank: int, heads: int | None, what: str) -> _Heads:
    """How ``t``'s channels split into heads; a :class:`Barrier` unless it carries whole heads in the op's layout."""
    tracked = ctx.tracked(t)
    if tracked is None:
        raise Barrier(f"its {what} carries no heads while another input does")
    if rank == 4:
        p = tracked.parts
        if len(p) != 2 or p[0].axis != 1 or p[1].axis != 3 or any(q.inner != 1 or q.above != 1 for q in p):
            raise Barrier(f"its {what}'s heads are not alone on axis 1 with the head width alone on axis 3")
        return _Heads(p[0].dim, p[1].dim)
    if tracked.layout is not None or tracked.axis != 2 or heads is None or heads <= 0 or tracked.size % heads:
        raise Barrier(f"its 3-D {what} does not carry its channels on the last axis in {heads} whole heads")
    return _Heads(heads, tracked.size // heads)


def _check_extras(node: gs.Node, ctx: AnalysisContext, q_heads: int, rank: int) -> None:
    """The optional inputs and outputs: a barrier where they stop heads from going."""
    if _present(node, 4) is not None or _present(node, 5) is not None:
        raise Barrier("it reads a past key/value cache (not followed)")
    for index, what in ((1, "present key"), (2, "present value"), (3, "qk_matmul_output")):
        if index < len(node.outputs) and ctx.used(node.outputs[index]):
            raise Barrier(f"its {what} output is read (not followed)")
    mask = _present(node, 3)
    if mask is None:
        return
    if ctx.tracked(mask) is not None:
        raise Barrier("its attention mask carries channels")
    shape = ctx.shape(mask)
    if shape is None:
        raise Barrier("its attention mask's shape is unknown")
    if len(shape) < 3 or shape[-3] == 1:
        return
    if shape[-3] != q_heads or ctx.const(mask) is None:
        raise Barrier(f"its attention mask varies along the heads (size {shape[-3]} there) and is not a constant "
                      "with one slice per query head")


def _tie_heads(ctx: AnalysisContext, t: gs.Tensor, y: gs.Tensor, op: _Heads, out: _Heads, group: int) -> None:
    """Tie every channel of operand head k to channel (h, 0) of each output head h it serves (k = h // group)."""
    h = np.arange(out.heads)
    src = (h // group)[:, None] * op.width + np.arange(op.width)[None, :]
    dst = np.broadcast_to((h * out.width)[:, None], src.shape)
    ctx.tie(t, y, src.reshape(-1), dst.reshape(-1))


def analyze_attention(node: gs.Node, ctx: AnalysisContext) -> None:
    """Declare the output's heads, tie each head of Q, K and V to them, and find the zero output channels."""
    q, k, v, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
    rank = ctx.rank(q)
    if rank not in (3, 4):
        raise Barrier("its query's rank is unknown or not 3 or 4")
    attrs = node.attrs
    q_heads_attr = int(attrs["q_num_heads"]) if "q_num_heads" in attrs else None
    kv_heads_attr = int(attrs["kv_num_heads"]) if "kv_num_heads" in attrs else None
    hq = _operand_heads(ctx, q, rank, q_heads_attr, "query")
    hk = _operand_heads(ctx, k, rank, kv_heads_attr, "key")
    hv = _operand_heads(ctx, v, rank, kv_heads_attr, "value")
    if hk.heads != hv.heads or hq.width != hk.width or hk.heads == 0 or hq.heads % hk.heads:
        raise Barrier("its query, key and value heads do not line up")
    _check_extras(node, ctx, hq.heads, rank)
    group = hq.heads // hk.heads
    out = _Heads(hq.heads, hv.width)
    h, w = np.meshgrid(np.arange(out.heads), np.arange(out.width), indexing="ij")
    from_v = ((h // group) * hv.width + w).reshape(-1)  # the V channel each output channel reads
    values = np.where(ctx.value(v)[from_v] == 0, 0.0, np.nan)
    if rank == 4:
        ctx.track_parts(y, (Part(1, out.heads), Part(3, out.width)), node, values)
    else:
        ctx.track(y, 2, out.heads * out.width, node, values)
    ctx.tie(v, y, from_v, np.arange(from_v.size))
    heads_first = (h * out.width).reshape(-1)
    ctx.tie(y, y, np.arange(from_v.size), heads_first)  # an output head's channels are one unit
    _tie_heads(ctx, q, y, hq, out, 1)
    _tie_heads(ctx, k, y, hk, out, group)
    ctx.contracted.update(t.name for t in (q, k))


def _kept_heads(keep: np.ndarray, heads: int) -> np.ndarray:
    """Which heads keep any channel."""
    return keep.reshape(heads, -1).any(axis=1)


class AttentionRule(ChannelRule):
    """ai.onnx Attention (opset 23): see the module doc."""

    ops = ("Attention",)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if any(ctx.tracked(t) is not None for t in node.inputs[:3]) or (
            (mask := _present(node, 3)) is not None and ctx.tracked(mask) is not None
        ):
            analyze_attention(node, ctx)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        q, k, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if not rw.changed(y):
            return
        keep_y = rw.keep(y)
        if "q_num_heads" in node.attrs:  # 3-D form
            node.attrs["q_num_heads"] = int(_kept_heads(rw.keep(q), int(node.attrs["q_num_heads"])).sum())
            node.attrs["kv_num_heads"] = int(_kept_heads(rw.keep(k), int(node.attrs["kv_num_heads"])).sum())
        mask = _present(node, 3)
        value = rw.const(mask) if mask is not None else None
        if value is None or value.ndim < 3 or value.shape[-3] == 1:
            return
        q_heads = _kept_heads(keep_y, value.shape[-3])
        rw.set_const(node, 3, np.compress(q_heads, value, axis=value.ndim - 3))


ATTENTION_RULES: list[ChannelRule] = [AttentionRule()]
