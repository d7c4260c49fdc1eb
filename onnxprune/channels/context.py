"""What the channel rules see and declare while the graph is analysed.

A rule (one per op type, see :mod:`onnxprune.channels.rules`) looks at one node
and declares, through an :class:`AnalysisContext`:

* which axis of each output carries channels (``track``), and how many;
* which slots are the same channel (``tie``), e.g. a Relu's input and output;
* *reads*: where the value of a channel matters. A ``ZERO`` read (a Conv
  summing over input channels) allows deleting a channel only if it is
  identically zero there; a ``FOLD`` read also accepts a constant channel, whose
  contribution is folded into the consumer's bias; a ``BARRIER`` read (graph
  output, an op no rule covers) never allows deletion; a linear layer's read
  also says which channels it multiplies by all-zero weights (``zero_weights``:
  they matter only through ``0 * x``, which is 0 where x is finite);
* *pins*: slots whose producer cannot drop them (a graph input, an op no rule
  covers);
* the per-channel *value* of each output: 0, another constant, or NaN when
  unknown. A value here means "this channel is that constant at every position
  of every input".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.channels.layout import Part, is_standard, normalize
from onnxprune.channels.slots import SlotSpace, TrackedAxis
from onnxprune.channels.stored import stored_value
from onnxprune.graphutil import producer

UNKNOWN = np.nan


class ReadKind(enum.Enum):
    """What a read allows: delete a zero channel, also fold a constant one, or nothing."""
    ZERO = "zero"
    FOLD = "fold"
    BARRIER = "barrier"


@dataclass
class Read:
    """A place where a channel's value matters."""

    tensor: str
    index: np.ndarray | None
    node: str
    kind: ReadKind
    reason: str
    zero_weights: np.ndarray | None = None  # channels (of index) the reader multiplies by all-zero weights


@dataclass
class Pin:
    """Slots that cannot be deleted whatever their value."""

    tensor: str
    index: np.ndarray | None
    reason: str


