"""The engine benchmark: prune a ResNet-50 with half of each prunable group's channels dead.

Measures, in one run on this machine:
  * ``onnxprune prune`` as a separate process: time split into load /
    analysis+rewrite / verify / save, total wall time, peak memory (RSS);
  * Torch-Pruning deleting the *same* channels from the same PyTorch model:
    model load, dependency analysis + pruning, output check, ONNX export, peak RSS;
  * ONNX Runtime CPU latency (2 threads; batch 1 and 8) of the dense model, the
    onnxprune result and the Torch-Pruning result, interleaved, medians;
  * MACs of each, and speed-up relative to the MAC reduction.

    python -m benchmarks.prune_resnet50            # ~2 minutes on 2 cores
    python -m benchmarks.prune_resnet50 --quick    # resnet50_small at 64x64, for a smoke test

Writes benchmarks/results/prune-resnet50/prune-resnet50.json (or prune-resnet50-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import (
    interleaved_latency,
    machine_info,
    median,
    ort_runner,
    python_peak_rss,
    run_measured,
    use_global_ort_threads,
)
from benchmarks.store import add_results_argument, write_result

ONNXPRUNE_IMPORTS = "import onnxprune.cli, onnxprune.api, passes, onnx, onnxruntime, onnx_graphsurgeon, numpy"
TP_IMPORTS = "import torch, torch_pruning, models, onnx, numpy"


def build_dense(name: str, size: int, seed: int):
    import torch

    import models

    torch.manual_seed(seed)
    model = models.build(name).eval()
    models.randomize_batchnorm(model, seed)
    example = torch.rand(1, 3, size, size)
    return model, example


def zero_in_torch(model, by_module: dict[str, list[int]], groups_modules: dict[str, list[str]]) -> None:
    """Zero the killed channels in every producer (conv rows and the BatchNorm after it)."""
    import torch

    mods = dict(model.named_modules())
    with torch.no_grad():
        for first, idx in by_module.items():
            for conv_name in groups_modules[first]:
                conv = mods[conv_name]
                conv.weight[idx] = 0
                bn_name = _bn_after(conv_name, mods)
                if bn_name:
                    mods[bn_name].weight[idx] = 0
                    mods[bn_name].bias[idx] = 0


def _bn_after(conv_name: str, mods) -> str | None:
    """The BatchNorm that follows a conv in models/resnet_imagenet.py (conv1->bn1, downsample.0->downsample.1)."""
    if conv_name.endswith(".0") and conv_name[:-2] + ".1" in mods:
        return conv_name[:-2] + ".1"
    head, _, leaf = conv_name.rpartition(".")
    if leaf.startswith("conv"):
        cand = (head + "." if head else "") + "bn" + leaf[4:]
        return cand if cand in mods else None
    return None


def torch_pruning_worker(args) -> None:
    """Runs in its own process so its peak memory is its own."""
    import onnx
    import torch
    import torch_pruning as tp

    import models
    from onnxprune.torch_export import export_onnx

    spec = json.loads(Path(args.worker_spec).read_text())
    t0 = time.perf_counter()
    model = models.build(spec["model"]).eval()
    model.load_state_dict(torch.load(spec["state"], weights_only=True))
    example = torch.rand(1, 3, spec["size"], spec["size"])
    with torch.no_grad():
        ref = model(example)
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    mods = dict(model.named_modules())
    for name, idx in spec["prune"].items():
        group = dg.get_pruning_group(mods[name], tp.prune_conv_out_channels, idxs=idx)
        group.prune()
    t_prune = time.perf_counter() - t1

    t2 = time.perf_counter()
    with torch.no_grad():
        got = model(example)
    err = float((got - ref).abs().max() / ref.abs().max())
    t_verify = time.perf_counter() - t2

    t3 = time.perf_counter()
    onnx.save(export_onnx(model, example), spec["out"])
    t_save = time.perf_counter() - t3
    Path(spec["result"]).write_text(
        json.dumps({"load": t_load, "analysis+rewrite": t_prune, "verify": t_verify, "save": t_save, "max_rel_err": err})
    )


@dataclass
class Setup:
    """The dense model with half of each prunable group dead, as onnxprune and Torch-Pruning each receive it."""

    name: str
    size: int
    work: Path
    dead_path: Path  # the ONNX model, its dead channels zeroed
    model_bytes: int
    killed: dict  # dead channel indices per group
    by_module: dict  # the same channels per PyTorch module
    state: Path  # the PyTorch model's state dict, the same channels zeroed


def prepare(args: argparse.Namespace) -> Setup:
    """Export the dense model, kill half of each group in ONNX, zero the same channels in PyTorch."""
    import onnx
    import torch

    import models
    from onnxprune.api import inspect_model
    from onnxprune.kill import kill_channels
    from onnxprune.runtime import make_session
    from onnxprune.torch_export import export_onnx
    from tests.prune_helpers import layer_widths

    name, size = ("resnet50_small", 64) if args.quick else ("resnet50", 224)
    work = Path(tempfile.mkdtemp(prefix="onnxprune-bench-"))
    print(f"[setup] {name} at {size}x{size}; work folder {work}")
    model, example = build_dense(name, size, args.seed)
    dense = export_onnx(model, example)
    dead, killed = kill_channels(dense, 0.5, seed=args.seed)
    dead_path = work / "dense_half_dead.onnx"
    onnx.save(dead, dead_path)

    # The same channels, zeroed in PyTorch, for Torch-Pruning. ONNX layers map to modules by call order;
    # each killed group is named by its first producer and zeroed in all of them.
    node_to_module = dict(zip(layer_widths(dense), models.layer_call_order(model, example), strict=True))
    by_module = {node_to_module[group]: idx for group, idx in killed.items()}
    analysis = inspect_model(dead)[0]
    producers = {node_to_module[g.name]: [node_to_module[p] for p in g.producers] for g in analysis.groups if g.name in killed}
    zero_in_torch(model, by_module, producers)
    with torch.no_grad():
        torch_out = model(example).numpy()
    onnx_out = make_session(dead).run(None, {"input": example.numpy()})[0]
    agree = float(np.abs(torch_out - onnx_out).max() / np.abs(torch_out).max())
    print(f"[setup] {sum(len(v) for v in killed.values())} channels killed in {len(killed)} groups; "
          f"PyTorch and ONNX dense models agree to {agree:.1e}")
    state = work / "state.pt"
    torch.save(model.state_dict(), state)
    return Setup(name, size, work, dead_path, dead_path.stat().st_size, killed, by_module, state)


def time_onnxprune(setup: Setup, repeats: int) -> tuple[list[dict], dict, Path]:
    """``onnxprune prune`` as the user runs it, ``repeats`` times: (runs, the first run's report, the pruned model)."""
    runs = []
    pruned_path = setup.work / "pruned_onnxprune.onnx"
    for r in range(repeats):
        report = setup.work / f"report{r}.json"
        wall, peak, _ = run_measured(
            ["-m", "onnxprune", "prune", str(setup.dead_path), "-o", str(pruned_path), "--target", "none", "--report", str(report), "-q"]
        )
        timings = json.loads(report.read_text())["timings_s"]
        runs.append({"wall": wall, "peak_rss": peak, **timings})
        print(f"[onnxprune] run {r + 1}: {wall:.2f} s, peak {peak / 1e6:.0f} MB, {timings}")
    return runs, json.loads((setup.work / "report0.json").read_text()), pruned_path


def time_torch_pruning(setup: Setup, repeats: int) -> tuple[list[dict], Path]:
    """Torch-Pruning deleting the same channels, each run in its own process: (runs, its exported model)."""
    runs = []
    tp_path = setup.work / "pruned_torch_pruning.onnx"
    for r in range(repeats):
        spec = setup.work / "tp_spec.json"
        res = setup.work / f"tp_result{r}.json"
        spec.write_text(json.dumps({"model": setup.name, "state": str(setup.state), "size": setup.size,
                                    "prune": setup.by_module, "out": str(tp_path), "result": str(res)}))
        wall, peak, _ = run_measured(["-m", "benchmarks.prune_resnet50", "--worker-spec", str(spec)])
        timings = json.loads(res.read_text())
        runs.append({"wall": wall, "peak_rss": peak, **timings, "other": _other(wall, timings)})
        print(f"[torch-pruning] run {r + 1}: {wall:.2f} s, peak {peak / 1e6:.0f} MB, {timings}")
    return runs, tp_path


def side_by_side_latency(setup: Setup, pruned_path: Path, tp_path: Path, runs: int) -> dict:
    """ORT CPU latency of the three models, batch 1 and 8, interleaved."""
    latency = {}
    for batch in (1, 8):
        feed = {"input": np.random.default_rng(0).random((batch, 3, setup.size, setup.size), dtype=np.float32)}
        runners = {
            "dense": ort_runner(str(setup.dead_path), feed),
            "onnxprune": ort_runner(str(pruned_path), feed),
            "torch_pruning": ort_runner(str(tp_path), feed),
        }
        latency[f"batch{batch}"] = interleaved_latency(runners, repeats=runs, budget_s=120)
        print(f"[latency] batch {batch}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in latency[f'batch{batch}'].items()))
    return latency


TP_PHASES = ("load", "analysis+rewrite", "verify", "save")


def _other(wall: float, timings: dict) -> float:
    """Torch-Pruning's wall time outside its timed phases: interpreter start-up, imports, exit (``onnxprune prune``
    reports its own: startup and other)."""
    return wall - sum(timings[k] for k in TP_PHASES)


def summary(runs: list[dict]) -> dict:
    """Medians over the runs of one tool."""
    keys = ["wall", "peak_rss", "startup", "load", "analysis+rewrite", "save", "check", "verify", "other"]
    return {k: median([r[k] for r in runs]) for k in keys if k in runs[0]}


def assemble(args: argparse.Namespace, setup: Setup, op: tuple[list[dict], int], tp: tuple[list[dict], int],
             macs: dict, params: dict, latency: dict, same_widths: bool) -> dict:
    """The result file's content; ``op`` and ``tp``: each tool's runs and its interpreter's baseline RSS."""
    (op_runs, baseline_op), (tp_runs, baseline_tp) = op, tp
    op_sum, tp_sum = summary(op_runs), summary(tp_runs)
    model_bytes = setup.model_bytes
    mac_ratio = macs["dense"] / macs["onnxprune"]
    speedup = {b: v["dense"]["median_ms"] / v["onnxprune"]["median_ms"] for b, v in latency.items()}
    return {
        "benchmark": "prune-resnet50",
        "machine": machine_info(),
        "config": {"model": setup.name, "input": [1, 3, setup.size, setup.size], "dead_fraction_per_group": 0.5,
                   "groups_killed": len(setup.killed), "channels_killed": sum(len(v) for v in setup.killed.values()),
                   "repeats": args.repeats, "ort_threads": 2, "model_file_bytes": model_bytes,
                   # onnxprune's load phase copies the weights out of the protobuf (docs/engine.md, "Large models")
                   "onnxprune_load_copies_weights": True},
        "onnxprune": {"runs": op_runs, "median": op_sum, "baseline_rss": baseline_op,
                      "peak_over_baseline_vs_model": (op_sum["peak_rss"] - baseline_op) / model_bytes,
                      "peak_vs_model": op_sum["peak_rss"] / model_bytes},
        "torch_pruning": {"runs": tp_runs, "median": tp_sum, "baseline_rss": baseline_tp,
                          "peak_over_baseline_vs_model": (tp_sum["peak_rss"] - baseline_tp) / model_bytes,
                          "same_widths_as_onnxprune": same_widths},
        "macs": macs,
        "params": params,
        "latency": latency,
        "mac_reduction": mac_ratio,
        "speedup": speedup,
        "speedup_over_mac_reduction": {b: s / mac_ratio for b, s in speedup.items()},
        "targets": {
            "analysis+rewrite < 1 s": op_sum["analysis+rewrite"] < 1.0,
            "analysis+rewrite <= Torch-Pruning's": op_sum["analysis+rewrite"] <= tp_sum["analysis+rewrite"],
            "whole command < 5 s": op_sum["wall"] < 5.0,
            "peak memory < 3x model size (above interpreter baseline)": (op_sum["peak_rss"] - baseline_op) < 3 * model_bytes,
            "speed-up >= 0.9x MAC reduction (batch 1)": speedup["batch1"] >= 0.9 * mac_ratio,
        },
    }


def parse_args() -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet50_small at 64x64 (smoke test)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each pruning tool (medians reported)")
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    add_results_argument(ap, "prune-resnet50")
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    """Prune with both tools, time them and their models, write the result."""
    args = parse_args()
    if args.worker_spec:
        torch_pruning_worker(args)
        return
    use_global_ort_threads(2)  # before any ONNX Runtime session exists in this process
    import onnx

    from tests.prune_helpers import layer_widths

    load_before = os.getloadavg()
    setup = prepare(args)
    baseline_op = python_peak_rss(ONNXPRUNE_IMPORTS)
    op_runs, op_report, pruned_path = time_onnxprune(setup, args.repeats)
    baseline_tp = python_peak_rss(TP_IMPORTS)
    tp_runs, tp_path = time_torch_pruning(setup, args.repeats)
    op_pruned, tp_pruned = onnx.load(pruned_path), onnx.load(tp_path)
    same_widths = sorted(w[1] for w in layer_widths(op_pruned).values()) == sorted(w[1] for w in layer_widths(tp_pruned).values())
    macs = {"dense": op_report["before"]["macs"], "onnxprune": op_report["after"]["macs"], "torch_pruning": _macs(tp_pruned)}
    params = {"dense": op_report["before"]["params"], "onnxprune": op_report["after"]["params"], "torch_pruning": _params(tp_pruned)}
    latency = side_by_side_latency(setup, pruned_path, tp_path, args.latency_runs)
    result = assemble(args, setup, (op_runs, baseline_op), (tp_runs, baseline_tp), macs, params, latency, same_widths)
    # The machine is shared: its 1-minute load average when the run began and ended says how busy it was.
    result["machine"]["load_average_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    path = write_result(args.results, "prune-resnet50-quick" if args.quick else "prune-resnet50", result)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {path}")


def _macs(model) -> int:
    from onnxprune.api import inspect_model

    return inspect_model(model)[2].macs


def _params(model) -> int:
    from onnxprune.api import inspect_model

    return inspect_model(model)[2].params


if __name__ == "__main__":
    main()
