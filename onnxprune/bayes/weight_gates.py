"""Gates on a weight: the channels of a layer applied functionally, gated where the weight is read.

Some layers are applied outside a module call: ``nn.MultiheadAttention`` passes its packed
``in_proj_weight`` and ``in_proj_bias`` to ``F.multi_head_attention_forward``, torchvision's Swin passes
``qkv.weight`` and ``qkv.bias`` to ``shifted_window_attention``. No graph node carries their output, so a
gate cannot follow the layer. It sits on the parameters instead: a :class:`WeightGate` multiplies output
row ``c`` of the weight and entry ``c`` of its bias by the gate of channel ``c`` (1 where ungated).
``g (W x + b) = (g W) x + g b``, so this is the output gate ``theta * (W x + b)`` whatever code reads the
weight; a rejected channel (``theta = 0``) has zero weights and bias and is exactly zero: for an attention
head gated at its value rows, the head's output is zero whatever its queries and keys.

The gate goes into the graph where the weight is read: after each ``get_attr`` node of the parameter
(Swin's wrapped function, any graph captured by torch.export), or, for a leaf module that reads it inside
its own call (``nn.MultiheadAttention`` under torch.fx), around that call: a :class:`GatedCall` runs the
module with the gated tensors in place of its parameters (``torch.func.functional_call``). The parameters
stay where they are, plain ``nn.Parameter`` objects that train as before.

One sample of a weight's gates serves a whole minibatch (a weight is shared by the examples): the bank
draws those groups as with ``noise="batch"`` (:class:`~onnxprune.bayes.wrapper.GateBank`). The export
folds the gates into the parameters and takes them out of the graph (:func:`fold_weight_gates`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from onnxprune.bayes.grouping import WeightChannels

Parts = list[tuple[str, torch.Tensor, torch.Tensor]]  # (gate name, channels, positions in the gate)


class GatedChannels(nn.Module):
    """The gate value of each of a layer's ``channels`` output channels: the gates of the groups they belong to
    (``parts``), 1 for ungated channels."""

    def __init__(self, bank: nn.Module, parts: Parts, channels: int) -> None:
        super().__init__()
        self._bank = [bank]  # a reference, not a submodule: the bank is registered once, by the model
        self.groups = [key for key, _, _ in parts]
        self.channels = channels
        for i, (_, ch, pos) in enumerate(parts):
            self.register_buffer(f"channels_{i}", torch.as_tensor(ch, dtype=torch.long).clone(), persistent=False)
            self.register_buffer(f"positions_{i}", torch.as_tensor(pos, dtype=torch.long).clone(), persistent=False)

    def gate_vector(self, batch: int) -> torch.Tensor:
        """[batch, C] while training (one sample per example; [1, C] when shared), [C] in evaluation."""
        out = None
        for i, key in enumerate(self.groups):
            theta = self._bank[0].theta(key, batch)
            if out is None:
                out = torch.ones((*theta.shape[:-1], self.channels), dtype=theta.dtype, device=theta.device)
            values = theta.index_select(-1, getattr(self, f"positions_{i}"))
            out = out.index_copy(out.dim() - 1, getattr(self, f"channels_{i}"), values)
        return out


class WeightGate(GatedChannels):
    """Multiplies a weight (output channels first) or its bias, entry ``c`` on the first axis, by the gate of output
    channel ``c`` (one sample per minibatch in training, E[theta] * mask in evaluation)."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        g = self.gate_vector(1)
        g = g.reshape(g.shape[-1], *[1] * (tensor.dim() - 1))
        return tensor * g.to(tensor.dtype)


class GatedCall(nn.Module):
    """Calls a module, given as the first argument, with some of its parameters gated: ``gates`` maps a
    parameter's name inside the module to its :class:`WeightGate` (``torch.func.functional_call``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList()
        self.names: list[str] = []

    def add(self, name: str, gate: WeightGate) -> None:
        self.names.append(name)
        self.gates.append(gate)

    def forward(self, module: nn.Module, *args, **kwargs):
        tensors = {name: gate(module.get_parameter(name)) for name, gate in zip(self.names, self.gates)}
        return torch.func.functional_call(module, tensors, args, kwargs)


@dataclass
class WeightSiteInfo:
    """A functional layer of a wrapped model: its weight (and bias) path in the graph module, the gates of the
    channels gated on it (``parts``) and of its channels gated elsewhere (``contracted``: queries and keys of a
    head gated at its values), as ``(gate name, channels, positions)``; ``gate``: the path of its
    :class:`WeightGate` in the graph module (None when nothing is gated on it)."""

    weight: str
    bias: str | None
    width: int
    parts: Parts = field(default_factory=list)
    contracted: Parts = field(default_factory=list)
    gate: str | None = None

    @property
    def groups(self) -> list[str]:
        """The gates of the channels gated on this weight."""
        return [key for key, _, _ in self.parts]

    @property
    def gated(self) -> bool:
        return bool(self.parts)

    @property
    def parameters(self) -> list[str]:
        """The paths of its weight and bias."""
        return [self.weight] + ([self.bias] if self.bias is not None else [])


def holds_parameter(root: nn.Module, path: str) -> bool:
    """True when ``root`` has a parameter at ``path`` (a graph module keeps only those its graph reads)."""
    try:
        root.get_parameter(path)
    except AttributeError:
        return False
    return True


def _leaf_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The path of the module a ``call_module`` node runs (for a :class:`GatedCall`, the module it is given)."""
    if node.op != "call_module":
        return None
    if isinstance(gm.get_submodule(node.target), GatedCall):
        return node.args[0].target
    return node.target


