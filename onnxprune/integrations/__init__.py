"""Adapters to other training frameworks (opt-in extras, imported on first use).

``onnxprune.integrations.huggingface``: a Hugging Face ``Trainer`` callback and ELBO loss
(``pip install 'onnxprune[huggingface]'``).
"""

from __future__ import annotations

import importlib

__all__ = ["BayesianPruningCallback", "elbo_loss"]

# Lazy: importing onnxprune.integrations must not import transformers.
_HOMES = {
    "BayesianPruningCallback": "onnxprune.integrations.huggingface",
    "elbo_loss": "onnxprune.integrations.huggingface",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'onnxprune.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
