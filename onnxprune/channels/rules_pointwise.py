"""Rules for ops that act on each channel separately.

Activations, elementwise arithmetic with broadcasting, per-channel
normalisation, pooling, reductions over non-channel axes and Resize: the
output's channel k depends only on the inputs' channel k (and on constants
that are deleted along with it), so input and output slots are tied 1:1.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.rule_base import ChannelRule, RewriteContext, ints_attr_or_input, normalize_axis
from onnxprune.channels.values import (
    UNARY_OPS,
    channel_constant,
    combine_same,
    divide,
    multiply,
    unary_function,
)
from onnxprune.graphutil import opset_version, optional_input


def _to_bfloat16(v: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest, ties to even) and back, as a runtime's Cast does."""
    bits = np.nan_to_num(v).astype(np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000).astype(np.uint32)
    return np.where(np.isnan(v), np.nan, rounded.view(np.float32).astype(np.float64))


def _extra_outputs_used(node: gs.Node, ctx: AnalysisContext) -> bool:
    return any(ctx.used(t) for t in node.outputs[1:])


class UnaryRule(ChannelRule):
    """Elementwise unary ops: y[k] = f(x[k])."""

    ops = UNARY_OPS + ("Clip", "Cast", "PRelu")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        if tx is None:
            return
        if _extra_outputs_used(node, ctx):
            ctx.barrier(node, "its extra outputs (e.g. a dropout mask) are used")
            return
        if node.op == "Dropout":
            training = optional_input(node, 2)
            flag = ctx.const(training) if training is not None else np.asarray(False)
            if flag is None or bool(np.asarray(flag).reshape(-1)[0]):
                ctx.barrier(node, "dropout may be in training mode")
                return
        fn = self._function(node, ctx)
        if fn is None:
            return
        v = ctx.value(x)
        with np.errstate(all="ignore"):
            out = np.asarray(fn(v), dtype=np.float64)
        out = np.where(np.isfinite(out), out, np.nan)
        ctx.track(y, tx.axis, tx.size, node, out)
        ctx.tie(x, y)

    def _function(self, node: gs.Node, ctx: AnalysisContext):
        op = node.op
        if op == "Clip":
            if opset_version(ctx.graph) < 11:
                lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
            else:
                bounds = []
                for i, default in ((1, -np.inf), (2, np.inf)):
                    t = optional_input(node, i)
                    if t is None:
                        bounds.append(default)
                        continue
                    c = ctx.const(t)
                    if c is None:
                        ctx.barrier(node, "its bounds are not constant")
                        return None
                    bounds.append(float(np.asarray(c).reshape(-1)[0]))
                lo, hi = bounds
            return lambda v: np.where(np.isnan(v), np.nan, np.clip(v, lo, hi))
        if op == "Cast":
            to = int(node.attrs.get("to", 1))
            if to == 11:  # double
                return lambda v: v
            if to in (1, 10):  # float, float16: the value as that type holds it
                dtype = np.float32 if to == 1 else np.float16
                return lambda v: v.astype(dtype).astype(np.float64)
            if to == 16:  # bfloat16
                return _to_bfloat16
            if to == 9:  # bool
                return lambda v: np.where(np.isnan(v), np.nan, (v != 0).astype(np.float64))
            return np.trunc
        if op == "PRelu":
            return self._prelu(node, ctx)
        return unary_function(op, dict(node.attrs))

    def _prelu(self, node: gs.Node, ctx: AnalysisContext):
        x, slope_t = node.inputs[0], node.inputs[1]
        slope = ctx.const(slope_t)
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if slope is None or rank is None:
            ctx.barrier(node, "its slope is not constant")
            return None
        local = tx.axis - (rank - slope.ndim)
        if local >= 0 and slope.shape[local] not in (1, tx.size):
            ctx.barrier(node, "its slope does not broadcast along channels")
            return None
        s = channel_constant(slope, local if local >= 0 else None, tx.size)
        return lambda v: np.where(v >= 0, v, s * v)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        if node.op != "PRelu" or not rw.changed(node.outputs[0]):
            return
        _take_per_channel_constants(node, rw, node.outputs[0], inputs=(1,))


