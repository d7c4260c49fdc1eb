"""Measuring layer latencies on the target.

CPU: each micro-model holds up to ~48 independent layers (inputs shared where
shapes agree). The runtime's own per-node kernel times are read from its
profile, so one session measures many layers, and each layer is timed in the
layout the runtime picks for it (the blocked NCHWc kernels when the widths
allow, the plain ones otherwise). Layout conversions (ReorderInput/
ReorderOutput) are not charged to the layer; their cost per byte is recorded
as a constant.

CUDA: the profiler sees kernel launches, not GPU time, so each layer gets its
own micro-model holding ``CUDA_REPLICAS`` copies of it; inputs and outputs stay
on the device (I/O binding) and a run's wall time over the copies is the
layer's latency.

Products of two activations (attention's ``Q @ K^T`` and ``P @ V``,
:class:`~onnxprune.latency.products.ProductSpec`) are measured the same way: a
MatMul or Einsum reading two inputs of the micro-model, at the operand shapes a
choice of head counts gives them.

int8 (an :class:`~onnxprune.latency.target.Int8Target`): the CPU micro-models are
quantized as the target quantizes models, each layer reading its own input, and
kernel times are attributed to layers through the runtime's optimized graph
(onnxprune.latency.int8).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper

from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.layers import LayerSpec
from onnxprune.latency.products import ProductSpec, Shape
from onnxprune.latency.target import Target

MAX_LAYERS_PER_MODEL = 48
MAX_INPUT_BYTES = 64 << 20
WARMUP_RUNS = 2
TIMED_RUNS = 8
CUDA_REPLICAS = 4
CUDA_TIMED_RUNS = 10

# A layer at (input width, output width), or a product of two activations at (A's shape, B's shape).
Request = tuple[LayerSpec, int, int] | tuple[ProductSpec, Shape, Shape]


def micro_model(
    batch: list[tuple[str, Request]], target: Target, *, share_inputs: bool = True
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One model holding every layer of ``batch`` (layer i writes o{i}), and its feeds. Layers share an input
    where shapes agree, unless ``share_inputs`` is False (then each layer reads inputs of its own)."""
    rng = np.random.default_rng(0)
    input_of: dict[tuple, str] = {}  # (shape) or (layer, operand, shape) -> input name
    feeds: dict[str, np.ndarray] = {}
    nodes, inits, outputs = [], [], []
    for i, (_, (spec, in_w, out_w)) in enumerate(batch):
        names = []
        for j, shape in enumerate(spec.micro_inputs(in_w, out_w, target.batch)):
            key = (shape,) if share_inputs else (i, j, shape)
            if key not in input_of:
                input_of[key] = f"x{len(input_of)}"
                feeds[input_of[key]] = rng.standard_normal(shape).astype(np.float32)
            names.append(input_of[key])
        node, node_inits = spec.micro_node(i, names, in_w, out_w, rng)
        nodes.append(node)
        inits += node_inits
        outputs.append(helper.make_tensor_value_info(f"o{i}", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "micro",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(feeds[n].shape)) for n in feeds],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, feeds


def profile_nodes(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], target: Target, *, keep_optimized: bool = False
) -> tuple[list[dict], onnx.ModelProto | None]:
    """The runtime's per-node kernel-time events over WARMUP_RUNS + TIMED_RUNS runs of ``model``, and (if
    ``keep_optimized``) the graph the runtime optimized it into, whose node names the events carry."""
    from onnxprune.runtime import make_session

    options = target.session_options(profile=True)
    folder = os.path.dirname(options.profile_file_prefix)  # the session's private profile folder
    try:
        if keep_optimized:
            options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        session = make_session(model.SerializeToString(), providers=target.providers, options=options)
        optimized = onnx.load(options.optimized_model_filepath) if keep_optimized else None
        for _ in range(WARMUP_RUNS + TIMED_RUNS):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    return nodes, optimized


