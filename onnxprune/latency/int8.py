"""int8 on ONNX Runtime CPU: quantized layers' kernel times, and the layers that int8 makes slower.

Measuring (:func:`measure_quantized_batch`). A micro-model whose layers each read an input
of their own is quantized as the target quantizes models and run with the profiler. After
QDQ fusion the runtime's nodes carry other names (a QLinearConv '/conv1/Conv_token_15',
Transposes to and from NHWC, QuantizeLinear/DequantizeLinear), so the graph the runtime
optimized is saved beside the profile and each node is charged to the layer whose output
``o{i}`` it feeds (walking that graph back from ``o{i}``); names are never parsed. A layer's
nodes split into:

* ``us``: the kernel, with whatever it recomputes from weights on every run (a
  DequantizeLinear of an initializer, where the runtime left the layer unfused);
* ``in_us``: quantizing its float input and converting it to the kernel's layout;
* ``out_us``: converting the result back and dequantizing it.

Between two int8 layers a quantized model keeps activations int8 and in one layout, so the
width search charges ``us`` alone (and layout changes between layers whose layouts differ, as
for float32); ``in_us`` and ``out_us`` are paid where a layer meets float32 data.

Choosing precisions (:func:`layers_slower_in_int8`): the rule is documented there.
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable

import onnx
import onnx_graphsurgeon as gs

from onnxprune.graphio import to_graph
from onnxprune.graphutil import constant_value
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.guarantee import time_side_by_side
from onnxprune.latency.layers import LayerSpec, layer_specs
from onnxprune.latency.measure import WARMUP_RUNS, Request, measure, micro_model, profile_nodes, record_reorder_cost
from onnxprune.latency.target import INT8_CALIBRATION_BATCHES, Int8Target, Target
from onnxprune.quantization import INT8_OPS, Int8Settings, quantize_static_int8, random_feeds
from onnxprune.shapes import infer_shapes

logger = logging.getLogger(__name__)

LAYOUT_OPS = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})
ACTIVATION_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
# Ops between layers that a quantized model runs on int8 data (QDQ groups the runtime fuses, ops that only move
# or select data): a path through them keeps two int8 layers int8 end to end. Any other op is float32.
KEPT_INT8_OPS = frozenset({
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Mul", "Concat",
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Split", "Gather", "Pad", "Resize",
})
SLOWER_MARGIN = 1.05  # int8 must cost this much more than float32 to count as slower (micro-model medians are noisy)


def _owners(graph: onnx.GraphProto, layers: int) -> dict[str, int]:
    """Node name -> index i of the micro-model layer whose output ``o{i}`` the node feeds."""
    producer = {t: node for node in graph.node for t in node.output}
    owner: dict[str, int] = {}
    for i in range(layers):
        stack = [f"o{i}"]
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in owner:
                continue
            owner[node.name] = i
            stack.extend(node.input)
    return owner


def _is_boundary(node: onnx.NodeProto, initializers: set[str]) -> bool:
    """A layout conversion, or a (de)quantization of activations (not of weights)."""
    return node.op_type in LAYOUT_OPS or (node.op_type in ACTIVATION_QDQ_OPS and node.input[0] not in initializers)


def _input_side(graph: onnx.GraphProto, initializers: set[str]) -> set[str]:
    """Names of the boundary nodes between the graph's inputs and the first kernel reading them."""
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for t in node.input:
            consumers[t].append(node)
    found: set[str] = set()
    stack = [value.name for value in graph.input]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in found and _is_boundary(node, initializers):
                found.add(node.name)
                stack.extend(node.output)
    return found


def _median_us(events: list[dict]) -> dict[str, tuple[float, float]]:
    """Node name -> (median microseconds over the timed runs, median ns per output byte)."""
    samples: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        samples[e["name"][: -len("_kernel_time")]].append(e)
    out = {}
    for name, runs in samples.items():
        timed = runs[WARMUP_RUNS:] or runs
        per_byte = [1000.0 * e["dur"] / size for e in timed if (size := int(e.get("args", {}).get("output_size", 0) or 0))]
        out[name] = (statistics.median(float(e["dur"]) for e in timed), statistics.median(per_byte) if per_byte else 0.0)
    return out


