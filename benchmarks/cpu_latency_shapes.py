"""ORT CPU latency of a paper-table run's dense and shipped models, rebuilt here from their shapes.

The CIFAR models are too large to come back from the GPU machine, so their CPU latencies in
the run's JSON file were taken on that machine's CPU. Latency does not depend on the weights' values
(ORT runs dense kernels), only on the graph and its shapes: this script rebuilds both models
through the same pipeline (the net with random weights and BatchNorm statistics, SBP gates
that reject each layer's channels beyond the shipped width, export, `onnxprune prune
--target none`), checks that every layer has the shipped width, and times dense against
pruned side by side on this machine (2 threads, batch 1 and 64, medians of interleaved
runs). The timings go into the run's JSON file (RUN.json in the results store) as `latency_cpu_shapes`.

The shipped widths were planned on the GPU host's CPU (`onnxprune prune --target ort-cpu` keeps
dead channels where a wider layer runs faster there). With `--plan-here` the script also does
what a user on this machine would: it rebuilds the model with every channel the posterior
rejected gone (the run's `pruned_all` widths), lets `onnxprune prune --target ort-cpu --threads 2`
plan the widths here, once for batch 1 and once for batch 64 (`--batch 64`), and times each
against the dense model at its batch size: `latency_cpu_planned_here`.

    python -m benchmarks.cpu_latency_shapes cifar-vgg15-sbp cifar-vgg-sbp [--rounds 30] [--plan-here]

VGG-like runs only (one gate per layer, in layer order); the weights are random, so no
error is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved_latency, machine_info, ort_runner, use_global_ort_threads
from benchmarks.store import RESULTS, locate


def rebuild(result: dict, widths_key: str = "pruned", target: str = "none", batch: int = 1):
    """(dense, pruned) ONNX models with the run's architecture, random weights, and the widths
    ``result["units"][widths_key]`` left alive by the gates; ``target``/``batch`` as for
    ``onnxprune prune`` (with "none" every layer must come out at exactly those widths)."""
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
    shipped = result["units"][widths_key]
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
    pruned = prune_model(export(wrapped, (example,)), target=target, threads=2, batch=batch).model
    widths = [w[1] for w in layer_widths(pruned).values()][:-1]
    if target == "none" and widths != shipped:
        raise SystemExit(f"{result['run']}: rebuilt widths {widths} are not the shipped {shipped}")
    return dense, pruned


def plan_here(result: dict, rounds: int) -> dict:
    """Dense against the model ``onnxprune prune --target ort-cpu --threads 2 --batch B`` plans here, per batch."""
    from tests.prune_helpers import layer_widths

    timing: dict = {"threads": 2, "weights": "random (the posterior's widths)", "machine": machine_info()}
    for batch in (1, 64):
        dense, planned = rebuild(result, "pruned_all", target="ort-cpu", batch=batch)
        feed = {"input": np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)}
        runners = {"dense": ort_runner(dense.SerializeToString(), feed, threads=2),
                   "pruned": ort_runner(planned.SerializeToString(), feed, threads=2)}
        timing[f"batch{batch}"] = interleaved_latency(runners, repeats=rounds, budget_s=120)
        timing[f"batch{batch}"]["units"] = [w[1] for w in layer_widths(planned).values()][:-1]
        t = timing[f"batch{batch}"]
        print(f"{result['run']}: planned here for batch {batch}: {'-'.join(map(str, t['units']))}, dense / pruned "
              f"{t['dense']['median_ms']:.2f} / {t['pruned']['median_ms']:.2f} ms "
              f"({t['dense']['median_ms'] / t['pruned']['median_ms']:.2f}x)", flush=True)
    return timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="runs in the results store (e.g. cifar-vgg15-sbp)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per batch size")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results store (default: %(default)s)")
    ap.add_argument("--plan-here", action="store_true",
                    help="also plan the shipped widths on this machine from the posterior's (latency_cpu_planned_here)")
    args = ap.parse_args()
    use_global_ort_threads(2)
    for run in args.runs:
        path = locate(run, args.results)
        if path is None:
            raise SystemExit(f"no run {run} in {args.results}")
        result = json.loads(path.read_text())
        if args.plan_here:
            result["latency_cpu_planned_here"] = plan_here(result, args.rounds)
            path.write_text(json.dumps(result, indent=2) + "\n")
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
