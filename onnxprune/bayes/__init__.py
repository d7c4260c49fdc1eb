"""Bayesian channel gates for PyTorch models: wrap, train with the ELBO, export with gates folded in.

    from onnxprune import bayes
    wrapped = bayes.wrap(model, example_inputs, method="sbp")
    loss = bayes.elbo(wrapped(x), y, wrapped, n_train=60000)
"""

from __future__ import annotations

__all__ = ["SBPGate", "BayesianModel", "wrap", "elbo", "fit", "export", "compress", "finetune_pruned", "METHODS"]


def __getattr__(name: str):
    # Lazy: importing onnxprune.bayes must not pull torch into `onnxprune prune`.
    if name == "SBPGate":
        from onnxprune.bayes.sbp import SBPGate

        return SBPGate
    if name in ("wrap", "BayesianModel"):
        from onnxprune.bayes import wrapper

        return getattr(wrapper, name)
    if name in ("elbo", "fit"):
        from onnxprune.bayes import training

        return getattr(training, name)
    if name in ("export", "compress"):
        from onnxprune.bayes import exporting

        return getattr(exporting, name)
    if name == "finetune_pruned":
        from onnxprune.bayes.finetune import finetune_pruned

        return finetune_pruned
    if name == "METHODS":
        from onnxprune.bayes.methods import METHODS

        return METHODS
    raise AttributeError(f"module 'onnxprune.bayes' has no attribute {name!r}")
