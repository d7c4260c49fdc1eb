"""Rules for ops that act on each channel separately.

Activations, elementwise arithmetic with broadcasting, per-channel
normalisation, pooling, reductions over non-channel axes and Resize: the
output's channel k depends only on the inputs' channel k (and on constants
that are deleted along with it), so input and output slots are tied 1:1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxprune.channels.context import AnalysisContext
from onnxprune.channels.passthrough import PassThroughRule, axis_after_removing, constant_axes, reject_used_extra_outputs
from onnxprune.channels.rule_base import Barrier, ChannelRule, RewriteContext, known_rank, normalize_axis
from onnxprune.channels.rules_heads import declare_elementwise
from onnxprune.channels.slots import TrackedAxis
from onnxprune.channels.values import UNARY_OPS, channel_constant, divide, multiply, unary_function
from onnxprune.graphutil import opset_version, optional_input

ValueFunction = Callable[[np.ndarray], np.ndarray]


def _finite_or_unknown(values: np.ndarray) -> np.ndarray:
    """float64 values with every infinity or NaN read as unknown (NaN)."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def _zero_stays_zero(values: np.ndarray) -> np.ndarray:
    """Values of an op that maps a zero channel to zero and any other to something unknown."""
    return np.where(values == 0, 0.0, np.nan)