def _layout(ops: set[str]) -> str:
    if "Transpose" in ops:
        return "nhwc"
    return "nchwc" if ops & {"ReorderInput", "ReorderOutput"} else "plain"


def measure_quantized_batch(batch: list[tuple[str, Request]], target: Target, cache: LatencyCache) -> None:
    """Measure ``batch``'s layers quantized on ``target``: kernel, input-side and output-side microseconds."""
    model, feeds = micro_model(batch, target, share_inputs=False)
    events, optimized = profile_nodes(target.prepare(model), feeds, target, keep_optimized=True)
    timed = _median_us(events)
    graph = optimized.graph
    initializers = {t.name for t in graph.initializer}
    owner, input_side = _owners(graph, len(batch)), _input_side(graph, initializers)
    costs = [{"us": 0.0, "in_us": 0.0, "out_us": 0.0} for _ in batch]
    ops: list[set[str]] = [set() for _ in batch]
    has_kernel = [False] * len(batch)
    reorder_ns_per_byte = []
    for node in graph.node:
        if node.name not in timed or node.name not in owner:
            continue
        i, (us, ns_per_byte) = owner[node.name], timed[node.name]
        ops[i].add(node.op_type)
        if not _is_boundary(node, initializers):
            costs[i]["us"] += us
            has_kernel[i] = True
            continue
        costs[i]["in_us" if node.name in input_side else "out_us"] += us
        if node.op_type in LAYOUT_OPS and ns_per_byte:
            reorder_ns_per_byte.append(ns_per_byte)
    for i, (key, _) in enumerate(batch):
        if has_kernel[i]:  # else the runtime dropped it: left unmeasured (predicted as unknown)
            cache.put(key, {**costs[i], "layout": _layout(ops[i])})
    record_reorder_cost(cache, reorder_ns_per_byte)


# -- which layers to leave in float32 --------------------------------------------------------------------------


def _reaches_float(tensor: gs.Tensor, graph: gs.Graph, int8_layers: set[str], *, upstream: bool) -> bool:
    """Whether some path from ``tensor`` (against the data flow if ``upstream``) meets float32 data (a graph
    input or output, or an op other than an int8 layer or a KEPT_INT8_OPS op) before an int8 layer."""
    ends = {t.name for t in (graph.inputs if upstream else graph.outputs)}
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if t.name in seen or constant_value(t) is not None:
            continue
        seen.add(t.name)
        if t.name in ends:
            return True
        for node in t.inputs if upstream else t.outputs:
            if node.name in int8_layers:
                continue
            if node.op not in KEPT_INT8_OPS:
                return True
            stack.extend(node.inputs if upstream else node.outputs)
    return False


def _sides(spec: LayerSpec, graph: gs.Graph, tensors: dict[str, gs.Tensor], int8_layers: set[str]) -> tuple[bool, bool]:
    """Whether the layer's input, and its output, meet float32 data."""
    return (_reaches_float(tensors[spec.in_tensor], graph, int8_layers, upstream=True),
            _reaches_float(tensors[spec.out_tensor], graph, int8_layers, upstream=False))


def _costs(int8: dict, float32: dict, sides: tuple[bool, bool]) -> tuple[float, float]:
    """(int8, float32) microseconds of the layer, given whether its input and output sides are float32 data.

    A precision change costs what the layer's micro-model measured on that side (quantizing or dequantizing
    and changing layout, about the same bytes either way): an int8 layer pays it on its float32 sides, a
    float32 layer on its int8 sides."""
    boundary = (int8.get("in_us", 0.0), int8.get("out_us", 0.0))
    as_int8 = int8["us"] + sum(cost for cost, is_float in zip(boundary, sides) if is_float)
    as_float = float32["us"] + sum(cost for cost, is_float in zip(boundary, sides) if not is_float)
    return as_int8, as_float


