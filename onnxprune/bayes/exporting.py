"""Exporting a wrapped model to ONNX with its gates folded in (rejected channels become exact zeros)."""

from __future__ import annotations

import copy
import json
import os

import onnx
import torch
import torch.fx as fx
from torch import nn

from onnxprune.bayes.grouping import is_hf_conv1d
from onnxprune.bayes.weight_gates import fold_weight_gates
from onnxprune.bayes.wrapper import BayesianModel, GateSite
from onnxprune.errors import InputError


class ChannelScale(nn.Module):
    """x * scale along one axis (a gate that cannot be folded into the layer before it)."""

    def __init__(self, scale: torch.Tensor, channel_axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.channel_axis = channel_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_axis % x.dim()] = -1
        return x * self.scale.reshape(shape)


@torch.no_grad()
def fold_gates(wrapped: BayesianModel) -> fx.GraphModule:
    """A plain module computing ``wrapped``'s evaluation-mode function with every gate folded in.

    A gate at the end of layer -> [BatchNorm] -> [ReLU-like activation] multiplies
    the BatchNorm's scale and shift (or the layer's weight rows, a transformers
    Conv1D's columns, and bias) by
    E[theta] * mask; a pre-bias gate multiplies the weight rows only; other gates
    become a constant per-channel multiply. A gate on a functional layer's weight
    (:mod:`onnxprune.bayes.weight_gates`) is folded into that weight's rows and bias.
    """
    wrapped.bank.clear()  # sampled thetas from the last training step are not part of the model
    m = copy.deepcopy(wrapped).eval()
    gm = m.model
    for site in m.sites:
        module: GateSite = gm.get_submodule(site.name)
        g = module.gate_vector(1)
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == site.name)
        if site.foldable:
            target = gm.get_submodule(site.norm) if site.norm else gm.get_submodule(site.layer)
            shape = [-1] + [1] * (target.weight.dim() - 1)
            if is_hf_conv1d(target):  # transformers' Conv1D: weight [in, out], a channel is a column
                shape = [1, -1]
            target.weight.mul_(g.reshape(shape).to(target.weight.dtype))
            if site.pre_bias:
                pass  # theta * (W x) + b: the bias stays
            elif target.bias is not None:
                target.bias.mul_(g.to(target.bias.dtype))
            elif not site.norm:
                target.bias = nn.Parameter(torch.zeros(g.shape[-1], dtype=target.weight.dtype))
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            delattr(gm, site.name)
        else:
            setattr(gm, site.name, ChannelScale(g.detach().clone(), module.channel_axis))
    fold_weight_gates(gm, m.weight_sites)
    gm.graph.lint()
    gm.recompile()
    return gm


@torch.no_grad()
def gate_summary(wrapped: BayesianModel) -> dict:
    """Per gated group: its layers, channels, channels kept, and per-channel E[theta] and SNR."""
    out = {}
    for name, gate in wrapped.gates.items():
        entry = {"layers": wrapped.group_layers.get(name, []), "channels": gate.num_channels,
                 "kept": int((gate.deterministic() != 0).sum())}
        for statistic, values in (("expected", gate.expected()), ("snr", gate.snr())):
            if values is not None:  # None: the gate has no such statistic (ChannelGate's default)
                entry[statistic] = [round(float(v), 6) for v in values.tolist()]
        out[name] = entry
    return out


def export(wrapped: BayesianModel, example_inputs, path: str | os.PathLike[str] | None = None, *,
           finetuned: nn.Module | None = None, exporter: str = "dynamo") -> onnx.ModelProto:
    """ONNX of ``wrapped`` in evaluation mode, gates folded in; per-gate E[theta] and SNR in metadata_props.
    ``finetuned``: the gate-folded net trained further (``finetune_pruned``), exported in its place with
    ``wrapped``'s record of the gates. ``exporter``: "dynamo" or "torchscript" (``torch_export.export_onnx``)."""
    from onnxprune.modelio import save_model
    from onnxprune.torch_export import export_onnx

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if exporter == "torchscript" and wrapped.captured_by == "export":
        raise InputError(f"{type(wrapped.model).__name__} was captured with torch.export, whose graph reads its sizes "
                         "from the input: the TorchScript tracer would fix them; export it with exporter=\"dynamo\"")
    plain = (finetuned if finetuned is not None else fold_gates(wrapped)).cpu().eval()
    example = example_inputs[0].cpu() if len(example_inputs) == 1 else tuple(t.cpu() for t in example_inputs)
    model = export_onnx(plain, example, exporter=exporter)
    model.metadata_props.add(key="onnxprune.method", value=wrapped.method)
    model.metadata_props.add(key="onnxprune.gates", value=json.dumps(gate_summary(wrapped), separators=(",", ":")))
    if path is not None:
        save_model(model, path)
    return model


def compress(wrapped: BayesianModel, example_inputs, path: str | os.PathLike[str] | None = None, *,
             exporter: str = "dynamo", **prune_options) -> onnx.ModelProto:
    """Export with gates folded in (``exporter`` as in :func:`export`), then delete the rejected channels
    (``onnxprune.prune`` options apply)."""
    from onnxprune.api import prune

    return prune(export(wrapped, example_inputs, exporter=exporter), output=path, **prune_options)
