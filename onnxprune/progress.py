"""Progress of a run's phases, reported to a callback: the library only calls it; the command line draws bars.

``on_phase(name, done, total)`` is called with ``done`` 0 when a phase starts, as it advances, and with
``done == total`` when it ends. Phases: "load", "pass NAME" (each pass), "check" (the ONNX checker),
"analysis", "timing candidates" (``--target``), "save" (bytes written), "verify, whole model" or
"verify, block by block" (blocks checked).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

PhaseCallback = Callable[[str, float, float], None]


def report(on_phase: PhaseCallback | None, name: str, done: float, total: float) -> None:
    """Tell ``on_phase`` (if any) how far phase ``name`` is."""
    if on_phase is not None:
        on_phase(name, done, total)


@contextmanager
def phase(on_phase: PhaseCallback | None, name: str) -> Iterator[None]:
    """A phase of one step: started on entry, ended on a normal exit."""
    report(on_phase, name, 0, 1)
    yield
    report(on_phase, name, 1, 1)


def counter(on_phase: PhaseCallback | None, name: str) -> Callable[[float, float], None] | None:
    """A ``(done, total)`` callback that reports phase ``name``, or None without ``on_phase``."""
    if on_phase is None:
        return None
    return lambda done, total: on_phase(name, done, total)
