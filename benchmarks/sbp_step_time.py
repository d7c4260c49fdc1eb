"""Time of one SBP training step: eager gates, gates compiled alone, the whole step compiled.

An SBP gate's KL, sampling and SNR are float64 closed forms written with many
small, numerically careful operations (onnxprune/bayes/truncnorm.py): hundreds
of tiny kernels per gate and step, which on a GPU cost far more than the
network itself. Compiling the gates alone leaves the glue between them and
the layers (hundreds of launches); ``fit`` therefore compiles the whole forward
pass and loss into one graph on CUDA (``compile_step``). This script measures
what each gives: for each model, the median time of a full training step
(forward, negative ELBO, backward, fused Adam, clipping) of the dense net (eager
and compiled), of the SBP net with eager gates, compiled gates and the compiled
step, batch 128, random data on the device, after warm-up; plus the one-off
compile times.

    python -m benchmarks.sbp_step_time --device cuda          # on the GPU machine
    python -m benchmarks.sbp_step_time --device cpu --models lenet5
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import machine_info
from benchmarks.store import add_results_argument, write_result


def step_times(model, x, y, steps: int, bayesian: bool, sync, compile_step: bool = False) -> list[float]:
    """Seconds per training step, ``steps`` of them after 5 warm-up steps (``compile_step``: the
    forward pass and loss compiled into one graph, as ``fit(compile_step=True)`` does)."""
    import torch
    import torch.nn.functional as F

    from onnxprune import bayes

    def forward_loss(x, y):
        logits = model(x)
        return bayes.elbo(logits, y, model, 60000) / 60000 if bayesian else F.cross_entropy(logits, y)

    if compile_step:
        forward_loss = torch.compile(forward_loss, dynamic=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=x.is_cuda)
    times = []
    for i in range(5 + steps):
        sync()
        t0 = time.perf_counter()
        loss = forward_loss(x, y)
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
    ap.add_argument("--variants", nargs="+", default=["eager", "gates", "step"], choices=["eager", "gates", "step"],
                    help="eager gates, gates compiled alone, or the whole forward pass and loss compiled")
    add_results_argument(ap, "sbp-step-time")
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
        if "step" in args.variants:
            dense_c = models.build(name).to(device)
            step_times(dense_c, x, y, 0, False, sync, compile_step=True)
            row["dense_step_compiled_ms"] = 1e3 * statistics.median(step_times(dense_c, x, y, args.steps, False, sync, compile_step=True))
        # eager gates; gates compiled alone (fit's compile_gates); the whole forward and loss compiled (compile_step)
        for key in args.variants:
            torch.manual_seed(0)
            wrapped = bayes.wrap(models.build(name), (torch.zeros(1, *shape),), method="sbp",
                                 gate_inputs=name in ("lenet300", "lenet500")).to(device)
            wrapped.compile_gates(key != "eager")
            t0 = time.perf_counter()
            step_times(wrapped, x, y, 0, True, sync, compile_step=key == "step")  # warm-up (and compilation)
            warm = time.perf_counter() - t0
            row[f"sbp_{key}_ms"] = 1e3 * statistics.median(step_times(wrapped, x, y, args.steps, True, sync, compile_step=key == "step"))
            if key != "eager":
                row[f"{key}_compile_s"] = warm
        rows.append(row)
        print(f"[{name}] " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        # written after every model: a run stopped early (device time) keeps the rows it has
        result = {
            "benchmark": "sbp-step-time",
            "machine": machine_info(),
            "config": {"device": args.device, "batch": args.batch, "steps": args.steps,
                       "step": "forward, negative ELBO, backward, fused Adam, clip; loss read back every step",
                       "variants": args.variants},
            "models": rows,
        }
        path = write_result(args.results, f"sbp-step-time-{device.type}", result)
    print("wrote", path)


if __name__ == "__main__":
    main()
