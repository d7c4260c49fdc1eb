"""The posteriors a model can be wrapped with, by name.

Every gate class takes ``num_channels`` and offers ``kl()``, ``sample(n)``
([n, C] during training), ``deterministic()`` ([C], exact zeros for rejected
channels), ``snr()``/``expected()`` where meaningful, and ``num_channels``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _sbp(num_channels: int, **kwargs) -> nn.Module:
    from onnxprune.bayes.sbp import SBPGate

    return SBPGate(num_channels, **kwargs)


def _rbp(num_channels: int, **kwargs) -> nn.Module:
    from onnxprune.bayes.rbp import RBPGate

    return RBPGate(num_channels, **kwargs)


def _turbo_vbi(num_channels: int, **kwargs) -> nn.Module:
    from onnxprune.bayes.turbo_vbi import TurboVBIGate

    return TurboVBIGate(num_channels, **kwargs)


METHODS: dict[str, Callable[..., nn.Module]] = {"sbp": _sbp, "rbp": _rbp, "turbo-vbi": _turbo_vbi}
