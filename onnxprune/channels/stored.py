"""Constants as a model stores them: read through the DequantizeLinear or Cast that widens them, written back so.

A quantized model (QDQ) stores a Conv/Gemm/MatMul weight as ``DequantizeLinear(W_q, scale, zero_point)`` of
constants (per tensor, per axis, or in blocks along one axis); a mixed-precision one as a ``Cast`` of a float16 or
bfloat16 constant. The channel engine reads such a tensor as the constant it computes (:func:`stored_value`; a
quantized row is zero exactly where it equals its zero point) and writes a pruned one back in the same form:
:func:`take` applies a selection of elements (rows, columns) to the stored values and, per axis, to the scales and
zero points along that axis; :func:`set_stored` stores any other new value in that form where it holds the value
exactly, else as a plain constant of the value's type (exact either way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxprune.graphutil import (
    NameSource,
    constant_value,
    graphsurgeon_logging,
    is_default_domain,
    optional_input,
    producer,
    set_const_input,
    set_or_add_const_input,
    weight_and_bias,
)

logger = logging.getLogger(__name__)

Select = Callable[[np.ndarray], np.ndarray]
"""A selection of elements along axes (``lambda a: a[rows][:, cols]``); it must keep the rank."""

_NARROW_FLOATS = frozenset({"float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"})
_WIDER = {TensorProto.FLOAT: np.dtype(np.float32), TensorProto.DOUBLE: np.dtype(np.float64), TensorProto.FLOAT16: np.dtype(np.float16)}
_SUB_BYTE = frozenset({"int4", "uint4", "int2", "uint2", "float4_e2m1fn"})
_SMALL_INTS = {"int4": (-8, 7), "uint4": (0, 15), "int2": (-2, 1), "uint2": (0, 3)}


def _dtype(dtype) -> np.dtype | None:
    """``dtype`` as a numpy dtype (onnx-graphsurgeon keeps ONNX type numbers for bfloat16 and float8); None if unknown."""
    if dtype is None:
        return None
    try:
        return helper.tensor_dtype_to_np_dtype(int(dtype)) if isinstance(dtype, (int, np.integer)) else np.dtype(dtype)
    except (TypeError, KeyError):
        return None


def _int_range(dtype: np.dtype) -> tuple[int, int] | None:
    """Smallest and largest value of an integer type (None for other types)."""
    if dtype.name in _SMALL_INTS:
        return _SMALL_INTS[dtype.name]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    return None


def widening_cast(node: gs.Node) -> bool:
    """True for a Cast of a float16/bfloat16/float8 tensor to a wider float type (weights stored narrow)."""
    if node.op != "Cast" or not is_default_domain(node) or not node.inputs:
        return False
    source = _dtype(node.inputs[0].dtype)
    target = _WIDER.get(int(node.attrs.get("to", 0)))
    return source is not None and target is not None and source.name in _NARROW_FLOATS and target.itemsize > source.itemsize


def is_decompression(node: gs.Node) -> bool:
    """True for the ops a model stores compressed weights through: DequantizeLinear (also ONNX Runtime's
    com.microsoft one), and a widening Cast.

    Constant folding leaves them in place, so that pruning keeps the weights in their stored type.
    """
    return (node.op == "DequantizeLinear" and (is_default_domain(node) or node.domain == "com.microsoft")) or widening_cast(node)


def _read(t: gs.Tensor | None) -> np.ndarray | None:
    """A constant's value (onnx-graphsurgeon's notes on the types numpy lacks, bfloat16 and float8, go to logging)."""
    if t is None:
        return None
    if isinstance(t, gs.Constant) and isinstance(t.dtype, (int, np.integer)):
        with graphsurgeon_logging():
            value = constant_value(t)
    else:
        value = constant_value(t)
    if value is not None and isinstance(t, gs.Constant) and value.dtype.name in _SUB_BYTE:
        t.values = _storable(value, t.name)  # onnx-graphsurgeon would export the loaded array unpacked
    return value


def _storable(value: np.ndarray, name: str) -> np.ndarray | LazyValues:
    """What a gs.Constant holds for ``value``: the array, or a packed tensor for 4-bit and smaller types."""
    value = np.ascontiguousarray(value)
    return LazyValues(numpy_helper.from_array(value, name)) if value.dtype.name in _SUB_BYTE else value


def _put(node: gs.Node, index: int, value: np.ndarray, names: NameSource) -> None:
    """Give ``node`` a new constant at input ``index`` (copy-on-write when other nodes read the old one)."""
    old = node.inputs[index]
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = _storable(value, old.name)
        return
    name = names.fresh(f"{old.name}_pruned")
    node.inputs[index] = gs.Constant(name, _storable(value, name))


def _kept_along(select: Select, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Which indices along ``axis`` a selection keeps, in order (it must keep whole slices along that axis)."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    picked = np.asarray(select(np.broadcast_to(np.arange(shape[axis]).reshape(view), shape)))
    if picked.ndim != len(shape):
        raise ValueError("a selection of a stored weight changed its rank")
    rows = np.moveaxis(picked, axis, 0).reshape(picked.shape[axis], -1)
    if rows.shape[1] and not np.all(rows == rows[:, :1]):
        raise ValueError(f"a selection of a stored weight mixes the slices along its quantization axis {axis}")
    return rows[:, 0] if rows.shape[1] else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Stored:
    """A tensor computed from constants by a DequantizeLinear (``scale`` set) or a widening Cast (``scale`` None)."""

    node: gs.Node
    data: np.ndarray
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    axis: int | None = None  # per-axis or blocked quantization: the axis the scales run along
    block_size: int = 0

    def _spread(self, param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A scale or zero point broadcast to the data's elements."""
        if self.axis is None:
            return param.reshape(())
        if self.block_size:
            return np.repeat(param, self.block_size, axis=self.axis).take(np.arange(shape[self.axis]), axis=self.axis)
        view = [1] * len(shape)
        view[self.axis] = param.size
        return param.reshape(view)

    def value(self, data: np.ndarray | None = None) -> np.ndarray:
        """The tensor's value (of ``data`` in place of the stored values, if given), as the runtime computes it."""
        data = self.data if data is None else data
        if self.scale is None:
            return data.astype(_WIDER[int(self.node.attrs["to"])])
        if _int_range(data.dtype) is not None:
            zero = 0 if self.zero_point is None else self._spread(self.zero_point.astype(np.int64), data.shape)
            diff = data.astype(np.int64) - zero
        else:
            zero = 0 if self.zero_point is None else self._spread(self.zero_point.astype(np.float32), data.shape)
            diff = data.astype(np.float32) - zero
        with np.errstate(invalid="ignore", over="ignore"):  # a scale of inf (a quantized -inf mask) gives what ORT gives
            out = diff.astype(np.float32) * self._spread(self.scale.astype(np.float32), data.shape)
            return out.astype(self.scale.dtype)

    def zero_axes(self) -> dict[int, str]:
        """Axes the stored form cannot lose elements along, and why (the block axis of blocked quantization)."""
        if not self.block_size:
            return {}
        return {self.axis: f"its weight is quantized in blocks of {self.block_size} along axis {self.axis}"}

    def selected(self, select: Select) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Stored values, scale and zero point of ``select`` applied to the tensor."""
        data = np.asarray(select(self.data))
        if self.scale is None or self.axis is None:
            return data, self.scale, self.zero_point
        if not self.block_size:
            index = _kept_along(select, self.data.shape, self.axis)
        else:
            index = np.ix_(*(self._block_index(select, d) for d in range(self.data.ndim)))
        if self.block_size == 0 and np.array_equal(index, np.arange(self.scale.size)):
            return data, self.scale, self.zero_point
        zero = None if self.zero_point is None else self.zero_point[index]
        return data, self.scale[index], zero

    def _block_index(self, select: Select, axis: int) -> np.ndarray:
        """Blocked quantization: the scale entries kept along ``axis`` (the block axis must stay whole)."""
        kept = _kept_along(select, self.data.shape, axis)
        if axis != self.axis:
            return kept
        if not np.array_equal(kept, np.arange(self.data.shape[axis])):
            raise ValueError("a selection of a blocked quantized weight cuts its block axis")
        return np.arange(self.scale.shape[axis])

    def _fits_params(self, shape: tuple[int, ...]) -> bool:
        """True if a tensor of ``shape`` can keep the scales and zero points as they are."""
        if self.axis is None:
            return True
        if self.block_size:
            return tuple(shape) == self.data.shape
        return len(shape) == self.data.ndim and shape[self.axis] == self.data.shape[self.axis]

    def pack(self, value: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
        """Stored values (scale and zero point unchanged) that give exactly ``value``; None if there are none."""
        if self.scale is None:
            data = value.astype(self.data.dtype)
        else:
            limits = _int_range(self.data.dtype)
            if not self._fits_params(value.shape) or limits is None:
                return None
            scale = self._spread(self.scale.astype(np.float64), value.shape)
            zero = 0 if self.zero_point is None else self._spread(self.zero_point.astype(np.float64), value.shape)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(scale == 0, zero, np.rint(value.astype(np.float64) / scale) + zero)
            if not np.all(np.isfinite(q)) or q.min(initial=0) < limits[0] or q.max(initial=0) > limits[1]:
                return None
            data = q.astype(self.data.dtype)
        restored = self.value(data)
        if restored.shape != value.shape or not np.array_equal(restored.astype(np.float64), value.astype(np.float64), equal_nan=True):
            return None
        return data, self.scale, self.zero_point


def stored_form(t: gs.Tensor | None) -> Stored | None:
    """How ``t`` is computed from constants by a DequantizeLinear or a widening Cast (None for anything else)."""
    if t is None or isinstance(t, gs.Constant):
        return None
    node = producer(t)
    if node is None or len(node.outputs) != 1 or not is_decompression(node):
        return None
    if node.op == "Cast":
        data = _read(node.inputs[0])
        return None if data is None else Stored(node, data)
    data, scale = _read(node.inputs[0]), _read(node.inputs[1]) if len(node.inputs) > 1 else None
    zp_t = optional_input(node, 2)
    zero = _read(zp_t) if zp_t is not None else None
    if data is None or scale is None or (zp_t is not None and zero is None):
        return None
    block = int(node.attrs.get("block_size", 0))
    if scale.size == 1 and not block:
        return Stored(node, data, scale.reshape(()), None if zero is None else zero.reshape(()))
    axis = int(node.attrs.get("axis", 1))
    axis = axis + data.ndim if axis < 0 else axis
    if not 0 <= axis < data.ndim or (not block and scale.ndim != 1) or (block and scale.ndim != data.ndim):
        return None
    return Stored(node, data, scale, zero, axis, block)


def stored_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of ``t`` if it is a constant, also one stored quantized or narrow (None otherwise)."""
    if t is None:
        return None
    value = _read(t)
    if value is not None:
        return value
    form = stored_form(t)
    return None if form is None else form.value()


