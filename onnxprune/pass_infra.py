"""Graph passes and the manager that runs them (in the manner of onnx-ir's pass infrastructure).

A pass is a small class with a ``name``, a one-line ``summary``, the graph
properties it ``requires`` beforehand and those it ``ensures`` afterwards, and a
``call`` that edits an onnx-graphsurgeon graph in place and returns a
:class:`PassResult` saying whether anything changed.

Properties are names with a checker (``PROPERTY_CHECKS``) and a providing pass
(registered by :mod:`passes`). The manager runs the provider of a required
property that does not currently hold, checks every declared ``ensures`` after
the pass, and drops properties a modifying pass does not promise to keep.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from onnxprune.errors import PassError
from onnxprune.graphutil import graphsurgeon_logging


class PreconditionError(PassError):
    """A pass was run on a graph that lacks a property it requires."""


class PostconditionError(PassError):
    """A pass did not establish a property it promises."""


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, a one-line summary, and pass-specific details."""

    modified: bool
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    # properties that held before and still hold although the pass changed the graph (shapes, where a pass
    # changed only weights' values, or only channel counts it set in the shapes itself)
    preserved: frozenset[str] = frozenset()


class GraphPass(abc.ABC):
    """Base class of every pass (see module docstring)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    ensures: ClassVar[frozenset[str]] = frozenset()
    # True for a pass that only establishes its ``ensures`` (shape inference): the manager skips it where they
    # already hold, since running it again would find what is already known.
    only_establishes: ClassVar[bool] = False

    @abc.abstractmethod
    def call(self, graph: gs.Graph) -> PassResult:
        """Edit ``graph`` in place."""

    def __call__(self, graph: gs.Graph) -> PassResult:
        """Check the required properties, run :meth:`call` (onnx-graphsurgeon's messages logged, not
        printed), check the promised ones."""
        with graphsurgeon_logging():
            for prop in self.requires:
                problem = _check(prop, graph)
                if problem:
                    raise PreconditionError(f"pass '{self.name}' requires '{prop}': {problem}")
            result = self.call(graph)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult")
            for prop in self.ensures:
                problem = _check(prop, graph)
                if problem:
                    raise PostconditionError(f"pass '{self.name}' promises '{prop}' but: {problem}")
        return result


# -- graph properties -------------------------------------------------------


def _toposorted(graph: gs.Graph) -> str | None:
    """Why the graph is not in topological order (None if it is)."""
    seen = {t.name for t in graph.inputs}
    seen.update(name for name, t in graph.tensors().items() if isinstance(t, gs.Constant))
    for node in graph.nodes:
        for t in node.inputs:
            if t is not None and t.name and t.name not in seen and not isinstance(t, gs.Constant):
                if t.inputs:  # produced later
                    return f"node '{node.name}' reads '{t.name}' before it is produced"
        seen.update(o.name for o in node.outputs)
    return None


def _clean(graph: gs.Graph) -> str | None:
    """Why the graph is not clean: a node whose outputs nobody uses (None if clean)."""
    used = {t.name for t in graph.outputs}
    for node in reversed(graph.nodes):
        if not any(o.name in used for o in node.outputs):
            return f"node '{node.name}' computes nothing used"
        used.update(t.name for t in node.inputs if t is not None)
    return None


# A property with a checker can be verified on any graph; one mapped to None
# ("shapes": inference ran since the last edit, "constants-folded") is tracked
# by the manager from what passes declare.
PROPERTY_CHECKS: dict[str, Callable[[gs.Graph], str | None] | None] = {
    "toposorted": _toposorted,
    "clean": _clean,
    "shapes": None,
    "constants-folded": None,
}


def _check(prop: str, graph: gs.Graph) -> str | None:
    """Why ``prop`` does not hold on ``graph`` (None if it holds or cannot be checked)."""
    checker = PROPERTY_CHECKS[prop]
    return None if checker is None else checker(graph)


@dataclass
class PassRecord:
    """One pass run by the manager."""

    name: str
    result: PassResult
    seconds: float
    auto: bool = False


class PassManager:
    """Runs passes in order, first running providers for required properties that do not hold."""

    def __init__(
        self,
        passes: Sequence[GraphPass],
        providers: dict[str, Callable[[], GraphPass]] | None = None,
        *,
        on_pass: Callable[[PassRecord], None] | None = None,
        on_start: Callable[[GraphPass], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.providers = providers or {}
        self.on_pass = on_pass
        self.on_start = on_start  # called as each pass starts (progress: which pass is running)

    def _run_one(self, graph: gs.Graph, p: GraphPass, holds: set[str], records: list[PassRecord], auto: bool) -> None:
        """Run ``p``, first the providers of its required properties that do not hold (or skip it, where it only
        establishes properties that already hold)."""
        if p.only_establishes and p.ensures and p.ensures <= holds:
            if self.on_start:
                self.on_start(p)
            self._record(p, PassResult(modified=False, summary="skipped: " + ", ".join(sorted(p.ensures)) + " already hold"),
                         0.0, records, auto)
            return
        for prop in sorted(p.requires):
            if prop in holds or (PROPERTY_CHECKS[prop] is not None and _check(prop, graph) is None):
                holds.add(prop)
                continue
            if prop not in self.providers:
                raise PreconditionError(f"pass '{p.name}' requires '{prop}' and no pass provides it")
            self._run_one(graph, self.providers[prop](), holds, records, auto=True)
        if self.on_start:
            self.on_start(p)
        start = time.perf_counter()
        result = p(graph)
        self._record(p, result, time.perf_counter() - start, records, auto)
        if result.modified:
            holds.intersection_update(p.ensures | result.preserved)
        holds.update(p.ensures)

    def _record(self, p: GraphPass, result: PassResult, seconds: float, records: list[PassRecord], auto: bool) -> None:
        """Keep what ``p`` did, and tell ``on_pass``."""
        record = PassRecord(p.name, result, seconds, auto)
        records.append(record)
        if self.on_pass:
            self.on_pass(record)

    def run(
        self, graph: gs.Graph, passes: Sequence[GraphPass] | None = None, *, holds: set[str] | None = None
    ) -> list[PassRecord]:
        """Run the manager's passes (or ``passes``) on ``graph`` in place; returns what each did.

        ``holds`` carries the properties known to hold across several calls.
        """
        records: list[PassRecord] = []
        holds = set() if holds is None else holds
        for p in self.passes if passes is None else passes:
            self._run_one(graph, p, holds, records, auto=False)
        return records