def _measured(specs: Iterable[LayerSpec], target: Target) -> dict[str, dict]:
    """Layer name -> its cached (else measured) entry on ``target`` at its own widths."""
    cache = LatencyCache(target)
    specs = list(specs)
    measure([(s, s.in_width, s.out_width) for s in specs], target, cache)
    cache.save()
    entries = {s.name: cache.get(s.key(s.in_width, s.out_width, target.batch)) for s in specs}
    return {name: entry for name, entry in entries.items() if entry}


def _named_by_layer(model: onnx.ModelProto, target: Int8Target) -> list[str]:
    """The layers the per-layer rule names (see :func:`layers_slower_in_int8`), in graph order."""
    graph = to_graph(model)
    infer_shapes(graph)
    named = {node.name for node in model.graph.node if node.name}
    specs = [s for s in layer_specs(graph) if s.name in named]
    int8 = _measured(specs, target)
    float32 = _measured(specs, target.float_counterpart())
    judged = [s for s in specs if s.name in int8 and s.name in float32]
    layers, tensors = {node.name for node in graph.nodes if node.op in INT8_OPS}, graph.tensors()
    slower: set[str] = set()
    while True:
        int8_layers = layers - slower
        newly = set()
        for spec in (s for s in judged if s.name in int8_layers):
            as_int8, as_float = _costs(int8[spec.name], float32[spec.name], _sides(spec, graph, tensors, int8_layers))
            if as_int8 > SLOWER_MARGIN * as_float:
                newly.add(spec.name)
        if not newly:
            return [s.name for s in specs if s.name in slower]
        slower |= newly


def _faster_mixed(model: onnx.ModelProto, slower: list[str], target: Int8Target) -> bool:
    """Whether ``model`` quantized with ``slower`` left in float32 is measured faster than quantized whole."""
    feeds = random_feeds(model, target.batch, INT8_CALIBRATION_BATCHES)
    whole = quantize_static_int8(model, feeds, settings=target.settings)
    mixed = quantize_static_int8(model, feeds, settings=target.settings, exclude=slower)
    # Timed as given on the same CPU, threads and batch (mixed can hold no quantized op: the int8 target would
    # quantize it again).
    ms = time_side_by_side(target.float_counterpart(), whole, {"mixed": mixed})
    logger.debug("int8 with %d layer(s) in float32: %.3g ms, all int8: %.3g ms", len(slower), ms["mixed"], ms["input"])
    return ms["mixed"] < ms["input"]


def layers_slower_in_int8(
    model: onnx.ModelProto, threads: int, batch: int, *, settings: Int8Settings | None = None, confirm: bool = True
) -> list[str]:
    """Names of ``model``'s Conv/Gemm/MatMul nodes measured slower in int8 than in float32 on ORT CPU.

    The rule: each layer (constant weights, static shapes, a name in ``model``) is measured alone at
    ``threads`` and ``batch``, quantized with ``settings`` (default: ``Int8Settings()``) and in float32:
    the latency tables, cached under each target's id. Its int8 cost is its kernel's plus a precision
    change on each side that meets float32 data (a graph input or output, or an op that a quantized model
    runs in float32, with no int8 layer between); its float32 cost is its kernel's plus a precision change
    on each side that meets int8 data (see :func:`_costs`). A layer whose int8 cost exceeds SLOWER_MARGIN
    times its float32 cost is named. A layer named makes its neighbours meet float32 data, so this repeats
    until no more are named (it only adds names, so it ends).

    Then, with ``confirm``, the whole model is measured: quantized with the named layers left in float32
    against quantized whole, side by side; unless the first is faster, no layer is named (the ops between
    layers also change kernels with their neighbours' precision, which no per-layer table sees: an int8
    MaxPool between a float32 and an int8 layer runs in a slow NCHW kernel).

    Names are those of ``model`` as given, in graph order (quantization's pre-processing keeps them): pass
    them to ``quantize_static_int8(..., exclude=...)``. Unnamed nodes are never named.
    """
    target = Int8Target("ort-cpu-int8", threads, batch, settings or Int8Settings())
    slower = _named_by_layer(model, target)
    if slower and confirm and not _faster_mixed(model, slower, target):
        return []
    return slower
