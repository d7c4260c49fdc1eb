"""ORT CPU latency of a paper-table run's dense and shipped models, rebuilt here from their shapes.

The CIFAR models are too large to come back from the GPU machine, so their CPU latencies in
`result.json` were taken on that machine's CPU. Latency does not depend on the weights' values
(ORT runs dense kernels), only on the graph and its shapes: this script rebuilds both models
through the same pipeline (the net with random weights and BatchNorm statistics, SBP gates
that reject each layer's channels beyond the shipped width, export, `onnxprune prune
--target none`), checks that every layer has the shipped width, and times dense against
pruned side by side on this machine (2 threads, batch 1 and 64, medians of interleaved
runs). The timings go into the run's result.json as `latency_cpu_shapes`.

    python benchmarks/cpu_latency_shapes.py cifar-vgg15-sbp cifar-vgg-sbp [--rounds 30]

VGG-like runs only (one gate per layer, in layer order); the weights are random, so no
error is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, interleaved_latency, machine_info, ort_runner, use_global_ort_threads  # noqa: E402


def rebuild(result: dict):
    """(dense, pruned) ONNX models with the run's architecture and its shipped widths, random weights."""
    import torch

    import models
    from onnxprune import bayes
    from onnxprune.api import prune_model
    from onnxprune.bayes.exporting import export
    from onnxprune.torch_export import export_onnx
    from tests.prune_helpers import layer_widths

    cfg = result["config"]
    if cfg["model"] != "vgg_cifar":
        raise SystemExit(f"{result['run']}: only VGG-like runs are rebuilt (one gate per layer), not {cfg['model']}")
    torch.manual_seed(0)
    net = models.build(cfg["model"], **cfg.get("model_kwargs", {})).eval()
    models.randomize_batchnorm(net, 0)
    example = torch.rand(1, 3, 32, 32)
    dense = export_onnx(net, example)
    wrapped = bayes.wrap(net, (example,), method="sbp")
    shipped = result["units"]["pruned"]
    gates = list(wrapped.gates.values())
    if len(gates) != len(shipped):
        raise SystemExit(f"{result['run']}: {len(gates)} gates for {len(shipped)} shipped widths")
    with torch.no_grad():
        for gate, keep in zip(gates, shipped):
            gate.mu.zero_()
            gate.log_sigma.fill_(-5.0)
            gate.mu[keep:] = -15.0
            gate.log_sigma[keep:] = 2.0
    wrapped.eval()
    pruned = prune_model(export(wrapped, (example,)), target="none").model
    widths = [w[1] for w in layer_widths(pruned).values()][:-1]
    if widths != shipped:
        raise SystemExit(f"{result['run']}: rebuilt widths {widths} are not the shipped {shipped}")
    return dense, pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="result folders under benchmarks/results (e.g. cifar-vgg15-sbp)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per batch size")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    use_global_ort_threads(2)
    for run in args.runs:
        path = args.results / run / "result.json"
        result = json.loads(path.read_text())
        dense, pruned = rebuild(result)
        timing: dict = {"threads": 2, "weights": "random (the run's shapes)", "machine": machine_info()}
        for batch in (1, 64):
            feed = {"input": np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)}
            runners = {"dense": ort_runner(dense.SerializeToString(), feed, threads=2),
                       "pruned": ort_runner(pruned.SerializeToString(), feed, threads=2)}
            timing[f"batch{batch}"] = interleaved_latency(runners, repeats=args.rounds, budget_s=120)
        result["latency_cpu_shapes"] = timing
        path.write_text(json.dumps(result, indent=2) + "\n")
        b1, b64 = timing["batch1"], timing["batch64"]
        print(f"{run}: ORT CPU (2 threads) dense / pruned {b1['dense']['median_ms']:.2f} / {b1['pruned']['median_ms']:.2f} ms "
              f"at batch 1 ({b1['dense']['median_ms'] / b1['pruned']['median_ms']:.2f}x), "
              f"{b64['dense']['median_ms']:.1f} / {b64['pruned']['median_ms']:.1f} ms at batch 64 "
              f"({b64['dense']['median_ms'] / b64['pruned']['median_ms']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
