"""Set subnormal floating-point weights to zero.

Subnormal (denormal) numbers are below the smallest normal float (1.2e-38 for
float32). Training with shrinkage priors leaves many of them in weights, and a
CPU computes with them tens of times slower than with normal numbers: a
pruned Turbo-VBI LeNet-300-100 ran 6x slower than its dense net because of
them. Zeroing one changes any product with it by less than the smallest normal
float, far below the resolution of any output of normal size; the result is
still verified on ONNX Runtime against the input. Rows or channels left all
zero become dead channels the pruning pass can delete.

float16, bfloat16, float32 and float64 weights are read through their bits (:mod:`onnxprune.floatbits`): one
pass over each weight, at memory speed, never converted to another float type; only a weight that holds
subnormals is rewritten (a new array: the old one may be a read-only map of the input's external data).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from onnxprune.channels.stored import widening_cast
from onnxprune.external_data import prefetch
from onnxprune.floatbits import count_subnormals, flush_subnormals, subnormal_mask
from onnxprune.graphutil import constant_values, graphsurgeon_logging
from onnxprune.pass_infra import GraphPass, PassResult

__all__ = ["FLOAT_TYPES", "FlushSubnormalsPass", "count_subnormals", "subnormal_mask"]

FLOAT_TYPES = (np.float16, np.float32, np.float64)
_FLOAT_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})


def _is_float(dtype) -> bool:
    """True for float16/bfloat16/float32/float64 (onnx-graphsurgeon keeps bfloat16 as its ONNX type number)."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(int(dtype)) if isinstance(dtype, (int, np.integer)) else np.dtype(dtype)
    except (TypeError, KeyError, ValueError):
        return False
    return dtype.name in _FLOAT_NAMES


def _read_widened(t: gs.Constant) -> bool:
    """True if only Casts to a wider float type read ``t`` (a float16 weight of a float32 layer): its values
    are computed with in that type, where none of them is subnormal."""
    return bool(t.outputs) and all(widening_cast(node) for node in t.outputs)


class FlushSubnormalsPass(GraphPass):
    name = "flush-subnormals"
    summary = "set subnormal float weights to zero (they are slow on CPUs and below any output's resolution)"

    def call(self, graph: gs.Graph) -> PassResult:
        flushed = tensors = 0
        weights = [t for t in graph.tensors().values()
                   if isinstance(t, gs.Constant) and _is_float(t.dtype) and not _read_widened(t)]
        for i, t in enumerate(weights):
            for ahead in weights[i : i + 2] if i == 0 else weights[i + 1 : i + 2]:
                prefetch(ahead)  # external data: the next weight is read from disk while this one is flushed
            with graphsurgeon_logging():  # its note on bfloat16, which numpy lacks, goes to logging
                values = constant_values(t)
            new, count = flush_subnormals(values)
            if count:
                t.values = new  # a new array: copies of the graph share the old
                flushed += count
                tensors += 1
        return PassResult(
            modified=flushed > 0,
            summary=f"{flushed} subnormal value(s) in {tensors} constant(s) set to zero",
            details={"flushed": flushed},
            preserved=frozenset({"shapes", "toposorted"}),  # only weights' values change
        )
