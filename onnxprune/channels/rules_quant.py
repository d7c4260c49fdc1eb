"""Rules for quantized models: QuantizeLinear/DequantizeLinear of activations, and com.microsoft.MatMulNBits.

In ONNX Runtime's QDQ format every activation a quantized layer reads goes through a QuantizeLinear ->
DequantizeLinear pair; its weights are ``DequantizeLinear`` of constants, which the linear rules read through
(:mod:`onnxprune.channels.stored`). A pair maps each channel to itself, so it passes channels through: a
per-tensor one unchanged, a per-axis one (scale and zero point per channel) losing the scales and zero
points of the deleted channels (ONNX Runtime's com.microsoft QuantizeLinear/DequantizeLinear alike). The value
of a quantized tensor's channel is the integer it holds: a zero channel quantizes to its zero point, which
dequantizes back to exactly 0. Any other constant is left unknown (exact rounding is the runtime's).

``MatMulNBits`` (ONNX Runtime's 4-bit weight format) stores B as ``[N, blocks, blob]`` codes with a scale
(and zero point) per row and block of ``block_size`` inputs, dequantized as ``(code - zero_point) * scale``.
An output channel is a row: it goes with its codes, scales, zero points and bias. Input channels go only
as whole blocks (the codes of the others share their blocks' scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.context import AnalysisContext, ReadKind
from onnxprune.channels.passthrough import PassThroughRule
from onnxprune.channels.rule_base import Barrier, ChannelRule, PlanView, RewriteContext, keep_or_all, known_rank, normalize_axis
from onnxprune.channels.slots import TrackedAxis
from onnxprune.channels.values import linear_values
from onnxprune.graphutil import optional_input


def _zero_per_channel(node: gs.Node, ctx: AnalysisContext, tracked: TrackedAxis) -> np.ndarray:
    """The zero point of each channel (NaN where it varies within the channel); a :class:`Barrier` for
    quantization parameters the rule cannot follow."""
    scale = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None
    zp_t = optional_input(node, 2)
    zero = ctx.const(zp_t) if zp_t is not None else np.zeros(1)
    if scale is None or zero is None:
        raise Barrier("its scale or zero point is not constant")
    if int(node.attrs.get("block_size", 0)):
        raise Barrier("blocked quantization of an activation is not covered")
    zero = np.asarray(zero, dtype=np.float64).reshape(-1)
    if scale.size == 1:
        return np.full(tracked.size, zero[0])
    if tracked.layout is not None:
        raise Barrier("per-axis quantization of attention heads is not covered")
    axis = normalize_axis(int(node.attrs.get("axis", 1)), known_rank(ctx, node.inputs[0]))
    if axis != tracked.axis:
        return np.full(tracked.size, zero[0] if np.all(zero == zero[0]) else np.nan)
    if scale.size != tracked.size:
        raise Barrier("its scales do not match the channels")
    return zero if zero.size == tracked.size else np.full(tracked.size, zero[0])


class QuantizeRule(PassThroughRule):
    """QuantizeLinear / DequantizeLinear of an activation: the channels pass through (weights are read
    through their DequantizeLinear by the layer, see :mod:`onnxprune.channels.stored`)."""

    ops = ("QuantizeLinear", "DequantizeLinear")
    domains: ClassVar[tuple[str, ...]] = ("", "com.microsoft")  # ONNX Runtime's own, for 16-bit and 4-bit types in older opsets
    handles_layouts = True

    def output_values(self, node: gs.Node, ctx: AnalysisContext, input_values: np.ndarray) -> np.ndarray:
        zero = _zero_per_channel(node, ctx, ctx.tracked(node.inputs[0]))
        if node.op == "QuantizeLinear":  # round(0 / scale) + zero_point: a zero channel holds its zero point
            return np.where(input_values == 0, zero, np.nan)
        return np.where(input_values == zero, 0.0, np.nan)  # (zero_point - zero_point) * scale

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        y = node.outputs[0]
        scale = rw.const(node.inputs[1])
        if not rw.changed(y) or scale is None or scale.size == 1 or scale.size != rw.keep(y).size:
            return
        x_shape = node.inputs[0].shape
        if x_shape is None or normalize_axis(int(node.attrs.get("axis", 1)), len(x_shape)) != rw.axis(y):
            return
        keep = rw.keep(y)
        rw.set_const(node, 1, np.compress(keep, scale, axis=0))
        if optional_input(node, 2) is not None:
            rw.set_const(node, 2, np.compress(keep, rw.const(node.inputs[2]), axis=0))


@dataclass(frozen=True)
class NBitsWeight:
    """The constant inputs and attributes of one MatMulNBits node."""

    k: int
    n: int
    bits: int
    block_size: int
    codes_packed: np.ndarray  # uint8 [N, blocks, blob]
    scales: np.ndarray  # [N * blocks] or [N, blocks]
    zero_points: np.ndarray | None  # uint8 packed per row, or unpacked in the scales' type; None: 2^(bits-1)
    bias: np.ndarray | None

    @property
    def blocks(self) -> int:
        """Blocks per row (the last one padded when K is not a multiple of the block size)."""
        return -(-self.k // self.block_size)

    @classmethod
    def of(cls, node: gs.Node, const) -> NBitsWeight:
        """Read ``node`` (``const`` gives a tensor's constant value); a :class:`Barrier` if it is not covered."""
        k, n, bits, block = (int(node.attrs.get(a, 0)) for a in ("K", "N", "bits", "block_size"))
        bits = bits or 4
        if bits not in (2, 4, 8) or block < 1 or optional_input(node, 4) is not None:
            raise Barrier("only 2-, 4- and 8-bit MatMulNBits without g_idx (act-order) is covered")
        inputs = (node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None, optional_input(node, 3), optional_input(node, 5))
        values = [None if t is None else const(t) for t in inputs]
        if any(t is not None and v is None for t, v in zip(inputs, values)) or values[0] is None or values[1] is None:
            raise Barrier("its weight, scales, zero points or bias are not constant")
        weight = cls(k, n, bits, block, *values)
        if weight.codes_packed.shape != (n, weight.blocks, block * bits // 8) or weight.scales.size != n * weight.blocks:
            raise Barrier("its weight does not match its K, N, bits and block_size")
        return weight

    @property
    def _per_byte(self) -> int:
        return 8 // self.bits

    def _unpack(self, packed: np.ndarray, rows: int) -> np.ndarray:
        """Codes packed low bits first, one row per output channel."""
        shifts = (np.arange(self._per_byte) * self.bits).astype(np.uint8)
        codes = (packed.reshape(rows, -1)[:, :, None] >> shifts) & np.uint8((1 << self.bits) - 1)
        return codes.reshape(rows, -1)

    def _pack(self, codes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`_unpack` (rows padded with zero codes to whole bytes)."""
        rows, count = codes.shape
        padded = np.zeros((rows, -(-count // self._per_byte) * self._per_byte), dtype=np.uint8)
        padded[:, :count] = codes
        shifts = (np.arange(self._per_byte) * self.bits).astype(np.uint8)
        return np.bitwise_or.reduce(padded.reshape(rows, -1, self._per_byte) << shifts, axis=2).astype(np.uint8)

    def zeros(self) -> np.ndarray:
        """Zero point of every row and block, [N, blocks]."""
        if self.zero_points is None:
            return np.full((self.n, self.blocks), float(1 << (self.bits - 1)))
        if self.zero_points.dtype == np.uint8:
            return self._unpack(self.zero_points, self.n)[:, : self.blocks].astype(np.float64)
        return self.zero_points.reshape(self.n, self.blocks).astype(np.float64)

    def dequantized(self) -> np.ndarray:
        """The weight as float32, [N, K] (row = output channel)."""
        codes = self._unpack(self.codes_packed, self.n).reshape(self.n, self.blocks, self.block_size).astype(np.float32)
        scales = self.scales.reshape(self.n, self.blocks, 1).astype(np.float32)
        w = (codes - self.zeros().astype(np.float32)[:, :, None]) * scales
        return w.reshape(self.n, -1)[:, : self.k]

    def pruned(self, kout: np.ndarray, blocks: np.ndarray) -> dict[int, np.ndarray]:
        """New constant inputs (by index) for output rows ``kout`` and input blocks ``blocks`` (masks)."""
        out = {1: self.codes_packed[kout][:, blocks]}
        out[2] = self.scales.reshape(self.n, self.blocks)[kout][:, blocks].reshape(-1 if self.scales.ndim == 1 else (int(kout.sum()), -1))
        if self.zero_points is not None:
            if self.zero_points.dtype == np.uint8:
                codes = self._unpack(self.zero_points, self.n)[:, : self.blocks][kout][:, blocks]
                zp = self._pack(codes)
            else:
                zp = self.zero_points.reshape(self.n, self.blocks)[kout][:, blocks]
            out[3] = zp.reshape(-1) if self.zero_points.ndim == 1 else zp
        if self.bias is not None:
            out[5] = self.bias[kout]
        return out


class MatMulNBitsRule(ChannelRule):
    """com.microsoft.MatMulNBits: ``A @ dequantize(B)^T + bias``; A's last axis is read, rows of B are the outputs."""

    ops = ("MatMulNBits",)
    domains: ClassVar[tuple[str, ...]] = ("com.microsoft",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a, y = node.inputs[0], node.outputs[0]
        weight = NBitsWeight.of(node, ctx.const)
        rank = known_rank(ctx, a)
        tracked_input = ctx.tracked(a)
        if (tracked_input is not None and tracked_input.axis != rank - 1) or not ctx.demand(a, rank - 1, weight.k, node):
            raise Barrier("its input's channels are not on the last axis")
        ctx.read(a, node, ReadKind.ZERO, f"read by com.microsoft.MatMulNBits '{node.name}'")
        ctx.add_constraint(node)
        bias = 0.0 if weight.bias is None else weight.bias.astype(np.float64)
        ctx.track(y, rank - 1, weight.n, node, linear_values(ctx.value(a), weight.dequantized(), bias, allow_constant=True))

    def constrain(self, node: gs.Node, view: PlanView) -> tuple[np.ndarray, str] | None:
        """Dead inputs go only as whole blocks: keep back those of a block that keeps any."""
        a = node.inputs[0]
        block = int(node.attrs["block_size"])
        removed = view.removed(a)
        padded = np.concatenate([removed, np.ones(-removed.size % block, dtype=bool)]).reshape(-1, block)
        partial = np.repeat(padded.any(axis=1) & ~padded.all(axis=1), block)[: removed.size]
        keep = view.components(a)[partial & removed]
        if keep.size == 0:
            return None
        return np.unique(keep), f"com.microsoft.MatMulNBits '{node.name}' reads its input in blocks of {block}: only whole blocks go"

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        a, y = node.inputs[0], node.outputs[0]
        if not (rw.changed_read(node, a) or rw.changed(y)):
            return
        weight = NBitsWeight.of(node, rw.const)
        kin, kout = keep_or_all(rw.keep_read(node, a), weight.k), keep_or_all(rw.keep(y), weight.n)
        padded = np.concatenate([kin, np.zeros(-kin.size % weight.block_size, dtype=bool)])
        blocks = padded.reshape(-1, weight.block_size).any(axis=1)
        for index, value in weight.pruned(kout, blocks).items():
            rw.set_const(node, index, value)
        node.attrs["K"], node.attrs["N"] = int(kin.sum()), int(kout.sum())


QUANT_RULES: list[ChannelRule] = [QuantizeRule(), MatMulNBitsRule()]