def _take_per_channel_constants(node: gs.Node, rw: RewriteContext, out: gs.Tensor, inputs) -> None:
    """Delete dropped channels from constant inputs that carry one entry per channel."""
    keep = rw.keep(out)
    axis = rw.axis(out)
    rank = len(out.shape) if out.shape is not None else None
    for i in inputs:
        t = optional_input(node, i)
        if t is None:
            continue
        c = rw.const(t)
        if c is None or rank is None:
            continue
        local = axis - (rank - c.ndim)
        if local >= 0 and c.shape[local] == keep.size and keep.size > 1:
            rw.set_const(node, i, np.compress(keep, c, axis=local))


_BINARY = {
    "Add": lambda vs: _fold(vs, np.add),
    "Sum": lambda vs: _fold(vs, np.add),
    "Sub": lambda vs: vs[0] - vs[1],
    "Mul": lambda vs: _fold(vs, multiply),
    "Div": lambda vs: divide(vs[0], vs[1]),
    "Max": lambda vs: _fold(vs, np.maximum),
    "Min": lambda vs: _fold(vs, np.minimum),
    "Mean": lambda vs: _fold(vs, np.add) / len(vs),
}


def _fold(values, fn):
    out = values[0]
    for v in values[1:]:
        out = fn(out, v)
    return out


class ElementwiseRule(ChannelRule):
    """Broadcasting elementwise ops: every operand carrying channels is tied to the output."""

    ops = tuple(_BINARY)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        y = node.outputs[0]
        out_rank = ctx.rank(y)
        tracked = [(t, ctx.tracked(t)) for t in node.inputs if ctx.tracked(t) is not None]
        if not tracked:
            tracked = self._track_from_constant(node, ctx, out_rank)
            if not tracked:
                return
        if out_rank is None or any(ctx.rank(t) is None for t in node.inputs):
            ctx.barrier(node, "operand ranks are unknown")
            return
        aligned = {ta.axis + out_rank - ctx.rank(t) for t, ta in tracked}
        sizes = {ta.size for _, ta in tracked}
        if len(aligned) != 1 or len(sizes) != 1:
            ctx.barrier(node, "operands carry channels on different axes or in different numbers")
            return
        axis, channels = aligned.pop(), sizes.pop()
        values = []
        ties = []
        for t in node.inputs:
            local = axis - (out_rank - ctx.rank(t))
            c = ctx.const(t)
            if ctx.tracked(t) is not None:
                values.append(ctx.value(t))
                ties.append(t)
            elif c is not None:
                if local >= 0 and c.shape[local] not in (1, channels):
                    ctx.barrier(node, "a constant operand does not broadcast along channels")
                    return
                values.append(channel_constant(c, local if local >= 0 else None, channels))
            else:
                d = ctx.dim(t, local) if local >= 0 else 1
                if d == 1:
                    values.append(np.full(channels, np.nan))
                elif d == channels and ctx.demand(t, local, channels, node):
                    values.append(ctx.value(t))
                    ties.append(t)
                else:
                    ctx.barrier(node, "an operand's channel dimension is unknown")
                    return
        with np.errstate(all="ignore"):
            out = np.asarray(_BINARY[node.op](values), dtype=np.float64)
        out = np.where(np.isfinite(out), out, np.nan)
        ctx.track(y, axis, channels, node, out)
        for t in ties:
            ctx.tie(t, y)

    @staticmethod
    def _track_from_constant(node: gs.Node, ctx: AnalysisContext, out_rank: int | None):
        """No operand carries channels yet (e.g. a graph input times a per-feature gate): if a constant
        operand varies along exactly one axis, track the activation operand on that axis (pinned:
        its producer cannot drop channels), so the constant's zeros become known zero channels."""
        consts = [c for t in node.inputs if (c := ctx.const(t)) is not None]
        acts = [t for t in node.inputs if ctx.const(t) is None]
        if out_rank is None or len(acts) != 1 or not consts or ctx.rank(acts[0]) is None:
            return []
        axes = {
            out_rank - c.ndim + i for c in consts for i, d in enumerate(c.shape) if d > 1
        }
        act = acts[0]
        if len(axes) != 1:
            return []
        local = axes.pop() - (out_rank - ctx.rank(act))
        if local < 0 or not ctx.demand(act, local, None, node):
            return []
        return [(act, ctx.tracked(act))]

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if rw.changed(y):
            _take_per_channel_constants(node, rw, y, inputs=range(len(node.inputs)))


