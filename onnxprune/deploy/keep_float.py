"""Which Conv/Gemm/MatMul layers the int8 step leaves in float32.

``KeepFloat`` is the extension point: its ``layers(model)`` names the nodes to leave in float32; the
base class keeps none (every layer quantized). ``SlowerInInt8`` asks onnxprune.latency.int8, where
that module exists, for the layers measured slower in int8 than in float32 on ONNX Runtime's CPU at
the thread count and batch size deploy is fast at.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence

import onnx

from onnxprune.errors import InputError

logger = logging.getLogger(__name__)

MEASURING_MODULE = "onnxprune.latency.int8"


class KeepFloat:
    """Names the layers int8 leaves in float32. The default keeps none."""

    def layers(self, model: onnx.ModelProto) -> list[str]:
        """Node names to leave in float32 (called once, on the float32 input model)."""
        return []

    def describe(self) -> str:
        """How the layers were chosen (for the report)."""
        return "none: every layer quantized"


class KeepNamed(KeepFloat):
    """The layers the user names."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def layers(self, model: onnx.ModelProto) -> list[str]:
        known = {node.name for node in model.graph.node}
        unknown = [name for name in self.names if name not in known]
        if unknown:
            raise InputError(f"--keep-float names no node of the model: {', '.join(unknown)}")
        return list(self.names)

    def describe(self) -> str:
        return "named by the user"


class KeepChosenBy(KeepFloat):
    """The layers a function of the model names."""

    def __init__(self, choose: Callable[[onnx.ModelProto], list[str]]) -> None:
        self.choose = choose

    def layers(self, model: onnx.ModelProto) -> list[str]:
        return list(self.choose(model))

    def describe(self) -> str:
        return f"chosen by {getattr(self.choose, '__qualname__', repr(self.choose))}"


class SlowerInInt8(KeepFloat):
    """The layers measured slower in int8 than in float32 on ONNX Runtime's CPU (onnxprune.latency.int8).

    Where this onnxprune has no such module, every layer is quantized and the report says so.
    """

    def __init__(self, threads: int, batch: int = 1) -> None:
        self.threads, self.batch = threads, batch
        self.available: bool | None = None

    def layers(self, model: onnx.ModelProto) -> list[str]:
        try:
            module = importlib.import_module(MEASURING_MODULE)
        except ModuleNotFoundError as e:
            if e.name != MEASURING_MODULE:
                raise
            self.available = False
            logger.info("%s is not available: every layer is quantized", MEASURING_MODULE)
            return []
        self.available = True
        return list(module.layers_slower_in_int8(model, self.threads, self.batch))

    def describe(self) -> str:
        if self.available is False:
            return f"measured slower in int8: {MEASURING_MODULE} not available, every layer quantized"
        return (f"measured slower in int8 than in float32 on ONNX Runtime CPU ({self.threads} thread(s), "
                f"batch {self.batch})")


def keep_float_for(choice: KeepFloat | Callable[[onnx.ModelProto], list[str]] | Sequence[str] | None, *,
                   runtime: str, threads: int, batch: int = 1) -> KeepFloat:
    """A KeepFloat from what the caller gave: None is the runtime's default (measured on ORT at ``threads`` and
    ``batch``, none elsewhere)."""
    if isinstance(choice, KeepFloat):
        return choice
    if choice is None:
        return SlowerInInt8(threads, batch) if runtime == "ort" else KeepFloat()
    if callable(choice):
        return KeepChosenBy(choice)
    return KeepNamed([str(name) for name in choice])
