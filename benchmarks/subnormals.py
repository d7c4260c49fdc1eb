"""What subnormal weights cost on ONNX Runtime CPU, and what `flush-subnormals` gives back.

For every committed pruned model in the results store (benchmarks/results/*/RUN.pruned.onnx): the
number of subnormal weights, then the model as committed and the same model
after the flush-subnormals pass (verified on ONNX Runtime), timed side by side
(2 threads, batch 1 and 64, interleaved, medians).

    python -m benchmarks.subnormals
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import interleaved_latency, machine_info, ort_runner, use_global_ort_threads
from benchmarks.store import RESULTS, add_results_argument, write_result


def count_subnormals(model) -> tuple[int, int]:
    """(subnormal values, float values) over the model's initializers."""
    from onnx import numpy_helper

    from passes.flush_subnormals import FLOAT_TYPES, subnormal_mask

    sub = total = 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype in FLOAT_TYPES:
            sub += int(subnormal_mask(a).sum())
            total += a.size
    return sub, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    add_results_argument(ap, "subnormals")
    args = ap.parse_args()
    use_global_ort_threads(2)
    import onnx

    from onnxprune.api import run_passes
    from passes.flush_subnormals import FlushSubnormalsPass

    rows = []
    for path in sorted(RESULTS.glob("*/*.pruned.onnx")):
        model = onnx.load(path)
        sub, total = count_subnormals(model)
        flushed = run_passes(model, [FlushSubnormalsPass()]).model
        shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        row = {"model": path.name.removesuffix(".pruned.onnx"), "subnormal_weights": sub, "float_weights": total}
        for batch in (1, 64):
            feed = {model.graph.input[0].name: np.random.default_rng(0).random((batch, *shape), dtype=np.float32)}
            runners = {"committed": ort_runner(model.SerializeToString(), feed), "flushed": ort_runner(flushed.SerializeToString(), feed)}
            row[f"batch{batch}"] = interleaved_latency(runners, repeats=args.rounds, budget_s=30)
        ms = {b: {k: v["median_ms"] for k, v in row[b].items()} for b in ("batch1", "batch64")}
        print(f"[{row['model']}] {sub} subnormal of {total}: b1 {ms['batch1']['committed']:.4f} -> {ms['batch1']['flushed']:.4f} ms, "
              f"b64 {ms['batch64']['committed']:.4f} -> {ms['batch64']['flushed']:.4f} ms", flush=True)
        rows.append(row)
    result = {"benchmark": "subnormals", "machine": machine_info(), "config": {"threads": 2, "rounds": args.rounds}, "models": rows}
    print(f"wrote {write_result(args.results, 'subnormals', result)}")


if __name__ == "__main__":
    main()