def _measure_batch(batch: list[tuple[str, Request]], target: Target, cache: LatencyCache) -> None:
    model, feeds = micro_model(batch, target)
    events, _ = profile_nodes(model, feeds, target)
    per_node: dict[str, list[float]] = {}
    reorder_ns_per_byte: list[float] = []
    for e in events:
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "")
        if op in ("ReorderInput", "ReorderOutput"):
            size = int(e["args"].get("output_size", 0) or 0)
            if size:
                reorder_ns_per_byte.append(1000.0 * e["dur"] / size)
            continue
        per_node.setdefault(name, []).append(float(e["dur"]))
    for i, (key, _) in enumerate(batch):
        blocked = per_node.get(f"o{i}_nchwc")
        plain = per_node.get(f"n{i}")
        samples = blocked or plain
        if not samples:
            continue  # the runtime fused or dropped it: leave unmeasured (predicted as unknown)
        timed = samples[WARMUP_RUNS:] or samples
        cache.put(key, {"us": statistics.median(timed), "layout": "nchwc" if blocked else "plain"})
    record_reorder_cost(cache, reorder_ns_per_byte)


def record_reorder_cost(cache: LatencyCache, ns_per_byte: list[float]) -> None:
    """Fold this micro-model's layout-conversion costs per byte into the cache's running estimate."""
    if ns_per_byte:
        old = cache.constants.get("reorder_ns_per_byte")
        new = statistics.median(ns_per_byte)
        cache.constants["reorder_ns_per_byte"] = new if old is None else (old + new) / 2


def _measure_cuda(key: str, request: Request, target: Target, cache: LatencyCache) -> None:
    import time

    import onnxruntime

    model, feeds = micro_model([(key, request)] * CUDA_REPLICAS, target)
    session = target.session(model.SerializeToString())
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")
    times = []
    for i in range(WARMUP_RUNS + CUDA_TIMED_RUNS):
        t = time.perf_counter()
        session.run_with_iobinding(binding)  # returns once the device is done with the outputs
        if i >= WARMUP_RUNS:
            times.append((time.perf_counter() - t) * 1e6 / CUDA_REPLICAS)
    cache.put(key, {"us": statistics.median(times), "layout": "plain"})


def _next_batch(items: list[tuple[str, Request]], start: int, target: Target, *, share_inputs: bool) -> list:
    """The layers from ``items[start]`` on that one micro-model holds (MAX_LAYERS_PER_MODEL, MAX_INPUT_BYTES)."""
    batch, input_bytes, shapes = [], 0, set()
    while start + len(batch) < len(items) and len(batch) < MAX_LAYERS_PER_MODEL:
        key, (spec, in_w, out_w) = items[start + len(batch)]
        fresh = [s for s in spec.micro_inputs(in_w, out_w, target.batch) if not (share_inputs and s in shapes)]
        extra = sum(4 * int(np.prod(s)) for s in fresh)
        if batch and input_bytes + extra > MAX_INPUT_BYTES:
            break
        shapes.update(fresh)
        input_bytes += extra
        batch.append((key, (spec, in_w, out_w)))
    return batch


def _batch_measurer(target: Target) -> tuple[Callable[[list, Target, LatencyCache], None], bool]:
    """How the target's CPU micro-models are measured, and whether their layers share inputs."""
    if target.precision == "int8":
        from onnxprune.latency.int8 import measure_quantized_batch  # int8 builds on this module's micro-models

        return measure_quantized_batch, False
    return _measure_batch, True


def measure(
    requests: Iterable[Request],
    target: Target,
    cache: LatencyCache,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Measure every request not in the cache; returns how many were measured."""
    todo: dict[str, Request] = {}
    for spec, in_w, out_w in requests:
        key = spec.key(in_w, out_w, target.batch)
        if key not in cache and key not in todo:
            todo[key] = (spec, in_w, out_w)
    items = list(todo.items())
    done = 0
    if target.name == "ort-cuda":
        for key, request in items:
            _measure_cuda(key, request, target, cache)
            done += 1
            if progress:
                progress(done, len(items))
        return len(items)
    measure_batch, share_inputs = _batch_measurer(target)
    while done < len(items):
        batch = _next_batch(items, done, target, share_inputs=share_inputs)
        measure_batch(batch, target, cache)
        done += len(batch)
        if progress:
            progress(done, len(items))
    return len(items)
