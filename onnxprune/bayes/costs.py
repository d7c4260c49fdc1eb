"""What a gated channel costs, in multiply-accumulates, and a KL term weighted by it.

The ELBO's KL term charges every channel the same, whatever its compute: on LeNet5 a neuron of
``fc1`` (810 MACs per image) is as expensive to keep as a filter of ``conv1`` (94,400). A prior
that is stronger where a channel costs more steers the posterior to the pruning that saves
compute. ``weight_kl_by_macs`` multiplies each channel group's KL by its cost per channel over
the mean cost of all gated channels (so the weights average 1 over the channels and
``kl_scale`` keeps its meaning); this is our choice, not the SBP paper's (docs/methods.md).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from onnxprune.bayes.wrapper import BayesianModel

_PARAMETRIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_macs(model: nn.Module, example_inputs: tuple) -> dict[str, int]:
    """MACs of one example through each Conv/Linear module, by module name (one forward pass)."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            batch = output.shape[0] if output.dim() > 1 else 1
            if isinstance(module, nn.Linear):
                per_example = output.numel() // batch * module.in_features
            else:
                kernel = module.weight[0].numel()  # in_channels / groups * kernel size
                per_example = output.numel() // batch * kernel
            macs[name] = macs.get(name, 0) + int(per_example)
        return record

    for name, module in model.named_modules():
        if isinstance(module, _PARAMETRIC):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return macs


def _consumers(graph: fx.Graph, start: fx.Node, modules: dict[str, nn.Module]) -> list[str]:
    """The Conv/Linear modules that read ``start``'s output through parameter-free ops (and other gates)."""
    found, seen, todo = [], {start}, list(start.users)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(modules.get(node.target), _PARAMETRIC):
            found.append(node.target)
            continue
        todo.extend(node.users)
    return found


def channel_costs(wrapped: BayesianModel, example_inputs: tuple | torch.Tensor) -> dict[str, float]:
    """MACs per example that one channel of each gate group costs: the producing layer's MACs per output
    channel plus, per channel, the MACs of the Conv/Linear layers that read it (through activations,
    pooling, flatten, residual adds). An estimate: a channel shared by concatenation is charged its
    consumers' MACs over the site's width."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    traced = wrapped.model
    modules = dict(traced.named_modules())
    macs = layer_macs(traced, example_inputs)
    nodes = {n.target: n for n in traced.graph.nodes if n.op == "call_module"}
    costs: dict[str, float] = {}
    for site in wrapped.sites:
        width = modules[site.name].channels
        consumers = _consumers(traced.graph, nodes[site.name], modules)
        produced = isinstance(modules.get(site.layer), _PARAMETRIC) and site.layer not in consumers  # not an input gate
        own = macs.get(site.layer, 0) / width if produced else 0.0
        downstream = sum(macs.get(c, 0) for c in consumers) / width
        for group in site.groups:
            costs[group] = max(costs.get(group, 0.0), own + downstream)
    return costs


def weight_kl_by_macs(wrapped: BayesianModel, example_inputs: tuple | torch.Tensor) -> dict[str, float]:
    """Set (and return) each group's KL weight to its channels' MAC cost over the mean over all gated channels."""
    costs = channel_costs(wrapped, example_inputs)
    sizes = {key: gate.num_channels for key, gate in wrapped.gates.items() if key in costs}
    mean = sum(costs[k] * sizes[k] for k in sizes) / max(1, sum(sizes.values()))
    weights = {k: (costs[k] / mean if mean > 0 else 1.0) for k in sizes}
    wrapped.bank.kl_weights = dict(weights)
    return weights
