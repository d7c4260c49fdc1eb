"""Adapters to other training frameworks (opt-in extras, imported on first use).

``onnxprune.integrations.huggingface``: a Hugging Face ``Trainer`` callback and ELBO loss
(``pip install 'onnxprune[huggingface]'``).
"""

from __future__ import annotations

from onnxprune.lazy import lazy_getattr

__all__ = ["BayesianPruningCallback", "elbo_loss"]

# Lazy: importing onnxprune.integrations must not import transformers.
_HOMES = {
    "BayesianPruningCallback": "onnxprune.integrations.huggingface",
    "elbo_loss": "onnxprune.integrations.huggingface",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
