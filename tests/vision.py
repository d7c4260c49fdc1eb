"""torchvision, timm and transformers beside the CPU torch wheel (test helper, never the library).

On this project's machines torch is 2.13.0+cpu while the registry's torchvision 0.28.0 is built
against the CUDA torch: its compiled detection ops cannot register their fake kernels, and
``import torchvision`` (and so timm, and transformers, which imports it when present) fails with
``operator torchvision::nms does not exist``. Importing it once with ``torch.library.register_fake``
made tolerant of that failure leaves every model family working (only the detection ops are absent).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import pytest
import torch


def _tolerant(register_fake):
    """``register_fake`` whose failures (an operator that does not exist) give a no-op decorator."""

    def tolerant(*args, **kwargs):
        try:
            decorator = register_fake(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the missing compiled op, whatever its error type
            return lambda fn: fn

        def apply(fn):
            try:
                return decorator(fn)
            except Exception:  # noqa: BLE001
                return fn

        return apply

    return tolerant


def import_torchvision() -> ModuleType:
    """``torchvision``, imported with the shim above (skips the test when it is not installed)."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install -e '.[test]')")
    original = torch.library.register_fake
    torch.library.register_fake = _tolerant(original)
    try:
        return importlib.import_module("torchvision")
    finally:
        torch.library.register_fake = original


def import_timm() -> ModuleType:
    import_torchvision()
    return pytest.importorskip("timm")


def import_transformers() -> ModuleType:
    import_torchvision()
    return pytest.importorskip("transformers")