class AnalysisContext:
    """Mutable state of one channel analysis over a graph (see module doc)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.slots = SlotSpace()
        self.values: dict[str, np.ndarray] = {}
        self.reads: list[Read] = []
        self.pins: list[Pin] = []
        self.barrier_nodes: dict[str, str] = {}
        self.constraint_nodes: list[gs.Node] = []
        self.tracked_by: dict[str, str] = {}  # tensor -> name of the node that declared its channels
        self.fixed: dict[str, dict[int, str]] = {}  # tensor -> parts that keep every value -> why
        self.contracted: set[str] = set()  # tensors whose channels an attention product sums over (queries, keys)
        self.repeats: dict[str, np.ndarray] = {}  # Reshape that repeats heads -> source channel of each output channel
        self.graph_inputs = {t.name for t in graph.inputs}
        self._tensors: dict[str, gs.Tensor] | None = None
        self.graph_outputs = {t.name for t in graph.outputs}

    def used(self, t: gs.Tensor | None) -> bool:
        """True if a node or the graph's outputs read ``t``."""
        return t is not None and bool(t.name) and (bool(t.outputs) or t.name in self.graph_outputs)

    def tensor(self, name: str) -> gs.Tensor | None:
        """The graph's tensor called ``name`` (the name map is built once per analysis)."""
        if self._tensors is None:
            self._tensors = self.graph.tensors()
        return self._tensors.get(name)

    # -- shapes and constants ---------------------------------------------
    @staticmethod
    def shape(t: gs.Tensor) -> list | None:
        """Static shape as a list (ints, or str/None for symbolic dims), or None if unknown."""
        if isinstance(t, gs.Constant):
            return list(t.shape)
        return None if t.shape is None else list(t.shape)

    @classmethod
    def rank(cls, t: gs.Tensor) -> int | None:
        """Number of dimensions of ``t`` (None if unknown)."""
        s = cls.shape(t)
        return None if s is None else len(s)

    @classmethod
    def dim(cls, t: gs.Tensor, axis: int) -> int | None:
        """Static size of ``t`` along ``axis`` (None if unknown or symbolic)."""
        s = cls.shape(t)
        if s is None or not -len(s) <= axis < len(s):
            return None
        d = s[axis]
        return d if isinstance(d, (int, np.integer)) and d >= 0 else None

    @staticmethod
    def const(t: gs.Tensor | None) -> np.ndarray | None:
        """Value of ``t`` if it is a constant, also one stored quantized or narrow (None otherwise)."""
        return stored_value(t)

    # -- tracking -----------------------------------------------------------
    def tracked(self, t: gs.Tensor | str | None) -> TrackedAxis | None:
        """The channel axis of ``t`` if some rule declared one (None otherwise)."""
        if t is None:
            return None
        name = t if isinstance(t, str) else t.name
        return self.slots.get(name) if name else None

    def track(
        self, t: gs.Tensor, axis: int, size: int, node: gs.Node, values: np.ndarray | None = None,
        layout: tuple[Part, ...] | None = None,
    ) -> TrackedAxis:
        """Declare that output ``t`` of ``node`` carries ``size`` channels on ``axis`` (or spread as ``layout``)."""
        if layout is not None:
            layout = normalize(layout)
            axis = layout[0].axis
            if is_standard(layout):
                layout = None
        tracked = self.slots.add(t.name, axis, size, layout)
        self.tracked_by[t.name] = node.name
        v = np.full(size, UNKNOWN) if values is None else np.asarray(values, dtype=np.float64)
        if v.shape != (size,):
            raise ValueError(f"values for {t.name} have shape {v.shape}, expected ({size},)")
        self.values[t.name] = v
        return tracked

    def demand(self, t: gs.Tensor, axis: int, size: int | None, node: gs.Node) -> bool:
        """A consumer needs ``t``'s channels on ``axis``. False if that contradicts what is known.

        A tensor nobody tracked yet comes from a graph input or an op no rule
        covers; it gets slots now, pinned, so the consumer's rule can tie to them.
        """
        have = self.tracked(t)
        if have is not None:
            return have.axis == axis and (size is None or have.size == size)
        if size is None:
            size = self.dim(t, axis)
        if size is None:
            return False
        self.slots.add(t.name, axis, size)
        self.values[t.name] = np.full(size, UNKNOWN)
        if t.name in self.graph_inputs:
            reason = f"comes from graph input '{t.name}'"
        else:
            src = producer(t)
            reason = (
                f"comes from {src.op} '{src.name}', which does not let channels through"
                if src is not None
                else f"'{t.name}' has no producer that can drop channels"
            )
        self.pins.append(Pin(t.name, None, reason))
        return True

    def tie(self, a: gs.Tensor | str, b: gs.Tensor | str, a_index=None, b_index=None) -> None:
        """Declare slots of ``a`` and ``b`` the same channels (all, or ``a_index`` to ``b_index``)."""
        an = a if isinstance(a, str) else a.name
        bn = b if isinstance(b, str) else b.name
        self.slots.tie(an, bn, a_index, b_index)

    def read(self, t: gs.Tensor, node: gs.Node | None, kind: ReadKind, reason: str, index=None,
             zero_weights: np.ndarray | None = None) -> None:
        """Declare that ``node`` reads the channels of ``t`` (all, or ``index``) in the way ``kind`` says;
        ``zero_weights``: the channels among them it multiplies by all-zero weights."""
        if self.tracked(t) is None:
            return
        self.reads.append(Read(t.name, None if index is None else np.asarray(index), node.name if node else "", kind,
                               reason, zero_weights))

    def derive(self, src: gs.Tensor | str, dst: gs.Tensor | str, src_index: np.ndarray, dst_index: np.ndarray) -> None:
        """Slots ``dst_index`` of ``dst`` are computed from slots ``src_index`` of ``src`` (grouped-query attention's
        repeat): separate components, the source kept while any derived slot is."""
        an = src if isinstance(src, str) else src.name
        bn = dst if isinstance(dst, str) else dst.name
        self.slots.derive(an, bn, np.asarray(src_index), np.asarray(dst_index))

    def pin(self, t: gs.Tensor | str, reason: str, index=None) -> None:
        """Declare slots of ``t`` (all, or ``index``) undeletable, for ``reason``."""
        name = t if isinstance(t, str) else t.name
        self.pins.append(Pin(name, None if index is None else np.asarray(index), reason))

    def barrier(self, node: gs.Node, reason: str) -> None:
        """``node`` is not covered: every channel reaching it is kept (outputs stay untracked)."""
        self.barrier_nodes[node.name] = reason
        for t in node.inputs:
            if self.tracked(t) is not None:
                self.read(t, node, ReadKind.BARRIER, f"{node.op} '{node.name}': {reason}")

    def track_parts(self, t: gs.Tensor, parts: tuple[Part, ...], node: gs.Node, values: np.ndarray | None = None) -> TrackedAxis:
        """Declare that output ``t`` of ``node`` carries channels laid out as ``parts``."""
        size = int(np.prod([p.dim for p in parts], dtype=np.int64))
        return self.track(t, parts[0].axis, size, node, values, layout=tuple(parts))

    def fix(self, t: gs.Tensor | str, part: int, reason: str) -> None:
        """Part ``part`` of ``t``'s layout keeps all its values (an op reads its size), for ``reason``."""
        name = t if isinstance(t, str) else t.name
        self.fixed.setdefault(name, {}).setdefault(part, reason)

    def add_constraint(self, node: gs.Node) -> None:
        """The node's rule has a ``constrain`` hook the planner must honour (e.g. grouped Conv)."""
        self.constraint_nodes.append(node)

    def value(self, t: gs.Tensor) -> np.ndarray:
        """Per-channel values of a tracked tensor (NaN unknown)."""
        return self.values[t.name]