def _to_bfloat16(v: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (nearest, ties to even) and back, as a runtime's Cast does."""
    bits = np.nan_to_num(v).astype(np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000).astype(np.uint32)
    return np.where(np.isnan(v), np.nan, rounded.view(np.float32).astype(np.float64))


def _as_type(dtype: type) -> ValueFunction:
    """The value as a float type of that width holds it."""
    return lambda v: v.astype(dtype).astype(np.float64)


# What Cast does to a channel's constant value, by target type; other (integer) types truncate.
_CAST_VALUES: dict[int, ValueFunction] = {
    TensorProto.DOUBLE: lambda v: v,
    TensorProto.FLOAT: _as_type(np.float32),
    TensorProto.FLOAT16: _as_type(np.float16),
    TensorProto.BFLOAT16: _to_bfloat16,
    TensorProto.BOOL: lambda v: np.where(np.isnan(v), np.nan, (v != 0).astype(np.float64)),
}


class UnaryRule(PassThroughRule):
    """Elementwise unary ops: y[k] = f(x[k])."""

    ops = tuple(op for op in UNARY_OPS if op != "Dropout")
    handles_layouts = True

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        reject_used_extra_outputs(node, ctx, "its extra outputs (e.g. a dropout mask) are used")
        function = self.function(node, ctx)
        with np.errstate(all="ignore"):
            return _finite_or_unknown(function(input_values))

    def function(self, node: gs.Node, ctx: AnalysisContext) -> ValueFunction:
        """The op on per-channel values (numpy, float64)."""
        return unary_function(node.op, dict(node.attrs))


class DropoutRule(UnaryRule):
    """Dropout in inference mode is the identity."""

    ops = ("Dropout",)

    def function(self, node: gs.Node, ctx: AnalysisContext) -> ValueFunction:
        training = optional_input(node, 2)
        flag = ctx.const(training) if training is not None else np.asarray(False)
        if flag is None or bool(np.asarray(flag).reshape(-1)[0]):
            raise Barrier("dropout may be in training mode")
        return super().function(node, ctx)


class ClipRule(UnaryRule):
    """Clip between constant bounds (attributes before opset 11, inputs after)."""

    ops = ("Clip",)

    def function(self, node: gs.Node, ctx: AnalysisContext) -> ValueFunction:
        if opset_version(ctx.graph) < 11:
            low, high = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
        else:
            low, high = (self._bound(node, ctx, index, default) for index, default in ((1, -np.inf), (2, np.inf)))
        return lambda v: np.where(np.isnan(v), np.nan, np.clip(v, low, high))

    @staticmethod
    def _bound(node: gs.Node, ctx: AnalysisContext, index: int, default: float) -> float:
        """Clip bound at input ``index`` (``default`` when omitted); a :class:`Barrier` if not constant."""
        bound = optional_input(node, index)
        if bound is None:
            return default
        value = ctx.const(bound)
        if value is None:
            raise Barrier("its bounds are not constant")
        return float(np.asarray(value).reshape(-1)[0])


class CastRule(UnaryRule):
    """Cast: a channel's constant becomes the value the target type holds."""

    ops = ("Cast",)

    def function(self, node: gs.Node, ctx: AnalysisContext) -> ValueFunction:
        return _CAST_VALUES.get(int(node.attrs.get("to", TensorProto.FLOAT)), np.trunc)


class PowRule(UnaryRule):
    """Pow by a constant scalar exponent (GELU's tanh approximation cubes its input)."""

    ops = ("Pow",)

    def function(self, node: gs.Node, ctx: AnalysisContext) -> ValueFunction:
        exponent = ctx.const(node.inputs[1])
        if exponent is None or np.asarray(exponent).size != 1:
            raise Barrier("its exponent is not a constant scalar")
        e = float(np.asarray(exponent).reshape(-1)[0])
        return lambda v: np.power(v, e)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if ctx.tracked(node.inputs[1]) is not None:
            raise Barrier("its exponent carries channels")
        super().analyze(node, ctx)


class PReluRule(UnaryRule):
    """PRelu with a constant slope that broadcasts along the channels."""

    handles_layouts = False

    ops = ("PRelu",)

    def function(self, node: gs.Node, ctx: AnalysisContext) -> ValueFunction:
        x = node.inputs[0]
        slope = ctx.const(node.inputs[1])
        tracked_input = ctx.tracked(x)
        rank = ctx.rank(x)
        if slope is None or rank is None:
            raise Barrier("its slope is not constant")
        local = tracked_input.axis - (rank - slope.ndim)
        if local >= 0 and slope.shape[local] not in (1, tracked_input.size):
            raise Barrier("its slope does not broadcast along channels")
        per_channel = channel_constant(slope, local if local >= 0 else None, tracked_input.size)
        return lambda v: np.where(v >= 0, v, per_channel * v)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        if rw.changed(node.outputs[0]):
            _take_per_channel_constants(node, rw, node.outputs[0], inputs=(1,))


def _take_per_channel_constants(node: gs.Node, rw: RewriteContext, out: gs.Tensor, inputs: Iterable[int]) -> None:
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


def _fold(values: list[np.ndarray], fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` applied left to right over all operands."""
    out = values[0]
    for v in values[1:]:
        out = fn(out, v)
    return out


# Per-channel values of each variadic/binary op from its operands' values.
_BINARY: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "Add": lambda vs: _fold(vs, np.add),
    "Sum": lambda vs: _fold(vs, np.add),
    "Sub": lambda vs: vs[0] - vs[1],
    "Mul": lambda vs: _fold(vs, multiply),
    "Div": lambda vs: divide(vs[0], vs[1]),
    "Max": lambda vs: _fold(vs, np.maximum),
    "Min": lambda vs: _fold(vs, np.minimum),
    "Mean": lambda vs: _fold(vs, np.add) / len(vs),
}


class ElementwiseRule(ChannelRule):
    """Broadcasting elementwise ops: every operand carrying channels is tied to the output."""

    ops = tuple(_BINARY)
    handles_layouts = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        y = node.outputs[0]
        out_rank = ctx.rank(y)
        tracked = [(t, ctx.tracked(t)) for t in node.inputs if ctx.tracked(t) is not None]
        if any(ta.layout is not None for _, ta in tracked):
            declare_elementwise(node, ctx, list(node.inputs), _BINARY[node.op])
            return
        if not tracked:
            tracked = self._track_from_constant(node, ctx, out_rank)
            if not tracked:
                return
        if out_rank is None or any(ctx.rank(t) is None for t in node.inputs):
            raise Barrier("operand ranks are unknown")
        aligned = {ta.axis + out_rank - ctx.rank(t) for t, ta in tracked}
        sizes = {ta.size for _, ta in tracked}
        if len(aligned) != 1 or len(sizes) != 1:
            raise Barrier("operands carry channels on different axes or in different numbers")
        axis, channels = aligned.pop(), sizes.pop()
        values, ties = self._operands(node, ctx, axis, channels, out_rank)
        with np.errstate(all="ignore"):
            out = _finite_or_unknown(_BINARY[node.op](values))
        ctx.track(y, axis, channels, node, out)
        for t in ties:
            ctx.tie(t, y)

    @staticmethod
    def _operands(
        node: gs.Node, ctx: AnalysisContext, axis: int, channels: int, out_rank: int
    ) -> tuple[list[np.ndarray], list[gs.Tensor]]:
        """Each operand's per-channel values, and the operands whose channels tie to the output."""
        values, ties = [], []
        for t in node.inputs:
            local = axis - (out_rank - ctx.rank(t))
            c = ctx.const(t)
            if ctx.tracked(t) is not None:
                values.append(ctx.value(t))
                ties.append(t)
            elif c is not None:
                if local >= 0 and c.shape[local] not in (1, channels):
                    raise Barrier("a constant operand does not broadcast along channels")
                values.append(channel_constant(c, local if local >= 0 else None, channels))
            else:
                dim = ctx.dim(t, local) if local >= 0 else 1
                if dim == 1:
                    values.append(np.full(channels, np.nan))
                elif dim == channels and ctx.demand(t, local, channels, node):
                    values.append(ctx.value(t))
                    ties.append(t)
                else:
                    raise Barrier("an operand's channel dimension is unknown")
        return values, ties

    @staticmethod
    def _track_from_constant(
        node: gs.Node, ctx: AnalysisContext, out_rank: int | None
    ) -> list[tuple[gs.Tensor, TrackedAxis]]:
        """No operand carries channels yet (e.g. a graph input times a per-feature gate): if a constant
        operand varies along exactly one axis, track the activation operand on that axis (pinned:
        its producer cannot drop channels), so the constant's zeros become known zero channels."""
        consts = [c for t in node.inputs if (c := ctx.const(t)) is not None]
        acts = [t for t in node.inputs if ctx.const(t) is None]
        if out_rank is None or len(acts) != 1 or not consts or ctx.rank(acts[0]) is None:
            return []
        axes = {out_rank - c.ndim + i for c in consts for i, d in enumerate(c.shape) if d > 1}
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


class ChannelParamsRule(PassThroughRule):
    """Normalisations with one constant parameter per channel (axis 1) in inputs ``param_inputs``.

    Subclasses compute the output values in ``output_values`` from :meth:`params`;
    the rewrite deletes the dropped channels' entries from every parameter.
    """

    param_inputs: ClassVar[tuple[int, ...]] = ()
    not_constant: ClassVar[str] = "its parameters are not constant"
    off_axis: ClassVar[str] = "the input's channel axis is not on axis 1"

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        return 1

    def params(self, node: gs.Node, ctx: AnalysisContext) -> list[np.ndarray]:
        """The parameters as flat float64 arrays, once they are known to fit the input's channels."""
        values = [ctx.const(node.inputs[i]) for i in self.param_inputs]
        if any(v is None for v in values):
            raise Barrier(self.not_constant)
        params = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
        if ctx.tracked(node.inputs[0]).axis != 1:
            raise Barrier(self.off_axis)
        if not ctx.demand(node.inputs[0], 1, params[0].size, node):
            raise Barrier("input channels do not match its parameters")
        return params

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        if rw.changed(y):
            keep = rw.keep(y)
            for i in self.param_inputs:
                rw.set_const(node, i, np.compress(keep, rw.const(node.inputs[i]), axis=0))


class BatchNormRule(ChannelParamsRule):
    """BatchNormalization in inference mode: per-channel affine map."""

    ops = ("BatchNormalization",)
    param_inputs = (1, 2, 3, 4)
    not_constant = "not in inference mode with constant parameters"

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        if int(node.attrs.get("training_mode", 0)):
            raise Barrier(self.not_constant)
        reject_used_extra_outputs(node, ctx, self.not_constant)
        scale, bias, mean, var = self.params(node, ctx)
        a = scale / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
        return np.where(scale == 0, bias, a * (input_values - mean) + bias)


class InstanceNormRule(ChannelParamsRule):
    """InstanceNormalization: per-channel statistics, per-channel scale and bias."""

    ops = ("InstanceNormalization",)
    param_inputs = (1, 2)
    not_constant = "its scale or bias is not constant"
    off_axis = "input channels do not match its parameters"

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        scale, bias = self.params(node, ctx)
        # A constant channel normalises to 0, so the output is the bias.
        return np.where((scale == 0) | np.isfinite(input_values), bias, np.nan)


class AxisLocalRule(PassThroughRule):
    """Ops that mix values along one axis only (LayerNormalization from an axis on, Softmax)."""

    ops = ("LayerNormalization", "Softmax", "LogSoftmax", "Hardmax")
    handles_layouts = True

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        rank = known_rank(ctx, node.inputs[0])
        axis = normalize_axis(int(node.attrs.get("axis", -1)), rank)
        if node.op == "LayerNormalization" or opset_version(ctx.graph) < 13:
            mixed = set(range(axis, rank))  # normalised or coerced to 2-D from `axis` on
        else:
            mixed = {axis}
        if tracked_input.axis in mixed:
            raise Barrier(f"it normalises across the channel axis {tracked_input.axis}")
        reject_used_extra_outputs(node, ctx, "its statistics outputs are used")
        return tracked_input.axis

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> None:
        return None


class PoolRule(PassThroughRule):
    """Spatial pooling: channel k of the output pools channel k of the input."""

    ops = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        if tracked_input.axis != 1:
            raise Barrier("channels are not on axis 1")
        reject_used_extra_outputs(node, ctx, "its indices output depends on the channel count")
        return 1

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        if node.op in ("MaxPool", "GlobalAveragePool", "GlobalMaxPool"):
            return input_values
        if node.op == "AveragePool" and not (self._padded(node) and int(node.attrs.get("count_include_pad", 0))):
            return input_values
        return _zero_stays_zero(input_values)

    @staticmethod
    def _padded(node: gs.Node) -> bool:
        """True if the pooling window reaches past the border."""
        explicit = any(int(p) for p in node.attrs.get("pads", []))
        return explicit or str(node.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID")


class ReduceRule(PassThroughRule):
    """Reductions over axes other than the channel axis."""

    ops = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1", "ReduceSumSquare")

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        axes, rank = constant_axes(node, ctx)
        if not axes:
            if not int(node.attrs.get("noop_with_empty_axes", 0)):
                raise Barrier("it reduces over all axes, channels included")
            axes = []
        reduced = {normalize_axis(a, rank) for a in axes}
        if tracked_input.axis in reduced:
            raise Barrier("it reduces over the channel axis")
        if int(node.attrs.get("keepdims", 1)):
            return tracked_input.axis
        return axis_after_removing(tracked_input.axis, reduced)

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        if node.op in ("ReduceMean", "ReduceMax", "ReduceMin"):
            return input_values
        return _zero_stays_zero(input_values)


class ResizeRule(PassThroughRule):
    """Resize/Upsample with scale 1 on the channel axis."""

    ops = ("Resize", "Upsample")

    def output_axis(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> int:
        if node.attrs.get("axes") is not None:
            raise Barrier("Resize with explicit axes is not covered")
        scales_t = node.inputs[1] if node.op == "Upsample" or opset_version(ctx.graph) < 11 else optional_input(node, 2)
        sizes_t = self._sizes_input(node)
        scales = ctx.const(scales_t) if scales_t is not None else None
        sizes = ctx.const(sizes_t) if sizes_t is not None else None
        if "scales" in node.attrs:
            scales = np.asarray(node.attrs["scales"])
        channel = tracked_input.axis
        if scales is not None and scales.size:
            if float(scales.reshape(-1)[channel]) != 1.0:
                raise Barrier("it rescales the channel axis")
        elif sizes is not None and sizes.size:
            if int(sizes.reshape(-1)[channel]) != tracked_input.size:
                raise Barrier("it resizes the channel axis")
        else:
            raise Barrier("its scales and sizes are not constant")
        return channel

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        if str(node.attrs.get("coordinate_transformation_mode", "half_pixel")) != "tf_crop_and_resize":
            return input_values
        if float(node.attrs.get("extrapolation_value", 0.0)) != 0.0:
            return np.full_like(input_values, np.nan)
        return _zero_stays_zero(input_values)

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        sizes_t = self._sizes_input(node)
        if not rw.changed(y) or sizes_t is None:
            return
        sizes = rw.const(sizes_t)
        if sizes is not None and sizes.size:
            new = sizes.copy()
            new[rw.axis(y)] = int(rw.keep(y).sum())
            rw.set_const(node, 3, new)

    @staticmethod
    def _sizes_input(node: gs.Node) -> gs.Tensor | None:
        """Resize's ``sizes`` input (None for Upsample or when omitted)."""
        return optional_input(node, 3) if node.op == "Resize" else None


POINTWISE_RULES: list[ChannelRule] = [
    UnaryRule(),
    DropoutRule(),
    ClipRule(),
    CastRule(),
    PReluRule(), PowRule(),
    ElementwiseRule(),
    BatchNormRule(),
    InstanceNormRule(),
    AxisLocalRule(),
    PoolRule(),
    ReduceRule(),
    ResizeRule(),
]
