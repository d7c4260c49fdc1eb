"""onnxprune: delete provably dead channels from ONNX models.

``onnxprune.prune(model_or_path)`` returns a smaller ModelProto computing the
same function; ``onnxprune`` on the command line does the same for files.
"""

from __future__ import annotations

import logging

# A library logs; the program that uses it decides what is shown (the `onnxprune` command: INFO on stdout).
logging.getLogger("onnxprune").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = ["__version__", "prune", "prune_model", "run_passes", "inspect_model", "export", "compress"]


def __getattr__(name: str):
    # Imported lazily: `import onnxprune` stays cheap and free of cycles with `passes`.
    if name in ("prune", "prune_model", "run_passes", "inspect_model"):
        from onnxprune import api

        return getattr(api, name)
    if name in ("export", "compress"):  # need torch
        from onnxprune.bayes import exporting

        return getattr(exporting, name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
