"""Why pruned LeNet5 realises little of its MAC reduction on ORT CPU at 1 thread: layer by layer, and the alternatives.

ONNX Runtime CPU, 1 thread (each session its own pool: intra_op 1, inter_op 1, spinning off), batch 1 and 64, every
comparison timed side by side (interleaved rounds, medians), on random inputs:

1. each kernel of the dense and pruned LeNet5 and LeNet-500-300 timed by ORT's profiler and charged to its layer
   (conv1, conv2, fc1, ..., pooling, reorders, other), against the layer's MACs; the whole models timed unprofiled;
2. LeNet5's first layer alone (Conv 1->w 5x5, Relu, MaxPool 2x2 on 28x28) for w = 1..20, with ORT's NCHWc layout
   (ORT_ENABLE_ALL) and without it (ORT_ENABLE_EXTENDED);
3. exact alternatives to the pruned LeNet5: what `onnxprune prune --target ort-cpu --threads 1 --batch B
   --assume-finite` picks from the dense-shaped model with the pruned channels zero (widths, and whether to compute
   Conv -> Relu -> MaxPool in phases), conv1 kept at 16 channels (13 zero), the pruned model without NCHWc, and the
   pruned model with its Conv -> Relu -> MaxPool sites in phases (the `pool-phases` pass); and the dense model in
   phases, to show that it does not gain.

    python -m benchmarks.layer_realisation            # about a minute on 2 cores
    python -m benchmarks.layer_realisation --quick    # a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.common import interleaved_latency, machine_info, python_env
from benchmarks.store import RESULTS, add_results_argument, write_result

PAPER = RESULTS / "paper-table"
NETS = {"lenet5": ("LeNet5-Caffe", "mnist-lenet5-sbp"), "lenet500": ("LeNet-500-300", "mnist-lenet500-sbp")}
BATCHES = (1, 64)
WIDTHS = range(1, 21)
CONV_OPS, DENSE_OPS = ("Conv", "FusedConv"), ("Gemm", "FusedGemm", "MatMul", "FusedMatMul")
POOL_OPS, REORDER_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool"), ("ReorderInput", "ReorderOutput")


def session(model: onnx.ModelProto, *, nchwc: bool = True, profile_prefix: str | None = None):
    """A 1-thread ORT CPU session with its own pool, spinning off; ORT_ENABLE_EXTENDED (no NCHWc) unless ``nchwc``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 1, 1, 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if nchwc else level.ORT_ENABLE_EXTENDED
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def runner(sess, x: np.ndarray) -> Callable[[], list]:
    """One inference of ``sess`` on ``x``."""
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def mac_layers(model: onnx.ModelProto) -> dict[str, int]:
    """MACs per sample of each Conv/Gemm layer, named by its node ("/conv1/Conv" -> "conv1"), in graph order."""
    from onnxprune.api import inspect_model

    return {layer.name.strip("/").split("/")[0]: layer.macs for layer in inspect_model(model)[2].layers}


def charge(op: str, order: dict[str, list[str]], kernel: str, layers: dict[str, int]) -> str:
    """The layer a kernel is charged to: the i-th conv (dense) kernel run is the i-th conv (dense) layer."""
    kind = "conv" if op in CONV_OPS else "dense" if op in DENSE_OPS else None
    if kind is None:
        return "pooling" if op in POOL_OPS else "reorders" if op in REORDER_OPS else "other"
    names = [n for n in layers if n.startswith("conv" if kind == "conv" else "fc")]
    seen = order.setdefault(kind, [])
    if kernel not in seen:
        seen.append(kernel)
    return names[seen.index(kernel)]


