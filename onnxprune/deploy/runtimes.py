"""The rows of deploy's table and the runtimes it writes for (base classes; each runtime has its own module).

``Artifact`` is one row: a model on a runtime, runnable at a thread count. ``DeployRuntime`` is the
extension point for a runtime: ``write`` puts its files into the staging folder and returns the rows
to check and time; ``reference_rows`` adds rows that are not written (none by default).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxprune.deploy.precisions import Converted

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]  # a feed -> the model's first output


class Artifact:
    """One row: a model on a runtime. ``reference``: the label of another row it must also agree with."""

    def __init__(self, label: str, runtime: str, files: list[Path], *, written: bool = True,
                 reference: str | None = None) -> None:
        self.label, self.runtime, self.files = label, runtime, files
        self.written, self.reference = written, reference

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files if f.exists())

    def open(self, threads: int, batch: int | None = None) -> Runner:
        """A function running this model with ``threads`` threads; ``batch``: the only batch size it will be given
        (a runtime that compiles for fixed shapes may use it)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What the runtime made of the model (for the report); nothing by default."""
        return {}


class DeployRuntime:
    """Writes a converted model for one runtime. ``fp16_in_onnx``: whether fp16 is converted in ONNX first."""

    name = ""
    fp16_in_onnx = True

    def write(self, converted: Converted, stage: Path) -> list[Artifact]:
        """Write the runtime's files into ``stage``; the rows to check and time."""
        raise NotImplementedError

    def reference_rows(self, input_file: Path) -> list[Artifact]:
        """Rows beside the float32 input on ONNX Runtime that are not written; none by default."""
        return []

    def versions(self) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__}

    def details(self, stage: Path) -> dict:
        """Settings of the written files (for the report)."""
        return {}
