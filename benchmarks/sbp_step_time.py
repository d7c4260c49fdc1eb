"""Time of one SBP training step, eager gates vs gates compiled with torch.compile.

An SBP gate's KL, sampling and SNR are float64 closed forms written with many
small, numerically careful operations (onnxprune/bayes/truncnorm.py): hundreds
of tiny kernels per gate and step, which on a GPU cost far more than the
network itself. ``fit`` compiles them by default on CUDA. This script measures
what that gives: for each model, the median time of a full training step
(forward, negative ELBO, backward, Adam, clipping) of the dense net, of the
SBP net with eager gates and with compiled gates, batch 128, random data on
the device, after warm-up; plus the one-off compile time.

    python benchmarks/sbp_step_time.py --device cuda          # on the GPU machine
    python benchmarks/sbp_step_time.py --device cpu --models lenet5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, write_result  # noqa: E402


def step_times(model, x, y, steps: int, bayesian: bool, sync) -> list[float]:
    """Seconds per training step, ``steps`` of them after 5 warm-up steps."""
    import torch
    import torch.nn.functional as F

    from onnxprune import bayes

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(5 + steps):
        sync()
        t0 = time.perf_counter()
        logits = model(x)
        loss = bayes.elbo(logits, y, model, 60000) / 60000 if bayesian else F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bayesian:
            model.clip_()
        float(loss)  # fit reads the loss every step
        sync()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["lenet500", "lenet5", "vgg_cifar"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    import torch

    import models
    from onnxprune import bayes

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for name in args.models:
        shape = models.REGISTRY[name].input_shape
        torch.manual_seed(0)
        x = torch.rand(args.batch, *shape, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        dense = models.build(name).to(device)
        row = {"model": name, "batch": args.batch}
        row["dense_ms"] = 1e3 * statistics.median(step_times(dense, x, y, args.steps, False, sync))
        for compiled in (False, True):
            torch.manual_seed(0)
            wrapped = bayes.wrap(models.build(name), (torch.zeros(1, *shape),), method="sbp",
                                 gate_inputs=name in ("lenet300", "lenet500")).to(device)
            wrapped.compile_gates(compiled)
            t0 = time.perf_counter()
            step_times(wrapped, x, y, 0, True, sync)  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            key = "sbp_compiled" if compiled else "sbp_eager"
            row[f"{key}_ms"] = 1e3 * statistics.median(step_times(wrapped, x, y, args.steps, True, sync))
            if compiled:
                row["compile_s"] = warm
        row["speedup"] = row["sbp_eager_ms"] / row["sbp_compiled_ms"]
        rows.append(row)
        print(f"[{name}] dense {row['dense_ms']:.2f} ms | SBP eager {row['sbp_eager_ms']:.2f} ms | "
              f"compiled {row['sbp_compiled_ms']:.2f} ms ({row['speedup']:.1f}x; compile {row['compile_s']:.0f} s)", flush=True)
    result = {
        "benchmark": "sbp-step-time",
        "machine": machine_info(),
        "config": {"device": args.device, "batch": args.batch, "steps": args.steps,
                   "step": "forward, negative ELBO, backward, Adam, clip; loss read back every step"},
        "models": rows,
    }
    run = f"sbp-step-time-{device.type}"
    print("wrote", write_result(run, result, args.results))


if __name__ == "__main__":
    main()
