"""Turbo-VBI on a net with BatchNorm: the prior on the raw weights vs on the BatchNorm-folded weights.

A Conv followed by BatchNorm computes the same training output whatever the scale of each of
its weight rows, so a shrinkage prior on the raw weights meets no resistance from the data:
Adam drives the rows towards zero (about ``lr`` per weight and step) until BatchNorm's eps
dominates the channel's variance and the signal dies. Turbo-VBI therefore regularises the
folded weights ``gamma * w / sqrt(running_var + eps)`` (gate option ``fold_norms``, on by
default; docs/methods.md, Turbo-VBI). This script trains the VGG-like net at width 0.25 on
8000 CIFAR-10 (JPEG copy) images, dense for 4 epochs, then Turbo-VBI for 3 epochs (Adam 1e-3,
cosine) once with each choice, and reports the training accuracy of the last epoch, the
channels kept, the smallest mean row norm of a gated conv relative to its start, and the test
accuracy (2000 random test images, after ``fit``'s BatchNorm re-estimation).

    python -m benchmarks.tvbi_batchnorm        # about 2 min on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.store import add_results_argument, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    add_results_argument(ap, "tvbi-batchnorm")
    args = ap.parse_args()
    import copy

    import numpy as np
    import torch

    import models
    from onnxprune import bayes
    from onnxprune.bayes.training import evaluate, fit
    from onnxprune.data import augment_batch, load_dataset

    torch.set_num_threads(2)
    x, y = load_dataset("cifar10", args.data_dir, "train", as_uint8=True)
    xt, yt = load_dataset("cifar10", args.data_dir, "test", as_uint8=True)
    i = np.random.default_rng(0).permutation(len(x))[: args.train]  # random subsets: the arrays are sorted by class
    j = np.random.default_rng(1).permutation(len(xt))[: args.test]
    x, y, xt, yt = x[i], y[i], xt[j], yt[j]
    torch.manual_seed(0)
    dense = models.build("vgg_cifar", width=0.25)
    fit(dense, x, y, epochs=4, lr=1e-3, lr_schedule="cosine", augment=augment_batch, progress=False)
    rows = [{"variant": "dense", "test_accuracy": evaluate(dense, xt, yt)}]
    for fold in (False, True):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        wrapped = bayes.wrap(copy.deepcopy(dense), (torch.zeros(1, 3, 32, 32),), method="turbo-vbi", fold_norms=fold)
        convs = [wrapped.model.get_submodule(s.layer) for s in wrapped.sites if s.norm]
        start = [c.weight.detach().flatten(1).norm(dim=1).mean() for c in convs]
        history = fit(wrapped, x, y, epochs=args.epochs, lr=args.lr, lr_schedule="cosine", augment=augment_batch,
                      progress=False)
        shrink = min(float(c.weight.detach().flatten(1).norm(dim=1).mean() / s) for c, s in zip(convs, start))
        rows.append({"variant": "prior on folded weights" if fold else "prior on raw weights", "fold_norms": fold,
                     "train_accuracy_last_epoch": history.epochs[-1].accuracy, "kept_fraction": wrapped.kept_fraction(),
                     "units": [k for k, _ in wrapped.kept().values()], "smallest_row_norm_ratio": shrink,
                     "test_accuracy": evaluate(wrapped, xt, yt), "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
    result = {
        "benchmark": "tvbi-batchnorm",
        "machine": machine_info(),
        "config": {"model": "vgg_cifar", "width": 0.25, "data": "cifar10 (JPEG copy)", "train_images": len(x),
                   "test_images": len(xt), "dense": "4 epochs, Adam 1e-3, cosine",
                   "turbo_vbi": f"{args.epochs} epochs, Adam {args.lr:g}, cosine, default gate options", "seed": 0},
        "rows": rows,
    }
    print("wrote", write_result(args.results, "tvbi-batchnorm", result))


if __name__ == "__main__":
    main()
