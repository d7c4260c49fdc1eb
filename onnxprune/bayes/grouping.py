"""Which channels of a PyTorch model share a gate: the ONNX engine's own channel groups.

The model is exported to ONNX once, analysed by the same channel engine that
later deletes the channels, and every Conv/Linear module is matched to its ONNX
Conv/Gemm/MatMul node by call order (the exporter emits one node per call, in
order). A module's output channels then map to engine *components*; coupled
channels (a residual Add, a Concat, a depthwise Conv) are one component, so
they get one gate and a rejected channel is deletable everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onnxprune.channels.analysis import ChannelAnalysis


@dataclass
class ModuleChannels:
    """A Conv/Linear module's output channels as engine components.

    ``parts`` holds, per channel group the layer writes to: (group index, the
    layer's output channels in it, their positions in the group's gate).
    Channels that can never be removed (pinned) are in no part.
    """

    module: str
    onnx_node: str
    parts: list[tuple[int, np.ndarray, np.ndarray]]

    @property
    def groups(self) -> list[int]:
        return [g for g, _, _ in self.parts]


@dataclass
class Grouping:
    """The engine's channel groups as seen from the PyTorch modules."""

    analysis: ChannelAnalysis
    modules: dict[str, ModuleChannels]
    group_sizes: dict[int, int]  # gated components per group
    group_names: dict[int, str]


def _layer_nodes(model, graph) -> list:
    """ONNX Conv/Gemm/MatMul nodes with constant weights, in the exporter's order (one per module call).

    The order is read from the exported proto: the analysed graph is re-sorted
    topologically, which may swap independent branches.
    """
    from onnxprune.graphutil import constant_value

    by_name = {n.name: n for n in graph.nodes}
    nodes = (by_name.get(n.name) for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))
    return [n for n in nodes if n is not None and len(n.inputs) > 1 and constant_value(n.inputs[1]) is not None]


def module_call_order(model: nn.Module, example_inputs: tuple) -> list[str]:
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order


def channel_grouping(model: nn.Module, example_inputs: tuple) -> Grouping:
    """Export ``model`` (eval mode), analyse it, and map each Conv/Linear to its channel group."""
    from onnxprune.api import inspect_model
    from onnxprune.torch_export import export_onnx

    was_training = model.training
    model.eval()
    try:
        dense = export_onnx(model, example_inputs[0] if len(example_inputs) == 1 else example_inputs)
        order = module_call_order(model, example_inputs)
    finally:
        model.train(was_training)
    analysis = inspect_model(dense)[0]
    nodes = _layer_nodes(dense, analysis.graph)
    if len(nodes) != len(order):
        raise ValueError(
            f"cannot match modules to ONNX layers: {len(order)} Conv/Linear calls but {len(nodes)} ONNX layers "
            "(is a module called twice, or a functional conv used?)"
        )
    if len(set(order)) != len(order):
        raise ValueError("a Conv/Linear module is called more than once; shared layers cannot be gated per call")
    # Per group, the gated components (not pinned by a graph input/output or an uncovered op), in group order.
    gate_position: dict[int, dict[int, int]] = {}
    for group in analysis.groups:
        free = [int(c) for c in group.components if not analysis.pinned[c]]
        gate_position[group.index] = {c: i for i, c in enumerate(free)}
    modules = {}
    for name, node in zip(order, nodes):
        out = node.outputs[0].name
        if analysis.ctx.tracked(out) is None:
            continue
        comps = analysis.components_of(out)
        groups = analysis.group_of_component[comps]
        parts = []
        for g in dict.fromkeys(int(v) for v in groups):  # first-seen order
            channels = np.flatnonzero(groups == g)
            position = np.array([gate_position[g].get(int(c), -1) for c in comps[channels]], dtype=np.int64)
            keep = position >= 0
            if keep.any():
                parts.append((g, channels[keep], position[keep]))
        if parts:
            modules[name] = ModuleChannels(name, node.name, parts)
    sizes = {g: len(p) for g, p in gate_position.items() if p}
    names = {g.index: g.name for g in analysis.groups}
    return Grouping(analysis, modules, sizes, names)
