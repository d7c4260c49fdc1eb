"""Seconds per epoch of RBP's compiled training step, its gates reading the stage as data or branching on it.

RBP trains its gates layer by layer: every stage of the schedule moves gates from dormant to active
to frozen. `fit` compiles its whole training step on CUDA (`torch.compile`); a gate that branches on
its host-side state makes each stage a new graph, so with as many stages as epochs the step is
recompiled every epoch. Since 2026-11-22 `fit` has the gates read their state from a buffer as data
(`state_as_data`), one graph for all stages. This script trains the same wrapped net both ways, each
in a fresh process with Inductor's caches off, and records every epoch's seconds and the graphs
compiled.

    python -m benchmarks.rbp_compile [--model lenet5] [--epochs 6] [--train-limit 1024] [--device cpu]

Results: benchmarks/results/rbp-compile/rbp-compile-MODEL-DEVICE.json, shown in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks.common import machine_info, python_env
from benchmarks.store import add_results_argument, write_result

MODES = {"state as data": "data", "branches on the state": "branches"}


def train_once(args: argparse.Namespace, mode: str) -> dict:
    """One compiled RBP training run in this process; ``mode`` "branches" keeps the gates' host-side branches
    (what fit did before the stage was read as data)."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    import models
    from onnxprune import bayes
    from onnxprune.bayes.training import fit
    from onnxprune.bayes.wrapper import BayesianModel
    from onnxprune.data import load_dataset

    if mode == "branches":
        BayesianModel.read_states_as_data = lambda self, flag: None  # the gates keep branching on their state
    spec = models.REGISTRY[args.model]
    x, y = load_dataset(spec.dataset, args.data_dir, "train")
    j = np.random.default_rng(0).permutation(len(x))[: args.train_limit]
    x, y = x[j], y[j]
    torch.manual_seed(0)
    example = torch.as_tensor(x[:2]).float()
    wrapped = bayes.wrap(models.build(args.model), (example,), method="rbp").to(args.device)
    stages = max(g.stage_count for g in wrapped.bank.gates.values())
    history = fit(wrapped, x, y, epochs=args.epochs, compile_step=True, compile_gates=False, device=args.device,
                  progress=False)
    return {"mode": mode, "stages": stages, "graphs_compiled": int(counters["stats"]["unique_graphs"]),
            "epoch_seconds": [e.seconds for e in history.epochs], "kept_fraction": wrapped.kept_fraction()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet5", help="registry model (default lenet5)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train-limit", type=int, default=1024, help="training images (default 1024)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir")
    add_results_argument(ap, "rbp-compile", "; the run: rbp-compile-MODEL-DEVICE")
    ap.add_argument("--one", choices=sorted(MODES.values()), help=argparse.SUPPRESS)  # a child process's mode
    args = ap.parse_args()
    if args.one:
        print(json.dumps(train_once(args, args.one)))
        return
    env = python_env({**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"})
    rows = []
    for label, mode in MODES.items():
        cmd = [sys.executable, "-m", "benchmarks.rbp_compile", "--model", args.model, "--epochs", str(args.epochs), "--train-limit",
               str(args.train_limit), "--device", args.device, "--one", mode]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"rbp_compile: the {label!r} run failed: {proc.stderr.strip().splitlines()[-1]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({**row, "label": label})
        print(f"{label}: {row['graphs_compiled']} graphs, epochs " +
              ", ".join(f"{s:.1f}" for s in row["epoch_seconds"]) + f" s (total {sum(row['epoch_seconds']):.1f} s)")
    result = {"benchmark": "rbp-compile", "machine": machine_info(),
              "config": {"model": args.model, "epochs": args.epochs, "train_limit": args.train_limit,
                         "device": args.device, "inductor_caches": "off"}, "rows": rows}
    run = f"rbp-compile-{args.model}-{args.device.split(':')[0]}"
    print(f"wrote {write_result(args.results, run, result)}")


if __name__ == "__main__":
    main()
