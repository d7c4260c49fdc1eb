"""Which channels of a PyTorch model share a gate: the ONNX engine's own channel groups.

The model is exported to ONNX once, analysed by the same channel engine that
later deletes the channels, and every Conv/Linear module is matched to its ONNX
Conv/Gemm/MatMul node by call order (the exporter emits one node per call, in
order). A module's output channels then map to engine *components*; coupled
channels (a residual Add, a Concat, a depthwise Conv) are one component, so
they get one gate and a rejected channel is deletable everywhere. Channels that
reach an attention contraction (queries, keys) are not gated at their layer: the
head they belong to is gated at its value projection (:class:`ModuleChannels`).

The layers are Conv1d/2d/3d, Linear and Hugging Face transformers' ``Conv1D``
(GPT-2's layers: a Linear whose weight is stored [in, out]), recognised without
importing transformers (:func:`is_hf_conv1d`), and *functional* layers: a parameter
applied by ``F.linear``/``F.conv*`` outside any layer module's call
(``nn.MultiheadAttention``'s ``in_proj_weight``, the ``qkv.weight`` torchvision's Swin
passes to ``shifted_window_attention``), found in the model's ATen graph
(:func:`functional_layers`) and matched to their ONNX layer by value
(:class:`WeightChannels`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from onnxprune.channels.analysis import ChannelAnalysis

logger = logging.getLogger(__name__)

LAYER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # and transformers' Conv1D: see is_layer


def is_hf_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face transformers' ``Conv1D`` (weight [in, out], ``x @ W + b``). Its class is looked up
    in ``sys.modules``: a model holding one has imported transformers, and this library never imports it."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return cls is not None and isinstance(module, cls)


def is_layer(module: nn.Module) -> bool:
    """A layer whose output channels can be gated: Conv1d/2d/3d, Linear or transformers' Conv1D."""
    return isinstance(module, LAYER_MODULES) or is_hf_conv1d(module)


def layer_width(module: nn.Module) -> int:
    """Output channels of a layer (:func:`is_layer`)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return int(module.weight.shape[1])  # Conv1D: [in, out]


def output_major(module: nn.Module) -> torch.Tensor:
    """A layer's weight with its output channels first (transformers' Conv1D stores it [in, out])."""
    return module.weight.t() if is_hf_conv1d(module) else module.weight


@dataclass
class ModuleChannels:
    """A Conv/Linear module's output channels as engine components.

    ``parts`` holds, per channel group the layer writes to: (group index, the
    layer's output channels in it, their positions in the group's gate).
    Channels that can never be removed (pinned) are in no part.

    ``contracted`` holds, in the same form, the channels that reach an attention
    contraction (queries, keys: ``ChannelAnalysis.contracted_outputs``). They are
    not gated here but where their group's values are produced: a head is dead
    when its values are, and a gate on queries or keys would scale the attention
    logits by theta^2 in training. A packed q/k/v projection has both kinds.
    ``contracted_width`` counts the layer's channels that reach a contraction,
    gated or pinned.
    """

    module: str
    onnx_node: str
    parts: list[tuple[int, np.ndarray, np.ndarray]]
    contracted: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    contracted_width: int = 0

    @property
    def groups(self) -> list[int]:
        """The groups of the channels gated at this layer."""
        return [g for g, _, _ in self.parts]

    @property
    def all_groups(self) -> list[int]:
        """Every group the layer writes to (gated here or, for contracted channels, elsewhere)."""
        return list(dict.fromkeys(g for g, _, _ in self.parts + self.contracted))


@dataclass
class WeightChannels(ModuleChannels):
    """A functional layer's output channels (:class:`ModuleChannels` of a weight applied by ``F.linear`` or
    ``F.conv*`` outside a layer module's call): ``module`` is the weight parameter's path, ``bias`` its bias's
    (None: the layer has none). Its output channels are the weight's rows."""

    bias: str | None = None


@dataclass
class Grouping:
    """The engine's channel groups as seen from the PyTorch modules (and functional layers' weights)."""

    analysis: ChannelAnalysis
    modules: dict[str, ModuleChannels]
    group_sizes: dict[int, int]  # gated components per group
    group_names: dict[int, str]
    weights: dict[str, WeightChannels] = field(default_factory=dict)  # by weight path

    def channels(self, name: str) -> ModuleChannels:
        """The channels of layer module ``name`` or of the functional layer whose weight is at ``name``."""
        return self.modules[name] if name in self.modules else self.weights[name]


