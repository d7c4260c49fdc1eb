"""The posteriors a model can be wrapped with, by name: method name -> gate class.

``wrap(model, x, method=name)`` builds one gate of ``METHODS[name]`` per channel group, as
``gate_class(num_channels, **gate_kwargs)``. The interface a gate class implements is
:class:`~onnxprune.bayes.gate.ChannelGate`'s; :func:`register_method` adds one's own.
"""

from __future__ import annotations

from onnxprune.bayes.gate import ChannelGate
from onnxprune.bayes.rbp import RBPGate
from onnxprune.bayes.sbp import SBPGate
from onnxprune.bayes.turbo_vbi import TurboVBIGate

__all__ = ["METHODS", "register_method", "gate_class"]

METHODS: dict[str, type[ChannelGate]] = {"sbp": SBPGate, "rbp": RBPGate, "turbo-vbi": TurboVBIGate}


def register_method(name: str, gate: type[ChannelGate]) -> None:
    """Make ``wrap(..., method=name)`` build gates of class ``gate`` (a :class:`ChannelGate` subclass)."""
    if not (isinstance(gate, type) and issubclass(gate, ChannelGate)):
        raise TypeError(f"a method's gate must be a ChannelGate subclass, got {gate!r}")
    METHODS[name] = gate


def gate_class(method: str) -> type[ChannelGate]:
    """The gate class registered under ``method``; a ValueError names the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; known: {', '.join(METHODS)}")
    return METHODS[method]
