"""Set subnormal floating-point weights to zero.

Subnormal (denormal) numbers are below the smallest normal float (1.2e-38 for
float32). Training with shrinkage priors leaves many of them in weights, and a
CPU computes with them tens of times slower than with normal numbers: a
pruned Turbo-VBI LeNet-300-100 ran 6x slower than its dense net because of
them. Zeroing one changes any product with it by less than the smallest normal
float, far below the resolution of any output of normal size; the result is
still verified on ONNX Runtime against the input. Rows or channels left all
zero become dead channels the pruning pass can delete.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.stored import widening_cast
from onnxprune.graphutil import constant_values
from onnxprune.pass_infra import GraphPass, PassResult

FLOAT_TYPES = (np.float16, np.float32, np.float64)
# Per float type: the unsigned integer of its bits, and the largest magnitude (sign bit cleared) of a subnormal.
_BITS = {np.dtype(np.float16): (np.uint16, 0x03FF), np.dtype(np.float32): (np.uint32, 0x007FFFFF),
         np.dtype(np.float64): (np.uint64, 0x000FFFFFFFFFFFFF)}
_BLOCK = 1 << 16  # elements counted at a time (the scratch arrays stay in cache)


def subnormal_mask(values: np.ndarray) -> np.ndarray:
    """True where ``values`` (a floating array) holds a nonzero subnormal number."""
    tiny = np.finfo(values.dtype).tiny
    return (values != 0) & (np.abs(values) < tiny)


def count_subnormals(values: np.ndarray) -> int:
    """How many nonzero subnormal numbers ``values`` (float16/32/64) holds: ``subnormal_mask(values).sum()``,
    counted on the bits a block at a time (no array of the weights' size is made)."""
    if values.dtype not in _BITS:  # a byte order not the machine's
        return int(subnormal_mask(values).sum())
    uint, largest = _BITS[values.dtype]
    bits = np.ascontiguousarray(values).reshape(-1).view(uint)
    magnitude_mask, bound = uint(np.iinfo(uint).max >> 1), uint(largest)
    scratch = np.empty(min(_BLOCK, bits.size), dtype=uint)
    flags = np.empty(scratch.size, dtype=bool)
    count = 0
    for start in range(0, bits.size, _BLOCK):
        block = bits[start : start + _BLOCK]
        s, f = scratch[: block.size], flags[: block.size]
        np.bitwise_and(block, magnitude_mask, out=s)  # |x|'s bits: 0 for zeros, 1..largest for subnormals
        np.subtract(s, uint(1), out=s)  # zeros wrap round to the top
        count += int(np.count_nonzero(np.less(s, bound, out=f)))
    return count


def _read_widened(t: gs.Constant) -> bool:
    """True if only Casts to a wider float type read ``t`` (a float16 weight of a float32 layer): its values
    are computed with in that type, where none of them is subnormal."""
    return bool(t.outputs) and all(widening_cast(node) for node in t.outputs)


class FlushSubnormalsPass(GraphPass):
    name = "flush-subnormals"
    summary = "set subnormal float weights to zero (they are slow on CPUs and below any output's resolution)"

    def call(self, graph: gs.Graph) -> PassResult:
        flushed = tensors = 0
        for t in graph.tensors().values():
            if not isinstance(t, gs.Constant) or t.dtype not in FLOAT_TYPES or _read_widened(t):
                continue
            values = constant_values(t)
            count = count_subnormals(values)
            if count:
                mask = subnormal_mask(values)
                t.values = np.where(mask, values.dtype.type(0), values)  # a new array: copies of the graph share the old
                flushed += count
                tensors += 1
        return PassResult(
            modified=flushed > 0,
            summary=f"{flushed} subnormal value(s) in {tensors} constant(s) set to zero",
            details={"flushed": flushed},
        )