def _require_axis(node: gs.Node, ctx: AnalysisContext, x: gs.Tensor, axis: int, what: str) -> bool:
    tx = ctx.tracked(x)
    if tx is not None and tx.axis != axis:
        ctx.barrier(node, f"{what} is not on axis {axis}")
        return False
    return True


class BatchNormRule(ChannelRule):
    """BatchNormalization in inference mode: per-channel affine map."""

    ops = ("BatchNormalization",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        params = [ctx.const(t) for t in node.inputs[1:5]]
        if ctx.tracked(x) is None:
            return
        if any(p is None for p in params) or int(node.attrs.get("training_mode", 0)) or _extra_outputs_used(node, ctx):
            ctx.barrier(node, "not in inference mode with constant parameters")
            return
        scale, bias, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
        if not _require_axis(node, ctx, x, 1, "the input's channel axis"):
            return
        if not ctx.demand(x, 1, scale.size, node):
            ctx.barrier(node, "input channels do not match its parameters")
            return
        eps = float(node.attrs.get("epsilon", 1e-5))
        v = ctx.value(x)
        a = scale / np.sqrt(var + eps)
        out = np.where(scale == 0, bias, a * (v - mean) + bias)
        ctx.track(y, 1, scale.size, node, out)
        ctx.tie(x, y)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if rw.changed(y):
            keep = rw.keep(y)
            for i in range(1, 5):
                rw.set_const(node, i, np.compress(keep, rw.const(node.inputs[i]), axis=0))


class InstanceNormRule(ChannelRule):
    """InstanceNormalization: per-channel statistics, per-channel scale and bias."""

    ops = ("InstanceNormalization",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        scale, bias = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
        if ctx.tracked(x) is None:
            return
        if scale is None or bias is None:
            ctx.barrier(node, "its scale or bias is not constant")
            return
        if not _require_axis(node, ctx, x, 1, "the input's channel axis") or not ctx.demand(x, 1, scale.size, node):
            ctx.barrier(node, "input channels do not match its parameters")
            return
        scale = scale.astype(np.float64).reshape(-1)
        bias = bias.astype(np.float64).reshape(-1)
        v = ctx.value(x)
        # A constant channel normalises to 0, so the output is the bias.
        out = np.where((scale == 0) | np.isfinite(v), bias, np.nan)
        ctx.track(y, 1, scale.size, node, out)
        ctx.tie(x, y)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if rw.changed(y):
            keep = rw.keep(y)
            for i in (1, 2):
                rw.set_const(node, i, np.compress(keep, rw.const(node.inputs[i]), axis=0))


class AxisLocalRule(ChannelRule):
    """Ops that mix values along one axis only (LayerNormalization from an axis on, Softmax)."""

    ops = ("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        if rank is None:
            ctx.barrier(node, "input rank unknown")
            return
        axis = normalize_axis(int(node.attrs.get("axis", -1)), rank)
        if node.op == "LayerNormalization" or opset_version(ctx.graph) < 13:
            mixed = set(range(axis, rank))  # normalised or coerced to 2-D from `axis` on
        else:
            mixed = {axis}
        if tx.axis in mixed:
            ctx.barrier(node, f"it normalises across the channel axis {tx.axis}")
            return
        if _extra_outputs_used(node, ctx):
            ctx.barrier(node, "its statistics outputs are used")
            return
        ctx.track(y, tx.axis, tx.size, node)
        ctx.tie(x, y)


class PoolRule(ChannelRule):
    """Spatial pooling: channel k of the output pools channel k of the input."""

    ops = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        if tx is None:
            return
        if tx.axis != 1:
            ctx.barrier(node, "channels are not on axis 1")
            return
        if _extra_outputs_used(node, ctx):
            ctx.barrier(node, "its indices output depends on the channel count")
            return
        v = ctx.value(x)
        padded = any(int(p) for p in node.attrs.get("pads", [])) or str(node.attrs.get("auto_pad", "NOTSET")) not in (
            "NOTSET",
            "VALID",
        )
        if node.op in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool"):
            out = v
        elif node.op == "AveragePool" and (not padded or not int(node.attrs.get("count_include_pad", 0))):
            out = v
        else:
            out = np.where(v == 0, 0.0, np.nan)
        ctx.track(y, 1, tx.size, node, out)
        ctx.tie(x, y)


class ReduceRule(ChannelRule):
    """Reductions over axes other than the channel axis."""

    ops = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceSumSquare")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        rank = ctx.rank(x)
        if tx is None:
            return
        axes, ok = ints_attr_or_input(node, ctx.const, "axes", 1)
        if not ok or rank is None:
            ctx.barrier(node, "its axes are not constant")
            return
        if not axes:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                axes = []
            else:
                ctx.barrier(node, "it reduces over all axes, channels included")
                return
        axes = {normalize_axis(a, rank) for a in axes}
        if tx.axis in axes:
            ctx.barrier(node, "it reduces over the channel axis")
            return
        keepdims = int(node.attrs.get("keepdims", 1))
        out_axis = tx.axis if keepdims else tx.axis - sum(1 for a in axes if a < tx.axis)
        v = ctx.value(x)
        out = v if node.op in ("ReduceMean", "ReduceMax", "ReduceMin") else np.where(v == 0, 0.0, np.nan)
        ctx.track(y, out_axis, tx.size, node, out)
        ctx.tie(x, y)


class ResizeRule(ChannelRule):
    """Resize/Upsample with scale 1 on the channel axis."""

    ops = ("Resize", "Upsample")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tx = ctx.tracked(x)
        if tx is None:
            return
        if node.attrs.get("axes") is not None:
            ctx.barrier(node, "Resize with explicit axes is not covered")
            return
        scales_t = node.inputs[1] if node.op == "Upsample" or opset_version(ctx.graph) < 11 else optional_input(node, 2)
        sizes_t = optional_input(node, 3) if node.op == "Resize" else None
        scales = ctx.const(scales_t) if scales_t is not None else None
        sizes = ctx.const(sizes_t) if sizes_t is not None else None
        if "scales" in node.attrs:
            scales = np.asarray(node.attrs["scales"])
        if scales is not None and scales.size:
            if float(scales.reshape(-1)[tx.axis]) != 1.0:
                ctx.barrier(node, "it rescales the channel axis")
                return
        elif sizes is not None and sizes.size:
            if int(sizes.reshape(-1)[tx.axis]) != tx.size:
                ctx.barrier(node, "it resizes the channel axis")
                return
        else:
            ctx.barrier(node, "its scales and sizes are not constant")
            return
        v = ctx.value(x)
        crop = str(node.attrs.get("coordinate_transformation_mode", "half_pixel")) == "tf_crop_and_resize"
        out = np.where(v == 0, 0.0, np.nan) if crop else v
        if crop and float(node.attrs.get("extrapolation_value", 0.0)) != 0.0:
            out = np.full_like(v, np.nan)
        ctx.track(y, tx.axis, tx.size, node, out)
        ctx.tie(x, y)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        sizes_t = optional_input(node, 3) if node.op == "Resize" else None
        if not rw.changed(y) or sizes_t is None:
            return
        sizes = rw.const(sizes_t)
        if sizes is not None and sizes.size:
            new = sizes.copy()
            new[rw.axis(y)] = int(rw.keep(y).sum())
            rw.set_const(node, 3, new)


POINTWISE_RULES: list[ChannelRule] = [
    UnaryRule(),
    ElementwiseRule(),
    BatchNormRule(),
    InstanceNormRule(),
    AxisLocalRule(),
    PoolRule(),
    ReduceRule(),
    ResizeRule(),
]