def weight_site(gm: fx.GraphModule, bank: nn.Module, channels: WeightChannels, names: dict[int, str],
                index: int) -> WeightSiteInfo:
    """Gate functional layer ``channels`` of ``gm`` on its weight and bias where it has gated channels: a
    :class:`WeightGate` after their ``get_attr`` nodes, a :class:`GatedCall` around a leaf module reading them."""
    width = int(gm.get_parameter(channels.module).shape[0])
    parts = [(names[g], torch.as_tensor(ch), torch.as_tensor(pos)) for g, ch, pos in channels.parts if g in names]
    contracted = [(names[g], torch.as_tensor(ch), torch.as_tensor(pos)) for g, ch, pos in channels.contracted if g in names]
    site = WeightSiteInfo(channels.module, channels.bias, width, parts, contracted)
    if not parts:
        return site
    gate = WeightGate(bank, parts, width)
    for node in list(gm.graph.nodes):
        for path in site.parameters:
            if node.op == "get_attr" and node.target == path:
                if site.gate != f"weight_gate_{index}":
                    site.gate = f"weight_gate_{index}"
                    gm.add_submodule(site.gate, gate)
                with gm.graph.inserting_after(node):
                    gated = gm.graph.call_module(site.gate, (node,))
                node.replace_all_uses_with(gated, delete_user_cb=lambda user, gated=gated: user is not gated)
            elif (leaf := _leaf_of(gm, node)) is not None and path.startswith(f"{leaf}."):
                call = _gated_call(gm, node, leaf)
                call.add(path[len(leaf) + 1:], gate)
                site.gate = site.gate or f"{node.target}.gates.{len(call.gates) - 1}"
    return site


def _gated_call(gm: fx.GraphModule, node: fx.Node, leaf: str) -> GatedCall:
    """The :class:`GatedCall` that ``node`` (a call of module ``leaf``) runs, made on first use: the node then
    calls it with the module, read by a ``get_attr`` node (so that the graph module keeps it at its path)."""
    module = gm.get_submodule(node.target)
    if isinstance(module, GatedCall):
        return module
    name = f"gated_call_{sum(isinstance(m, GatedCall) for m in gm.children())}"
    gm.add_submodule(name, GatedCall())
    with gm.graph.inserting_before(node):
        held = gm.graph.get_attr(leaf)
    node.target = name
    node.args = (held, *node.args)
    return gm.get_submodule(name)


@torch.no_grad()
def fold_weight_gates(gm: fx.GraphModule, sites: list[WeightSiteInfo]) -> None:
    """Fold every weight gate of ``gm`` into its weight and bias (its current value: E[theta] * mask in evaluation)
    and take the gates out of the graph, leaving plain parameters read as before."""
    for site in sites:
        if site.gate is None:
            continue
        g = gm.get_submodule(site.gate).gate_vector(1).detach()
        for path in site.parameters:
            p = gm.get_parameter(path)
            p.mul_(g.reshape(g.shape[-1], *[1] * (p.dim() - 1)).to(p.dtype))
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, WeightGate):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif isinstance(module, GatedCall):
            held = node.args[0]
            node.target, node.args = held.target, node.args[1:]
            gm.graph.erase_node(held)
    for name in [n for n, m in gm.named_children() if isinstance(m, (WeightGate, GatedCall))]:
        delattr(gm, name)


def weight_readers(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The graph nodes that read parameter ``path`` (through its gate, if any): the users of its ``get_attr``
    nodes, or the call of the (leaf) module holding it."""
    found: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == path:
            for user in node.users:
                gated = user.op == "call_module" and isinstance(gm.get_submodule(user.target), WeightGate)
                found.extend(u for u in (user.users if gated else [user]) if u not in found)
        elif (leaf := _leaf_of(gm, node)) is not None and path.startswith(f"{leaf}."):
            found.append(node)
    return found
