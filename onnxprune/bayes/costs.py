"""What a gated channel costs, in multiply-accumulates, and a KL term weighted by it.

The ELBO's KL term charges every channel the same, whatever its compute: on LeNet5 a neuron of
``fc1`` (810 MACs per image) is as expensive to keep as a filter of ``conv1`` (94,400). A prior
that is stronger where a channel costs more steers the posterior to the pruning that saves
compute. ``weight_kl_by_macs`` multiplies each channel group's KL by its cost per channel over
the mean cost of all gated channels (so the weights average 1 over the channels and
``kl_scale`` keeps its meaning); this is our choice, not the SBP paper's (docs/methods.md).

An attention head is one gate entry, at its value projection (see :mod:`onnxprune.bayes.grouping`):
it is charged its value rows, the output-projection columns reading them, its query and key rows
(layers left ungated, ``BayesianModel.contracted``) and its share of the attention products
(``Q K^T`` and ``P V``: ``2 S^2 head_dim`` MACs per head and example).

A functional layer gated on its weight (``BayesianModel.weight_sites``: ``nn.MultiheadAttention``'s
``in_proj_weight``, Swin's ``qkv.weight``) is charged through the graph node that reads the weight: a
leaf module or function (the whole attention) or a linear / convolution op (then with the ops and
layers its output reaches, up to the next layers). Each gate entry pays the share of those MACs that
its channels are of the weight's rows: a head of a packed q/k/v projection its three row blocks, so
``1 / heads`` of its attention's projections and products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from onnxprune.bayes.grouping import is_layer, layer_width
from onnxprune.bayes.weight_gates import WeightSiteInfo, weight_readers
from onnxprune.bayes.wrapper import BayesianModel


def layer_macs(model: nn.Module, example_inputs: tuple) -> dict[str, int]:
    """MACs of one example through each Conv/Linear module (and transformers' Conv1D), by module name (one
    forward pass)."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(module: nn.Module, inputs, output) -> None:
            batch = output.shape[0] if output.dim() > 1 else 1
            if isinstance(module, nn.Linear):
                per_example = output.numel() // batch * module.in_features
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                kernel = module.weight[0].numel()  # in_channels / groups * kernel size
                per_example = output.numel() // batch * kernel
            else:  # transformers' Conv1D: weight [in, out]
                per_example = output.numel() // batch * module.weight.shape[0]
            macs[name] = macs.get(name, 0) + int(per_example)
        return record

    for name, module in model.named_modules():
        if is_layer(module):
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


def _reached(start: fx.Node, modules: dict[str, nn.Module],
             looks_past: Callable[[fx.Node], bool] = lambda node: True) -> tuple[list[str], list[fx.Node]]:
    """The Conv/Linear modules that read ``start``'s output through other ops (and other gates), and those ops;
    an op for which ``looks_past`` is False is included but not looked past."""
    found, between, seen, todo = [], [], {start}, list(start.users)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and is_layer(modules.get(node.target)):
            found.append(node.target)
            continue
        between.append(node)
        if looks_past(node):
            todo.extend(node.users)
    return found, between


_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


class _NodeMacs(fx.Interpreter):
    """Runs a graph, counting the multiply-accumulates (matrix products, convolutions, attention) of ``nodes``."""

    def __init__(self, gm: fx.GraphModule, nodes: set[fx.Node]) -> None:
        super().__init__(gm)
        self.nodes = nodes
        self.macs: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node):
        if n not in self.nodes:
            return super().run_node(n)
        if n.op == "call_function" and n.target in _SDPA:  # the flop counter counts none of its CPU kernel
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            q, k, v = (list(args) + [kwargs.get(name) for name in ("query", "key", "value")[len(args):]])[:3]
            self.macs[n] = q.numel() // q.shape[-1] * k.shape[-2] * (q.shape[-1] + v.shape[-1])  # Q K^T and P V
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.macs[n] = counter.get_total_flops() // 2  # a flop counter counts a multiply-add as two
        return out


@contextlib.contextmanager
def _countable_attention() -> Iterator[None]:
    """Attention computed by ops a flop counter counts: ``nn.MultiheadAttention`` off its fused fast path and
    ``scaled_dot_product_attention`` on its math backend (matrix products)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _count_macs(wrapped: BayesianModel, example_inputs: tuple, nodes: set[fx.Node]) -> dict[fx.Node, float]:
    """MACs per example of each of ``nodes`` in one evaluation-mode pass of ``wrapped``'s graph."""
    if not nodes:
        return {}
    traced = wrapped.model
    counter = _NodeMacs(traced, nodes)
    was_training = traced.training
    traced.eval()
    try:
        with torch.no_grad(), _countable_attention():
            counter.run(*example_inputs)
    finally:
        traced.train(was_training)
        wrapped.bank.clear()
    first = example_inputs[0]
    batch = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() > 1 else 1
    return {n: m / batch for n, m in counter.macs.items()}


def _contraction_macs(wrapped: BayesianModel, example_inputs: tuple, nodes: dict[str, fx.Node]) -> dict[str, float]:
    """Per gate name: the MACs per example of the parameter-free ops between its query / key layers and the next
    layers (the attention products ``Q K^T`` and ``P V``), per gate entry."""
    traced = wrapped.model
    modules = dict(traced.named_modules())
    between: dict[str, set[fx.Node]] = {}
    for layer, parts in wrapped.contracted.items():
        ops = set(_reached(nodes[layer], modules)[1])
        for key, _, _ in parts:
            between.setdefault(key, set()).update(ops)
    if not between:
        return {}
    counted = _count_macs(wrapped, example_inputs, set().union(*between.values()))
    return {key: sum(counted.get(n, 0) for n in ops) / wrapped.gates[key].num_channels for key, ops in between.items()}