def _layer_nodes(model, graph) -> list:
    """ONNX Conv/Gemm/MatMul nodes with constant weights, in the exporter's order (one per module call).

    The order is read from the exported proto: the analysed graph is re-sorted
    topologically, which may swap independent branches.
    """
    from onnxprune.graphutil import constant_value

    by_name = {n.name: n for n in graph.nodes}
    nodes = (by_name.get(n.name) for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    return [n for n in nodes if n is not None and len(n.inputs) > 1 and constant_value(n.inputs[1]) is not None]


def _rows(weight: np.ndarray) -> np.ndarray:
    """A weight as [output channels, rest], each row scaled to unit length and sign-free (a BatchNorm folded
    into a Conv by the exporter scales its rows)."""
    rows = np.abs(weight.reshape(weight.shape[0], -1).astype(np.float64))
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


def _onnx_rows(node) -> np.ndarray | None:
    """The ONNX layer's weight as [output channels, rest] (Gemm with transB, MatMul [in, out] transposed)."""
    from onnxprune.graphutil import constant_value

    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim < 2:
        return None
    if node.op == "MatMul" or (node.op == "Gemm" and not node.attrs.get("transB", 0)):
        weight = weight.reshape(-1, weight.shape[-1]).T
    return _rows(weight)


def match_by_weights(model: nn.Module, order: list[str], nodes: list) -> tuple[list[str], list]:
    """The (module, ONNX layer) pairs whose weights agree row by row, in call order; modules without a match
    and ONNX layers without a module (weights used outside a module call) are left out, so never gated."""
    return _match_rows([(name, output_major(model.get_submodule(name))) for name in order], nodes)


def _match_rows(weights: list[tuple[str, torch.Tensor]], nodes: list) -> tuple[list[str], list]:
    """The (name, ONNX layer) pairs whose weights (output channels first) agree row by row, in ``weights``'
    order; names and layers without a match are left out."""
    onnx_rows = [_onnx_rows(n) for n in nodes]
    matched_modules, matched_nodes, used = [], [], set()
    for name, weight in weights:
        rows = _rows(weight.detach().cpu().numpy())
        for i, candidate in enumerate(onnx_rows):
            if i in used or candidate is None or candidate.shape != rows.shape:
                continue
            if np.allclose(candidate, rows, rtol=1e-4, atol=1e-6):
                used.add(i)
                matched_modules.append(name)
                matched_nodes.append(nodes[i])
                break
    return matched_modules, matched_nodes


def module_call_order(model: nn.Module, example_inputs: tuple) -> list[str]:
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if is_layer(m)
    ]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order