def layer_times(events: list[dict], layers: dict[str, int], skip: int) -> dict[str, float]:
    """Median over runs of each layer's kernel time in us (run i: the i-th event of every kernel, ``skip`` dropped)."""
    per_kernel: dict[str, list[float]] = {}
    owner: dict[str, str] = {}
    order: dict[str, list[str]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        per_kernel.setdefault(e["name"], []).append(float(e["dur"]))
        owner.setdefault(e["name"], charge(e["args"]["op_name"], order, e["name"], layers))
    runs = min(len(v) for v in per_kernel.values())
    sums: dict[str, np.ndarray] = {}
    for kernel, durs in per_kernel.items():
        sums[owner[kernel]] = sums.get(owner[kernel], 0) + np.asarray(durs[skip:runs])
    return {layer: float(np.median(s)) for layer, s in sums.items()}


def side_by_side(models: dict[str, tuple[onnx.ModelProto, bool]], x: np.ndarray, rounds: int, warmup: int) -> dict:
    """Each (model, NCHWc?) twice, all in interleaved rounds: unprofiled, its median ms (and quartiles); profiled, its
    median ms and each layer's median kernel time (us)."""
    with tempfile.TemporaryDirectory(prefix="layer-realisation-") as tmp:
        plain = {k: session(m, nchwc=nchwc) for k, (m, nchwc) in models.items()}
        profiled = {k: session(m, nchwc=nchwc, profile_prefix=os.path.join(tmp, f"m{i}"))
                    for i, (k, (m, nchwc)) in enumerate(models.items())}
        runners = {**{("ms", k): runner(s, x) for k, s in plain.items()},
                   **{("us", k): runner(s, x) for k, s in profiled.items()}}
        timed = interleaved_latency(runners, repeats=rounds, warmup=warmup)
        events = {k: json.loads(Path(s.end_profiling()).read_text()) for k, s in profiled.items()}
    macs = {k: mac_layers(m) for k, (m, _) in models.items()}
    return {k: {"ms": timed[("ms", k)]["median_ms"], "ms_quartiles": [timed[("ms", k)][q] for q in ("p25_ms", "p75_ms")],
                "ms_profiled": timed[("us", k)]["median_ms"], "macs": macs[k],
                "layer_us": layer_times(events[k], macs[k], warmup)} for k in models}


def first_layer(width: int, seed: int = 0) -> onnx.ModelProto:
    """LeNet5's conv1 alone with ``width`` outputs: Conv 1->w 5x5 (no padding), Relu, MaxPool 2x2 stride 2."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.2, (width, 1, 5, 5)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, width).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], "/conv1/Conv", kernel_shape=[5, 5]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, f"conv1_w{width}", [helper.make_tensor_value_info("x", 1, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("y", 1, ["batch", width, 12, 12])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def width_sweep(x: np.ndarray, rounds: int, warmup: int) -> dict:
    """The first layer at every width, with and without NCHWc, all side by side."""
    models = {f"{layout} {w}": (first_layer(w), nchwc) for w in WIDTHS for layout, nchwc in (("nchwc", True), ("plain", False))}
    timed = side_by_side(models, x, rounds, warmup)
    return {layout: {str(w): {k: timed[f"{layout} {w}"][k] for k in ("ms", "ms_quartiles", "layer_us")} for w in WIDTHS}
            for layout in ("nchwc", "plain")}


def with_weights(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``arrays`` hold those arrays (intermediate shapes dropped)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    for init in out.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    return out


def zero_padded(pruned: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """``pruned`` with each weight named in ``shapes`` grown to that shape: its values first, zeros after.

    Kept channels first is exact for LeNet5: fc1 reads Flatten([C, 4, 4]) channel-major, so the first C channels'
    features are its first 16*C columns, where the pruned fc1 has them.
    """
    grown = {}
    for init in pruned.graph.initializer:
        if init.name in shapes:
            a = numpy_helper.to_array(init)
            grown[init.name] = np.zeros(shapes[init.name], np.float32)
            grown[init.name][tuple(slice(0, n) for n in a.shape)] = a
    return with_weights(pruned, grown)


def target_choice(zeroed: Path, batch: int, scratch: Path) -> tuple[onnx.ModelProto, dict]:
    """`onnxprune prune --target ort-cpu --threads 1 --batch B --assume-finite` of ``zeroed`` (fresh latency cache;
    --assume-finite: the candidates are also timed in phases): model, report."""
    out, report = scratch / f"target-b{batch}.onnx", scratch / f"target-b{batch}.json"
    env = python_env({**os.environ, "ONNXPRUNE_CACHE_DIR": str(scratch / "cache")})
    cmd = [sys.executable, "-m", "onnxprune", "prune", str(zeroed), "-o", str(out), "--target", "ort-cpu", "--threads", "1",
           "--batch", str(batch), "--assume-finite", "--report", str(report), "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"onnxprune prune failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    r = json.loads(report.read_text())
    widths = {layer["name"]: layer["out_channels"] for layer in r["after"]["layers"]}
    attempts = [{k: a[k] for k in ("attempt", "input_ms", "output_ms", "accepted")} for a in r["latency"]["attempts"]]
    return onnx.load(out), {"widths": widths, "macs": r["after"]["macs"], "attempts": attempts,
                            "accepted": r["latency"]["accepted"]}


def in_phases(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its Conv -> Relu -> MaxPool sites computed in phases (the pool-phases pass, checked on ORT)."""
    from onnxprune.api import run_passes
    from passes.pool_phases import PoolPhasesPass

    return run_passes(model, [PoolPhasesPass()]).model


def alternatives(dense: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray, rounds: int, warmup: int) -> dict:
    """The pruned LeNet5 against exact alternatives at one batch, and the dense one: times, MACs, output difference."""
    shapes = {i.name: tuple(i.dims) for i in dense.graph.initializer}
    with tempfile.TemporaryDirectory(prefix="layer-realisation-") as tmp:
        zeroed = Path(tmp) / "zeroed.onnx"
        onnx.save(zero_padded(pruned, shapes), zeroed)
        chosen, report = target_choice(zeroed, len(x), Path(tmp))
    conv16 = zero_padded(pruned, {"conv1.weight": (16, 1, 5, 5), "conv1.bias": (16,), "conv2.weight": (10, 16, 5, 5)})
    variants = {"dense": (dense, True), "pruned": (pruned, True), "onnxprune --target": (chosen, True),
                "conv1 at 16": (conv16, True), "pruned, no NCHWc": (pruned, False),
                "pruned, conv+pool in phases": (in_phases(pruned), True), "dense, conv+pool in phases": (in_phases(dense), True)}
    references = {w: runner(session(m), x)()[0] for w, m in (("dense", dense), ("pruned", pruned))}
    timed = side_by_side(variants, x, rounds, warmup)
    for k, (m, nchwc) in variants.items():  # the dense net was trained apart: another function
        same_as = "dense" if k.startswith("dense") else "pruned"
        out = runner(session(m, nchwc=nchwc), x)()[0]
        timed[k]["max_abs_diff"] = None if k == "dense" else float(np.abs(out - references[same_as]).max())
        timed[k]["compared_with"] = same_as
    return {"target_choice": report, "variants": timed}


def measure_nets(x: np.ndarray, rounds: int, warmup: int) -> dict:
    """Both LeNets, dense and pruned, side by side: whole-model times and per-layer kernel times."""
    models = {f"{n} {w}": (onnx.load(PAPER / f"{stem}.{w}.onnx"), True) for n, (_, stem) in NETS.items() for w in ("dense", "pruned")}
    timed = side_by_side(models, x, rounds, warmup)
    return {n: {"label": label, **{w: timed[f"{n} {w}"] for w in ("dense", "pruned")}} for n, (label, _) in NETS.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="interleaved rounds per comparison and batch")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="5 rounds, 2 warm-up runs: a check that it runs")
    add_results_argument(ap, "layer-realisation")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 5, 2
    dense, pruned = (onnx.load(PAPER / f"mnist-lenet5-sbp.{w}.onnx") for w in ("dense", "pruned"))
    rng = np.random.default_rng(0)
    batches = {}
    for batch in BATCHES:
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        print(f"batch {batch}: layers, first-layer widths, alternatives", flush=True)
        batches[str(batch)] = {"nets": measure_nets(x, args.rounds, args.warmup),
                               "conv1_sweep_ms": width_sweep(x, args.rounds, args.warmup),
                               "alternatives": alternatives(dense, pruned, x, args.rounds, args.warmup)}
    result = {"benchmark": "layer-realisation", "machine": machine_info(), "batches": batches,
              "config": {"rounds": args.rounds, "warmup": args.warmup, "threads": 1, "batches": list(BATCHES),
                         "widths": list(WIDTHS), "quick": args.quick, "inputs": "uniform random in [0, 1)"}}
    path = write_result(args.results, "layer-realisation" + ("-quick" if args.quick else ""), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
