"""Make channels dead on purpose: zero the weights that produce a random share of each channel group.

Used by the demo, the tests and the benchmarks to stand in for a trained
sparse model. Channels are killed consistently: a component is zeroed in every
Conv/Gemm/MatMul that writes it and in every BatchNormalization and per-channel
bias Add on its way, so it is identically zero wherever it is read.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.channels.analysis import CHANNEL_SOURCES, analyze
from onnxprune.graphio import to_graph, to_model
from onnxprune.graphutil import constant_value, graphsurgeon_logging, optional_input, producer
from onnxprune.pass_infra import PassManager
from passes import PROVIDERS
from passes.fold_constants import FoldConstantsPass
from passes.structure import InferShapesPass


def _zero_rows(node: gs.Node, index: int, rows: np.ndarray, axis: int) -> None:
    """Zero the slices ``rows`` along ``axis`` (the last axis if the constant has fewer) of constant input ``index``."""
    t = optional_input(node, index)
    if t is None or not isinstance(t, gs.Constant):
        return
    v = np.array(t.values)
    if v.ndim == 0 or v.shape[axis if axis < v.ndim else -1] <= rows.max(initial=-1):
        return
    sl = [slice(None)] * v.ndim
    sl[axis if axis < v.ndim else -1] = rows
    v[tuple(sl)] = 0
    t.values = v


def _zero_channels(node: gs.Node, out_name: str, rows: np.ndarray) -> None:
    """Zero what ``node`` contributes to channels ``rows`` of its output (weights, bias, BN scale and shift)."""
    if node.op == "Conv":
        _zero_rows(node, 1, rows, 0)
        _zero_rows(node, 2, rows, 0)
    elif node.op == "ConvTranspose":
        _zero_rows(node, 1, rows, 1)
        _zero_rows(node, 2, rows, 0)
    elif node.op == "Gemm":
        _zero_rows(node, 1, rows, 0 if int(node.attrs.get("transB", 0)) else 1)
        _zero_rows(node, 2, rows, -1)
    elif node.op == "MatMul":
        _zero_rows(node, 1, rows, 1)
    elif node.op == "BatchNormalization":
        _zero_rows(node, 1, rows, 0)
        _zero_rows(node, 2, rows, 0)
    elif node.op == "Add":
        for i, t in enumerate(node.inputs):
            c = constant_value(t)
            if isinstance(t, gs.Constant) and c is not None and c.ndim >= 1 and c.size > 1:
                axis = int(np.argmax(c.shape))
                _zero_rows(node, i, rows, axis)


def kill_channels(model: onnx.ModelProto, fraction: float, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, list[int]]]:
    """Zero ``fraction`` of the channels of every group that is free to prune.

    Returns the new model (unshared weights: the input is not modified) and, per
    group name, the channel positions killed.
    """
    rng = np.random.default_rng(seed)
    with graphsurgeon_logging():
        graph = to_graph(model)
        PassManager([FoldConstantsPass(), InferShapesPass()], PROVIDERS).run(graph)
        graph.toposort()
        killed = _kill_in_every_group(graph, fraction, rng)
        return to_model(graph, model), killed


def _kill_in_every_group(graph: gs.Graph, fraction: float, rng: np.random.Generator) -> dict[str, list[int]]:
    """Zero the weights writing ``fraction`` of each prunable group's channels; the positions killed, by group."""
    analysis = analyze(graph)
    tensors = graph.tensors()
    killed: dict[str, list[int]] = {}
    for group in analysis.groups:
        comps = group.components
        if analysis.pinned[comps].any() or not group.producers or group.size < 2:
            continue
        k = min(int(round(fraction * group.size)), group.size - 1)
        if k <= 0:
            continue
        chosen_pos = np.sort(rng.choice(group.size, size=k, replace=False))
        chosen = set(comps[chosen_pos].tolist())
        killed[group.name] = chosen_pos.tolist()
        for name in group.tensors:
            node = producer(tensors[name])
            if node is None or node.op not in (*CHANNEL_SOURCES, "BatchNormalization", "Add"):
                continue
            rows = np.flatnonzero(np.isin(analysis.components_of(name), list(chosen)))
            _zero_channels(node, name, rows)
    return killed
