"""The interface every channel rule implements, and helpers rules share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import NameSource

if TYPE_CHECKING:
    from onnxprune.channels.context import AnalysisContext
    from onnxprune.channels.slots import TrackedAxis


class RewriteContext(Protocol):
    """What a rule may ask and do while the plan is applied (see :mod:`onnxprune.channels.rewrite`)."""

    graph: gs.Graph
    names: NameSource

    def keep(self, t: gs.Tensor | None) -> np.ndarray | None:
        """Boolean mask of the channels kept in a tracked tensor (None if untracked)."""

    def changed(self, t: gs.Tensor | None) -> bool:
        """True if any channel of the tensor is deleted."""

    def keep_read(self, node: gs.Node, t: gs.Tensor | None) -> np.ndarray | None:
        """Channels of ``t`` that ``node`` still reads (kept, less channels it alone stops reading)."""

    def changed_read(self, node: gs.Node, t: gs.Tensor | None) -> bool:
        """True if ``node`` reads fewer channels of ``t`` than before."""

    def gather_input(self, node: gs.Node, index: int) -> None:
        """Make ``node`` read the channels it keeps of input ``index`` through a Gather (if it drops any)."""

    def tracked_layout(self, t: gs.Tensor) -> bool:
        """True if ``t``'s channels are spread over several axes (attention heads)."""

    def kept_per_axis(self, t: gs.Tensor) -> dict[int, tuple[int, int]]:
        """For each axis of a tracked tensor that carries channels: (channel values before, kept)."""

    def values(self, t: gs.Tensor) -> np.ndarray:
        """Per-channel constant values found by the analysis (NaN unknown)."""

    def axis(self, t: gs.Tensor) -> int:
        """The tracked tensor's channel axis."""

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        """The current value of a constant tensor (None if not constant)."""

    def parts(self, t: gs.Tensor) -> tuple:
        """The layout of a tracked tensor's channels (its parts, :mod:`onnxprune.channels.layout`)."""

    def repeat_source(self, node: gs.Node) -> np.ndarray | None:
        """For a Reshape that repeats heads (grouped-query attention): the input channel each output channel
        copies (None for any other node)."""

    def set_const(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        """Replace constant input ``index`` of ``node`` (copy-on-write if shared)."""

    def set_const_or_add(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        """Replace constant input ``index`` of ``node``, adding it where the node omits that input."""

    def add_bias_after(self, node: gs.Node, bias: np.ndarray) -> None:
        """Insert ``Add(node's output, bias)`` so the output keeps its name and consumers."""

    def insert_after(self, node: gs.Node, op: str, extra_inputs: list, attrs: dict) -> gs.Node:
        """Insert a node reading ``node``'s first output and writing that output's tensor."""


class PlanView(Protocol):
    """What a rule's ``constrain`` hook sees: the current deletion decision."""

    def removed(self, t: gs.Tensor) -> np.ndarray:
        """Boolean mask: which channels of a tracked tensor are currently to be deleted."""

    def components(self, t: gs.Tensor) -> np.ndarray:
        """Component index of each channel slot of a tracked tensor."""


class Barrier(Exception):
    """Raised by a rule before it declares anything: the node is a barrier, for ``reason``.

    The analysis catches it and calls :meth:`AnalysisContext.barrier`, so a rule
    (or a helper it calls) says ``raise Barrier("...")`` where it cannot follow channels.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChannelRule:
    """How channels flow through one kind of op.

    ``analyze`` declares channel axes, ties, reads and values on an
    :class:`AnalysisContext` (or raises :class:`Barrier`); ``rewrite`` edits the
    node (its constant inputs and attributes) once the plan says which channels
    go; ``constrain`` may veto deletions that the op cannot express (e.g.
    unequal group sizes).
    """

    ops: ClassVar[tuple[str, ...]] = ()
    # True for rules that follow channels spread over several axes (attention heads); any other rule is a
    # barrier to such a tensor.
    handles_layouts: ClassVar[bool] = False

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        """Declare what ``node`` does to channels (every rule overrides this)."""
        raise NotImplementedError(f"{type(self).__name__} does not analyse {node.op}")

    def rewrite(self, node: gs.Node, rw: RewriteContext) -> None:
        """Default: the op needs no edit (its output shape follows its inputs)."""

    def constrain(self, node: gs.Node, view: PlanView) -> tuple[np.ndarray, str] | None:
        """Components to keep after all, and why (None: nothing to veto)."""
        return None


class TrackedInputRule(ChannelRule):
    """Rules for ops whose channels come from their first input: nothing happens unless it carries channels."""

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        tracked_input = ctx.tracked(node.inputs[0])
        if tracked_input is not None:
            self.analyze_tracked(node, ctx, tracked_input)

    def analyze_tracked(self, node: gs.Node, ctx: AnalysisContext, tracked_input: TrackedAxis) -> None:
        """Declare what ``node`` does to the channels of its first input, which carries ``tracked_input``."""
        raise NotImplementedError(f"{type(self).__name__} does not analyse {node.op}")


def known_rank(ctx: AnalysisContext, t: gs.Tensor, reason: str = "input rank unknown") -> int:
    """The rank of ``t``; a :class:`Barrier` for ``reason`` when shape inference left it unknown."""
    rank = ctx.rank(t)
    if rank is None:
        raise Barrier(reason)
    return rank


def normalize_axis(axis: int, rank: int) -> int:
    """``axis`` counted from the front (ONNX allows negative axes)."""
    return axis + rank if axis < 0 else axis


def keep_or_all(mask: np.ndarray | None, size: int) -> np.ndarray:
    """``mask``, or all ``size`` channels kept when the tensor is not tracked."""
    return np.ones(size, dtype=bool) if mask is None else mask


def take_rows_cols(w: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``w[rows][:, cols]`` for boolean masks ``rows`` and ``cols``, as a new C-contiguous array: an axis that keeps
    everything is not touched, and the result is the only array of its size made: where both axes are cut, the
    kept rows are gathered a block at a time into a small scratch array (which stays in the cache) and their
    kept columns copied from there."""
    cut_rows, cut_cols = not rows.all(), not cols.all()
    if not (cut_rows or cut_cols):
        return np.array(w, order="C")
    if not cut_cols:
        return np.compress(rows, w, axis=0)
    if not cut_rows:
        return np.compress(cols, w, axis=1)
    kept, picked = np.flatnonzero(rows), np.flatnonzero(cols)
    out = np.empty((kept.size, picked.size, *w.shape[2:]), dtype=w.dtype)
    step = max(1, _GATHER_BLOCK // max(1, w[0].nbytes))
    scratch = np.empty((min(step, kept.size), *w.shape[1:]), dtype=w.dtype)
    for i in range(0, kept.size, step):
        index = kept[i : i + step]
        # mode="clip" (the indices are in range): numpy buffers ``out`` under the default mode, a copy more
        block = np.take(w, index, axis=0, out=scratch[: index.size], mode="clip")
        np.take(block, picked, axis=1, out=out[i : i + step], mode="clip")
    return out


_GATHER_BLOCK = 1 << 20  # bytes of rows gathered at a time by take_rows_cols


def ints_attr_or_input(
    node: gs.Node, const_of: Callable[[gs.Tensor], np.ndarray | None], attr: str, input_index: int
) -> tuple[list[int] | None, bool]:
    """Integer list from an attribute (older opsets) or a constant input (newer).

    Returns (values, ok); ok is False when the input exists but is not constant.
    """
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]], True
    if input_index < len(node.inputs):
        t = node.inputs[input_index]
        if t is None or (not isinstance(t, gs.Constant) and not t.name):
            return None, True
        value = const_of(t)
        if value is None:
            return None, False
        return [int(x) for x in np.asarray(value).reshape(-1)], True
    return None, True
