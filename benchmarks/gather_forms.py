"""Exact forms of the pruned LeNet-500-300's read of its kept pixels on ORT CPU at 1 thread (issue #23).

The pruned model reads the 223 pixels fc1 still weighs through Gather(axis=1) of the flattened image. ORT's CPU
Gather copies one value per (image, pixel) with an integer division and a memcpy call each. Timed against it, side
by side (interleaved rounds, medians; each session its own pool: intra_op 1, inter_op 1, spinning off), batch 1
and 64, on random inputs, every form exact relative to the input model:

* gather-rows: the pass (passes/gather_rows.py): Transpose -> Gather(axis 0) of rows -> Gemm(transA=1);
* every input read: no Gather, fc1 with a zero column per dead pixel (what the latency target also times);
* covering range: a Slice of the smallest contiguous range of pixels holding the kept ones, zero columns inside;
* bounding box: a 2-D Slice of the image before the Flatten, zero columns inside the box;
* Compress(axis=1) with a mask of the kept pixels; and the dense model for scale.

Each model is timed unprofiled (us per run: samples of 20 runs back to back, caches warm) and, in the same rounds,
profiled (each kernel's median us, charged to fc1/fc2/fc3 or "other": the Flatten, Gather, Transpose, Slice or
Compress).

    python -m benchmarks.gather_forms            # about a minute on 2 cores
    python -m benchmarks.gather_forms --quick    # a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from benchmarks.common import interleaved_latency, machine_info
from benchmarks.layer_realisation import PAPER, layer_times, mac_layers, runner, session
from benchmarks.store import add_results_argument, write_result

RUN = "mnist-lenet500-sbp"
BATCHES = (1, 64)
SIDE = 28  # the images are [N, 1, 28, 28]


def _parts(pruned: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto, np.ndarray, np.ndarray]:
    """(the Gather of kept pixels, fc1's Gemm reading it, the kept pixel indices, fc1's weight [out, kept])."""
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    gather = next(n for n in pruned.graph.node if n.op_type == "Gather")
    fc1 = next(n for n in pruned.graph.node if n.input and n.input[0] == gather.output[0])
    return gather, fc1, inits[gather.input[1]].astype(np.int64), inits[fc1.input[1]]


def _replaced(pruned: onnx.ModelProto, nodes: list[onnx.NodeProto], weight: np.ndarray, consts: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``pruned`` with its Flatten and Gather replaced by ``nodes`` (writing fc1's input) and fc1's weight by ``weight``."""
    gather, fc1, _, _ = _parts(pruned)
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    del out.graph.value_info[:]
    flatten = next(n for n in out.graph.node if n.op_type == "Flatten")
    kept = [n for n in out.graph.node if n.name not in (flatten.name, gather.name)]
    del out.graph.node[:]
    out.graph.node.extend(nodes + kept)
    inits = [t for t in out.graph.initializer if t.name not in (gather.input[1], fc1.input[1])]
    inits += [numpy_helper.from_array(np.ascontiguousarray(weight), fc1.input[1])]
    inits += [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    onnx.checker.check_model(out)
    return out


def forms(pruned: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """The exact alternatives to the pruned model's Gather (see the module docstring)."""
    from onnxprune.api import run_passes
    from passes.gather_rows import GatherRowsPass

    gather, fc1, keep, w = _parts(pruned)
    image, a = pruned.graph.input[0].name, gather.output[0]
    full = np.zeros((w.shape[0], SIDE * SIDE), np.float32)
    full[:, keep] = w
    lo, hi = int(keep.min()), int(keep.max()) + 1
    rows, cols = keep // SIDE, keep % SIDE
    box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    mask = np.zeros(SIDE * SIDE, bool)
    mask[keep] = True
    flat = [helper.make_node("Flatten", [image], ["flat"], "flatten", axis=1)]
    return {
        "gather-rows": run_passes(pruned, [GatherRowsPass()]).model,
        "every input read": _replaced(pruned, [helper.make_node("Flatten", [image], [a], "flatten", axis=1)], full, {}),
        "covering range": _replaced(pruned, flat + [helper.make_node("Slice", ["flat", "lo", "hi", "ax"], [a], "slice")],
                                    full[:, lo:hi], {"lo": [lo], "hi": [hi], "ax": [1]}),
        "bounding box": _replaced(pruned, [helper.make_node("Slice", [image, "lo", "hi", "ax"], ["boxed"], "slice"),
                                           helper.make_node("Flatten", ["boxed"], [a], "flatten", axis=1)],
                                  full.reshape(-1, SIDE, SIDE)[:, box[0]:box[1], box[2]:box[3]].reshape(w.shape[0], -1),
                                  {"lo": [box[0], box[2]], "hi": [box[1], box[3]], "ax": [2, 3]}),
        "compress": _replaced(pruned, flat + [helper.make_node("Compress", ["flat", "mask"], [a], "compress", axis=1)],
                              w, {"mask": mask}),
    }


def shapes(pruned: onnx.ModelProto) -> dict:
    """How many pixels each form reads."""
    _, _, keep, _ = _parts(pruned)
    rows, cols = keep // SIDE, keep % SIDE
    box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
    return {"pixels": SIDE * SIDE, "kept": int(keep.size), "covering_range": int(keep.max() - keep.min()) + 1,
            "bounding_box": box}


def repeated(fn, inner: int):
    """``fn`` run ``inner`` times: one sample of warm-cache runs."""
    def run() -> None:
        for _ in range(inner):
            fn()
    return run


def at_batch(models: dict[str, onnx.ModelProto], x: np.ndarray, args: argparse.Namespace) -> dict:
    """Every model side by side at one batch, unprofiled and profiled in the same interleaved rounds (samples of
    ``args.inner`` runs): us per run, each layer's kernel time, and the output's largest difference from the pruned
    model's."""
    with tempfile.TemporaryDirectory(prefix="gather-forms-") as tmp:
        plain = {k: session(m) for k, m in models.items()}
        profiled = {k: session(m, profile_prefix=os.path.join(tmp, f"m{i}")) for i, (k, m) in enumerate(models.items())}
        runners = {**{("us", k): repeated(runner(s, x), args.inner) for k, s in plain.items()},
                   **{("kernels", k): repeated(runner(s, x), args.inner) for k, s in profiled.items()}}
        timed = interleaved_latency(runners, repeats=args.rounds, warmup=args.warmup)
        events = {k: json.loads(Path(s.end_profiling()).read_text()) for k, s in profiled.items()}
    reference = runner(plain["pruned (Gather)"], x)()[0]
    out = {}
    for k, m in models.items():
        t = {q: timed[("us", k)][f"{q}_ms"] * 1000 / args.inner for q in ("median", "p25", "p75")}
        out[k] = {"us": t["median"], "us_quartiles": [t["p25"], t["p75"]], "macs": mac_layers(m),
                  "kernel_us": layer_times(events[k], mac_layers(m), args.warmup * args.inner),
                  # the dense net was trained apart: another function
                  "max_abs_diff": None if k == "dense" else float(np.abs(runner(plain[k], x)()[0] - reference).max())}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300, help="interleaved rounds per batch")
    ap.add_argument("--inner", type=int, default=20, help="runs per sample (warm caches)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="5 rounds of 2 runs, 2 warm-up samples: a check that it runs")
    add_results_argument(ap, "gather-forms")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.inner, args.warmup = 5, 2, 2
    dense, pruned = (onnx.load(PAPER / f"{RUN}.{w}.onnx") for w in ("dense", "pruned"))
    models = {"dense": dense, "pruned (Gather)": pruned, **forms(pruned)}
    rng = np.random.default_rng(0)
    load = [os.getloadavg()[0]]  # the machine may be shared: how busy it was, before and after
    batches = {}
    for batch in BATCHES:
        print(f"batch {batch}: {len(models)} models side by side", flush=True)
        batches[str(batch)] = at_batch(models, rng.random((batch, 1, SIDE, SIDE), dtype=np.float32), args)
    load.append(os.getloadavg()[0])
    machine = {**machine_info(), "load_average_1min": load}
    result = {"benchmark": "gather-forms", "machine": machine, "run": RUN, "reads": shapes(pruned), "batches": batches,
              "config": {"rounds": args.rounds, "inner": args.inner, "warmup": args.warmup, "threads": 1, "batches": list(BATCHES),
                         "quick": args.quick, "inputs": "uniform random in [0, 1)"}}
    path = write_result(args.results, "gather-forms" + ("-quick" if args.quick else ""), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