_LAYER_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.ops.aten.linear.default, torch.ops.aten.conv1d.default,
                    torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default, torch.ops.aten.convolution.default}


def _applies_layer(node: fx.Node) -> bool:
    """True for a graph node that is one linear / convolution op (not a module or function around it)."""
    return node.op == "call_function" and node.target in _LAYER_FUNCTIONS


def _reached_ops(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[str], set[fx.Node]]:
    """The layer modules ``start``'s output reaches through other ops, and those ops: linear / convolution ops
    reached are included and not looked past (they are the next layers)."""
    found, ops = _reached(start, modules, lambda node: not _applies_layer(node))
    return found, set(ops)


def _site_ops(site: WeightSiteInfo, traced: fx.GraphModule, modules: dict[str, nn.Module]) -> tuple[set[fx.Node], list[str]] | None:
    """The nodes whose MACs a functional layer's gate entries share, and the layer modules they reach (see the
    module docstring); None for query / key rows read by a whole attention op (charged in its values' share)."""
    readers = weight_readers(traced, site.weight)
    if not site.gated:
        return (set(readers), []) if readers and all(_applies_layer(r) for r in readers) else None
    ops, consumers = set(readers), []
    for reader in readers:
        if _applies_layer(reader):
            found, reached = _reached_ops(reader, modules)
            ops |= reached
            consumers += found
    return ops, consumers


def _entry_channels(site: WeightSiteInfo) -> dict[str, float]:
    """Per gate name: how many of the weight's rows one of its entries holds (gated and contracted)."""
    rows: dict[str, float] = {}
    for key, _, positions in site.parts + site.contracted:
        rows[key] = rows.get(key, 0.0) + positions.numel() / max(1, positions.unique().numel())
    return rows


def _weight_site_costs(wrapped: BayesianModel, example_inputs: tuple, macs: dict[str, int]) -> dict[str, float]:
    """Per gate name: the MACs per example one entry costs in the functional layers (``weight_sites``)."""
    traced = wrapped.model
    modules = dict(traced.named_modules())
    plans = [(site, found) for site in wrapped.weight_sites if (found := _site_ops(site, traced, modules)) is not None]
    counted = _count_macs(wrapped, example_inputs, set().union(*(ops for _, (ops, _) in plans)))
    costs: dict[str, float] = {}
    for site, (ops, consumers) in plans:
        total = sum(counted.get(n, 0) for n in ops) + sum(macs.get(c, 0) for c in consumers)
        for key, rows in _entry_channels(site).items():
            costs[key] = costs.get(key, 0.0) + total * rows / site.width
    return costs


def channel_costs(wrapped: BayesianModel, example_inputs: tuple | torch.Tensor) -> dict[str, float]:
    """MACs per example that one channel (gate entry) of each gate group costs: the producing layer's MACs per
    output channel plus, per channel, the MACs of the Conv/Linear layers that read it (through activations,
    pooling, flatten, residual adds); a gate entry covering several channels of a site (an attention head at its
    value projection) is charged all of them, and a head also its query and key rows and its share of the
    attention products; a functional layer's gate entries their share of the ops reading its weight (module
    docstring). An estimate: a channel shared by concatenation is charged its consumers' MACs over the
    site's width (less its packed query and key channels, read by the attention product only)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    traced = wrapped.model
    modules = dict(traced.named_modules())
    macs = layer_macs(traced, example_inputs)
    nodes = {n.target: n for n in traced.graph.nodes if n.op == "call_module"}
    costs: dict[str, float] = {}
    for site in wrapped.sites:
        module = modules[site.name]
        width = module.channels
        consumers, _ = _reached(nodes[site.name], modules)
        produced = is_layer(modules.get(site.layer)) and site.layer not in consumers  # not an input gate
        own = macs.get(site.layer, 0) / width if produced else 0.0
        downstream = sum(macs.get(c, 0) for c in consumers) / max(1, width - site.contracted_width)
        for i, group in enumerate(site.groups):
            positions = getattr(module, f"positions_{i}")
            per_entry = positions.numel() / max(1, positions.unique().numel())  # channels of the site per entry
            costs[group] = max(costs.get(group, 0.0), (own + downstream) * per_entry)
    for layer, parts in wrapped.contracted.items():  # query / key rows of heads gated at their values
        per_channel = macs.get(layer, 0) / layer_width(modules[layer])
        for key, channels, _ in parts:
            if key in costs:
                costs[key] += per_channel * channels.numel() / wrapped.gates[key].num_channels
    for key, extra in _contraction_macs(wrapped, example_inputs, nodes).items():
        if key in costs:
            costs[key] += extra
    for key, extra in _weight_site_costs(wrapped, example_inputs, macs).items():
        if key in wrapped.gates:
            costs[key] = costs.get(key, 0.0) + extra
    return costs


def weight_kl_by_macs(wrapped: BayesianModel, example_inputs: tuple | torch.Tensor) -> dict[str, float]:
    """Set (and return) each group's KL weight to its channels' MAC cost over the mean over all gated channels."""
    costs = channel_costs(wrapped, example_inputs)
    sizes = {key: gate.num_channels for key, gate in wrapped.gates.items() if key in costs}
    mean = sum(costs[k] * sizes[k] for k in sizes) / max(1, sum(sizes.values()))
    weights = {k: (costs[k] / mean if mean > 0 else 1.0) for k in sizes}
    wrapped.bank.kl_weights = dict(weights)
    return weights