def _export_for_analysis(model: nn.Module, example_inputs: tuple):
    """The model in ONNX for the channel analysis, and its analysis: the TorchScript exporter (several times
    faster), or the dynamo one where TorchScript cannot export the model, where the model has a transformers
    ``Conv1D`` (TorchScript writes its ``x.view(-1, x.size(-1))`` as a Shape read of the channel count), or where
    the TorchScript export leaves the engine barriers the dynamo export does not (attention: TorchScript splits
    packed projections and sizes masks in ways the engine cannot always follow)."""
    from onnxprune.api import inspect_model
    from onnxprune.torch_export import export_onnx

    example = example_inputs[0] if len(example_inputs) == 1 else example_inputs
    if not any(is_hf_conv1d(m) for m in model.modules()):
        try:
            traced = export_onnx(model, example, exporter="torchscript")
        except Exception as exc:  # noqa: BLE001 - any TorchScript failure: the dynamo exporter may still export it
            logger.info("TorchScript exporter failed on %s (%s); analysing the dynamo export", type(model).__name__,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        else:
            analysis = inspect_model(traced)[0]
            if not analysis.barriers:
                return traced, analysis
            dynamo = export_onnx(model, example, exporter="dynamo")
            other = inspect_model(dynamo)[0]
            return (dynamo, other) if _free_components(other) > _free_components(analysis) else (traced, analysis)
    dynamo = export_onnx(model, example, exporter="dynamo")
    return dynamo, inspect_model(dynamo)[0]


def _free_components(analysis: ChannelAnalysis) -> int:
    """How many components the analysis leaves free to gate (not pinned)."""
    return int((~analysis.pinned).sum())


def _module_parts(analysis: ChannelAnalysis, out: str, gate_position: dict[int, dict[int, int]]) -> tuple[list, list]:
    """A layer's output ``out`` as (group, channels, gate positions) parts: those gated at the layer, and those
    reaching an attention contraction (gated where their group's values are produced)."""
    comps = analysis.components_of(out)
    groups = analysis.group_of_component[comps]
    contracted = analysis.contracted_outputs.get(out, np.zeros(comps.size, dtype=bool))
    parts, elsewhere = [], []
    for g in dict.fromkeys(int(v) for v in groups):  # first-seen order
        channels = np.flatnonzero(groups == g)
        position = np.array([gate_position[g].get(int(c), -1) for c in comps[channels]], dtype=np.int64)
        free = position >= 0
        for found, keep in ((parts, free & ~contracted[channels]), (elsewhere, free & contracted[channels])):
            if keep.any():
                found.append((g, channels[keep], position[keep]))
    return parts, elsewhere


def channel_grouping(model: nn.Module, example_inputs: tuple) -> Grouping:
    """Export ``model`` (eval mode), analyse it, and map each Conv/Linear (and functional layer) to its channel
    group."""
    was_training = model.training
    model.eval()
    try:
        dense, analysis = _export_for_analysis(model, example_inputs)
        order = module_call_order(model, example_inputs)
    finally:
        model.train(was_training)
    nodes = _layer_nodes(dense, analysis.graph)
    if len(set(order)) != len(order):
        raise ValueError("a Conv/Linear module is called more than once; shared layers cannot be gated per call")
    gate_position = _gate_positions(analysis)
    weights: dict[str, WeightChannels] = {}
    if len(nodes) != len(order):  # layers used as plain weights (attention's packed projections): match by value
        matched_order, matched_nodes = match_by_weights(model, order, nodes)
        rest = [n for n in nodes if not any(n is m for m in matched_nodes)]
        weights = _functional_channels(model, example_inputs, order, rest, analysis, gate_position)
        order, nodes = matched_order, matched_nodes
    modules = {}
    for name, node in zip(order, nodes):
        found = _layer_channels(analysis, node, gate_position)
        if found is not None:
            modules[name] = ModuleChannels(name, node.name, *found)
    sizes = {g: len(p) for g, p in gate_position.items() if p}
    names = {g.index: g.name for g in analysis.groups}
    return Grouping(analysis, modules, sizes, names, weights)


def _gate_positions(analysis: ChannelAnalysis) -> dict[int, dict[int, int]]:
    """Per group, its gated components (not pinned by a graph input/output or an uncovered op) -> their position
    in the group's gate, in group order."""
    gate_position: dict[int, dict[int, int]] = {}
    for group in analysis.groups:
        free = [int(c) for c in group.components if not analysis.pinned[c]]
        gate_position[group.index] = {c: i for i, c in enumerate(free)}
    return gate_position


def _layer_channels(analysis: ChannelAnalysis, node, gate_position: dict[int, dict[int, int]]) -> tuple | None:
    """(parts, contracted, contracted width) of ONNX layer ``node``'s output, or None when it has no free channel."""
    out = node.outputs[0].name
    if analysis.ctx.tracked(out) is None:
        return None
    parts, contracted = _module_parts(analysis, out, gate_position)
    if not (parts or contracted):
        return None
    width = int(analysis.contracted_outputs[out].sum()) if out in analysis.contracted_outputs else 0
    return parts, contracted, width


def _functional_channels(model: nn.Module, example_inputs: tuple, order: list[str], rest: list, analysis: ChannelAnalysis,
                         gate_position: dict[int, dict[int, int]]) -> dict[str, WeightChannels]:
    """The channels of the functional layers among the ONNX layers ``rest`` (matched to no called module), by
    weight path: only looked for (one ``torch.export`` of the model) when some of them have free channels."""
    if not any(_layer_channels(analysis, n, gate_position) is not None for n in rest):
        return {}
    called = {id(model.get_submodule(name).weight) for name in order}
    layers = {f.weight: f for f in functional_layers(model, example_inputs) if id(model.get_parameter(f.weight)) not in called}
    names, nodes = _match_rows([(w, model.get_parameter(w)) for w in layers], rest)
    found = {}
    for name, node in zip(names, nodes):
        channels = _layer_channels(analysis, node, gate_position)
        if channels is not None:
            found[name] = WeightChannels(name, node.name, *channels, bias=layers[name].bias)
    if found:
        logger.info("functional layers gated through their weights: %s", ", ".join(found))
    return found


@dataclass(frozen=True)
class FunctionalLayer:
    """A linear or convolution op of the model's ATen graph: the paths of the parameters it applies."""

    weight: str
    bias: str | None


def _layer_ops() -> dict:
    """ATen layer ops -> (weight argument, bias argument) (output channels first in the weight)."""
    aten = torch.ops.aten
    return {aten.linear.default: (1, 2), aten.conv1d.default: (1, 2), aten.conv2d.default: (1, 2),
            aten.conv3d.default: (1, 2), aten.convolution.default: (1, 2)}


def functional_layers(model: nn.Module, example_inputs: tuple) -> list[FunctionalLayer]:
    """Every linear / convolution op of ``model``'s ATen graph (``torch.export``, non-strict, eval mode) whose
    weight is a parameter read by that op alone and whose bias is such a parameter or absent, in graph order.
    Left out: transposed convolutions (their weight is [in, out]) and layers whose bias is computed (it could not
    be gated with the weight). An empty list (logged) when ``torch.export`` cannot capture the model."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:  # noqa: BLE001 - any capture failure: no functional layer is gated
        logger.info("torch.export cannot capture %s (%s): its functional layers get no gate", type(model).__name__,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return []
    finally:
        model.train(was_training)
    params = program.graph_signature.inputs_to_parameters
    ops = _layer_ops()
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        if node.target is torch.ops.aten.convolution.default and node.args[6]:
            continue  # transposed
        w_at, b_at = ops[node.target]
        weight, bias = node.args[w_at], node.args[b_at] if len(node.args) > b_at else None
        if not _sole_parameter(weight, params) or (bias is not None and not _sole_parameter(bias, params)):
            continue
        found.append(FunctionalLayer(params[weight.name], params[bias.name] if bias is not None else None))
    return found


def _sole_parameter(arg, params: dict[str, str]) -> bool:
    """True when ``arg`` is a parameter placeholder of the exported graph read by one op only."""
    return isinstance(arg, torch.fx.Node) and arg.op == "placeholder" and arg.name in params and len(arg.users) == 1