def stored_weight_and_bias(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A layer's constant weight (input 1) and optional bias (input 2), read as :func:`stored_value` does;
    None if either varies."""
    return weight_and_bias(node, stored_value)


def frozen_axes(t: gs.Tensor | None) -> dict[int, str]:
    """Axes of a constant that pruning cannot cut, because of how it is stored, and why."""
    form = stored_form(t)
    return {} if form is None else form.zero_axes()


def _eight_bit(dtype) -> bool:
    """True for int8 and uint8."""
    found = _dtype(dtype)
    return found is not None and found.name in ("int8", "uint8")


def _from_eight_bit_dequantize(t: gs.Tensor) -> bool:
    """True if ``t`` is a DequantizeLinear of an int8/uint8 tensor (an activation of an int8 QDQ model)."""
    node = producer(t)
    if node is None or node.op != "DequantizeLinear" or not node.inputs:
        return False
    zero = optional_input(node, 2)
    return _eight_bit(node.inputs[0].dtype) or (zero is not None and _eight_bit(zero.dtype))


def input_rounded_by_runtime(node: gs.Node) -> str | None:
    """Why a MatMul/Gemm cannot lose input channels although the weight can lose them (None if it can).

    ONNX Runtime fuses a quantized 2-D weight that meets a float (or 16-bit) activation, and any 4-bit one,
    into MatMulNBits, which at its default accuracy level rounds the input to int8 in blocks along the input
    channels: deleting some moves the blocks and changes that rounding. An int8 activation meets the weight
    in an integer kernel, whose sums do not depend on the deleted channels.
    """
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    form = stored_form(node.inputs[1])
    if form is None or form.scale is None or form.data.ndim != 2:
        return None
    if _eight_bit(form.data.dtype) and _from_eight_bit_dequantize(node.inputs[0]):
        return None
    return ("ONNX Runtime runs it as MatMulNBits, which rounds its input to int8 in blocks of input channels "
            "(deleting some would change that rounding)")


def _restore(
    graph: gs.Graph, node: gs.Node, index: int, form: Stored, stored: tuple[np.ndarray, np.ndarray | None, np.ndarray | None],
    names: NameSource,
) -> None:
    """Make input ``index`` of ``node`` the stored form of new ``stored`` values (copying the
    decompression node when something else reads it too)."""
    decompress, out = form.node, form.node.outputs[0]
    if len(out.outputs) > 1 or any(o is out for o in graph.outputs):
        copy = gs.Variable(names.fresh(f"{out.name}_pruned"), dtype=out.dtype)
        decompress = gs.Node(decompress.op, name=names.fresh(f"{decompress.name}_pruned"), attrs=dict(decompress.attrs),
                             inputs=list(decompress.inputs), outputs=[copy])
        graph.nodes.append(decompress)
        node.inputs[index] = copy
    data, scale, zero = stored
    _put(decompress, 0, data, names)
    if scale is not form.scale:
        _put(decompress, 1, scale, names)
    if zero is not None and zero is not form.zero_point:
        _put(decompress, 2, zero, names)
    decompress.outputs[0].shape = list(data.shape)


def take(rw, node: gs.Node, index: int, select: Select) -> None:
    """Replace constant input ``index`` of ``node`` by ``select`` of it, kept in the form it is stored in.

    ``rw`` is the :class:`~onnxprune.channels.rule_base.RewriteContext`. A quantized weight loses the same
    elements of its stored values, and per axis the scales and zero points of the slices it loses.
    """
    form = stored_form(node.inputs[index])
    if form is None:
        rw.set_const(node, index, select(rw.const(node.inputs[index])))
        return
    _restore(rw.graph, node, index, form, form.selected(select), rw.names)


def set_stored(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray, names: NameSource) -> None:
    """Replace constant input ``index`` of ``node`` by ``value``: in its stored form where that holds the
    value exactly, else as a plain constant."""
    form = stored_form(node.inputs[index])
    packed = form.pack(np.asarray(value)) if form is not None else None
    if packed is None:
        if form is not None:
            logger.debug("'%s' of %s '%s' is now stored as a plain constant", node.inputs[index].name, node.op, node.name)
        set_const_input(node, index, value, names)
        return
    _restore(graph, node, index, form, packed, names)


def set_stored_or_add(graph: gs.Graph, node: gs.Node, index: int, value: np.ndarray, names: NameSource, name: str) -> None:
    """Like :func:`set_stored`, adding the input (a constant called after ``name``) where ``node`` omits it."""
    if optional_input(node, index) is None:
        set_or_add_const_input(node, index, value, names, name)
        return
    set_stored(graph, node, index, value, names)
