"""Why a Bayesian model's BatchNorm statistics are re-estimated after training (``fit(recalibrate=True)``).

During training the gates multiply channels by noise; a BatchNorm fed by gated channels then
stores running variances that include the noise. Evaluation (and the exported ONNX model) uses
the deterministic gates, whose outputs vary less, so every such BatchNorm over-normalises and
the error grows layer after layer. This script shows the effect on a small case that runs on a
CPU in a few minutes: the VGG-like net at width 0.25 on 8000 CIFAR-10 (JPEG copy) training
images, dense for 4 epochs, then SBP for 4 epochs with the KL term weighted so that many gates
become wide (noisy) without being rejected. It reports the test accuracy (2000 random test images)
of the dense net, of the SBP net evaluated with the statistics training left, and of the same
net after :func:`onnxprune.bayes.training.recalibrate_norms`.

    python -m benchmarks.bn_recalibration            # about 3 min on 2 cores
    python -m benchmarks.bn_recalibration --device cuda --width 1 --train 50000 --test 10000 \
        --dense-epochs 8 --sbp-epochs 6 --lr 1e-3 --kl-scale 1 --run bn-recalibration-vgg-cuda   # full scale, a GPU
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.store import add_results_argument, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="folder holding the CIFAR-10 JPEG archive (default: ../shared/data)")
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--kl-scale", type=float, default=5.0)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--dense-epochs", type=int, default=4)
    ap.add_argument("--sbp-epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4, help="SBP weights' learning rate (gates: --gate-lr)")
    ap.add_argument("--gate-lr", type=float, default=3e-2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--run", default="bn-recalibration", help="the run's name in the results store")
    add_results_argument(ap, "bn-recalibration")
    args = ap.parse_args()
    import numpy as np
    import torch

    import models
    from onnxprune import bayes
    from onnxprune.bayes.training import evaluate, fit, recalibrate_norms
    from onnxprune.data import augment_batch, load_dataset

    torch.set_num_threads(2)
    dev = torch.device(args.device)
    # compiling the whole step takes minutes; the gates alone compile in under one (CUDA default)
    opts = {"device": dev, "progress": False, "compile_step": False}
    x, y = load_dataset("cifar10", args.data_dir, "train", as_uint8=True)
    xt, yt = load_dataset("cifar10", args.data_dir, "test", as_uint8=True)
    # random subsets: the arrays are sorted by class
    i = np.random.default_rng(0).permutation(len(x))[: args.train]
    j = np.random.default_rng(1).permutation(len(xt))[: args.test]
    x, y, xt, yt = x[i], y[i], xt[j], yt[j]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    dense = models.build("vgg_cifar", width=args.width)
    fit(dense, x, y, epochs=args.dense_epochs, lr=1e-3, lr_schedule="cosine", augment=augment_batch, **opts)
    dense_accuracy = evaluate(dense, xt, yt, device=dev)
    wrapped = bayes.wrap(dense, (torch.zeros(1, 3, 32, 32, device=dev),), method="sbp").to(dev)
    fit(wrapped, x, y, epochs=args.sbp_epochs, lr=args.lr, gate_lr=args.gate_lr, kl_scale=args.kl_scale,
        augment=augment_batch, recalibrate=False, **opts)
    stale = evaluate(wrapped, xt, yt, device=dev)
    fixed = copy.deepcopy(wrapped)
    n_norms = recalibrate_norms(fixed, x, device=dev)
    row = {
        "dense_accuracy": dense_accuracy,
        "kept_fraction": wrapped.kept_fraction(),
        "sbp_accuracy_training_statistics": stale,
        "sbp_accuracy_recalibrated": evaluate(fixed, xt, yt, device=dev),
        "batchnorms_recalibrated": n_norms,
        "seconds": time.perf_counter() - t0,
    }
    print(", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    result = {
        "benchmark": "bn-recalibration",
        "machine": machine_info(),
        "config": {"model": "vgg_cifar", "width": args.width, "data": "cifar10 (JPEG copy)", "train_images": len(x),
                   "test_images": len(xt), "dense": f"{args.dense_epochs} epochs, Adam 1e-3, cosine",
                   "sbp": f"{args.sbp_epochs} epochs, Adam {args.lr:g}, gates {args.gate_lr:g}", "kl_scale": args.kl_scale,
                   "device": args.device, "seed": 0},
        "result": row,
    }
    print("wrote", write_result(args.results, args.run, result))


if __name__ == "__main__":
    main()
