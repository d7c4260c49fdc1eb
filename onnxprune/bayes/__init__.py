"""Bayesian channel gates for PyTorch models: wrap, train with the ELBO, export with gates folded in.

    from onnxprune import bayes
    wrapped = bayes.wrap(model, example_inputs, method="sbp")
    loss = bayes.elbo(wrapped(x), y, wrapped, n_train=60000)

A gate of one's own subclasses :class:`ChannelGate` and is registered with
``register_method(name, gate_class)``; ``fit``'s options are :class:`FitConfig`'s fields.
"""

from __future__ import annotations

from onnxprune.lazy import lazy_getattr

__all__ = ["SBPGate", "ChannelGate", "BayesianModel", "wrap", "elbo", "fit", "FitConfig", "export", "compress",
           "finetune_pruned", "METHODS", "register_method"]

# Lazy: importing onnxprune.bayes must not pull torch into `onnxprune prune`.
_HOMES = {
    "SBPGate": "onnxprune.bayes.sbp",
    "ChannelGate": "onnxprune.bayes.gate",
    "wrap": "onnxprune.bayes.wrapper",
    "BayesianModel": "onnxprune.bayes.wrapper",
    "elbo": "onnxprune.bayes.training",
    "fit": "onnxprune.bayes.training",
    "FitConfig": "onnxprune.bayes.fit_config",
    "export": "onnxprune.bayes.exporting",
    "compress": "onnxprune.bayes.exporting",
    "finetune_pruned": "onnxprune.bayes.finetune",
    "METHODS": "onnxprune.bayes.methods",
    "register_method": "onnxprune.bayes.methods",
    "step_hooks": "onnxprune.bayes.loop",
}


__getattr__ = lazy_getattr(__name__, _HOMES)
