"""Does SBP lose to Torch-Pruning on CIFAR because its weights barely move? Learning rate and fine-tuning.

The CIFAR rows of the paper table follow the SBP authors' VGG recipe: the weights train at Adam
1e-5 while the gates learn (their 300-epoch budget), and the Torch-Pruning baseline fine-tunes at
the dense net's 1e-3. At 60 epochs SBP then trails the baseline at the same MACs (VGG x1: 13.53 %
vs 11.41 % error). This script runs the comparison on a small case that a CPU finishes in about
half an hour: the VGG-like net at width 0.25 on 8000 CIFAR-10 (JPEG copy) training images, a dense
net, then SBP with the weights at each learning rate given (gates 3e-2, the KL term x5 so that
gates are rejected within a few epochs, BatchNorm statistics re-estimated after training), and for
each SBP net a Torch-Pruning baseline pruned from the same dense net to the same MACs and
fine-tuned as long at 1e-3. With --finetune-epochs K the last K of SBP's epochs instead fine-tune
the gate-folded network noise-free, its rejected channels held at zero (``bayes.finetune_pruned``).
Test accuracy on 2000 random test images.

    python -m benchmarks.sbp_weight_lr              # about 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info
from benchmarks.store import add_results_argument, write_result


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, help="folder holding the CIFAR-10 JPEG archive (default: ../shared/data)")
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--dense-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5, help="SBP epochs (fine-tuning included), and the baseline's")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-3], help="the SBP weights' learning rates")
    ap.add_argument("--finetune-epochs", type=int, nargs="+", default=[0, 1],
                    help="of the epochs, how many fine-tune the gate-folded net (one row per value and lr)")
    ap.add_argument("--gate-lr", type=float, default=3e-2)
    ap.add_argument("--kl-scale", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--run", default="sbp-weight-lr", help="the run's name in the results store")
    add_results_argument(ap, "sbp-weight-lr")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import numpy as np
    import torch

    import models
    from benchmarks.tp_baseline import prune_to_macs
    from onnxprune import bayes
    from onnxprune.api import inspect_model, prune_model
    from onnxprune.bayes.exporting import export
    from onnxprune.bayes.training import evaluate, fit
    from onnxprune.data import augment_batch, load_dataset
    from onnxprune.torch_export import export_onnx

    torch.set_num_threads(2)
    dev = torch.device(args.device)
    opts = {"device": dev, "progress": False, "compile_step": False, "augment": augment_batch}
    x, y = load_dataset("cifar10", args.data_dir, "train", as_uint8=True)
    xt, yt = load_dataset("cifar10", args.data_dir, "test", as_uint8=True)
    i = np.random.default_rng(0).permutation(len(x))[: args.train]  # random subsets: the arrays are sorted by class
    j = np.random.default_rng(1).permutation(len(xt))[: args.test]
    x, y, xt, yt = x[i], y[i], xt[j], yt[j]
    example = torch.zeros(1, 3, 32, 32)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    dense = models.build("vgg_cifar", width=args.width)
    fit(dense, x, y, epochs=args.dense_epochs, lr=1e-3, lr_schedule="cosine", **opts)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    dense_macs = inspect_model(export_onnx(dense.cpu().eval(), example))[2].macs
    rows = []
    for lr, tune in [(lr, k) for lr in args.lrs for k in args.finetune_epochs]:
        torch.manual_seed(0)
        dense.load_state_dict(dense_state)
        wrapped = bayes.wrap(dense.to(dev), (example.to(dev),), method="sbp").to(dev)
        fit(wrapped, x, y, epochs=args.epochs - tune, lr=lr, gate_lr=args.gate_lr, kl_scale=args.kl_scale, **opts)
        net = wrapped
        if tune:
            net = bayes.finetune_pruned(wrapped, x, y, epochs=tune, lr=1e-3, lr_schedule="cosine", **opts)
        sbp_accuracy = evaluate(net, xt, yt, device=dev)
        with tempfile.TemporaryDirectory() as tmp:
            gated = export(wrapped.cpu(), (example,)) if not tune else export_onnx(net.cpu().eval(), example)
            pruned = prune_model(gated, output=Path(tmp) / "pruned.onnx", target="none").model
        macs = inspect_model(pruned)[2].macs
        torch.manual_seed(0)
        baseline = models.build("vgg_cifar", width=args.width)
        baseline.load_state_dict(dense_state)
        baseline = prune_to_macs(baseline.eval(), example, macs)
        fit(baseline, x, y, epochs=args.epochs, lr=1e-3, lr_schedule="cosine", **opts)
        row = {"sbp_weight_lr": lr, "finetune_epochs": tune, "sbp_accuracy": sbp_accuracy, "kept_fraction": wrapped.kept_fraction(),
               "macs_reduction": dense_macs / macs,
               "torch_pruning_accuracy": evaluate(baseline, xt, yt, device=dev),
               "torch_pruning_macs_reduction": dense_macs / inspect_model(export_onnx(baseline.cpu().eval(), example))[2].macs}
        print(", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        rows.append(row)
        dense = models.build("vgg_cifar", width=args.width)
    result = {
        "benchmark": "sbp-weight-lr",
        "machine": machine_info(),
        "config": {"model": "vgg_cifar", "width": args.width, "data": "cifar10 (JPEG copy)", "train_images": len(x),
                   "test_images": len(xt), "dense": f"{args.dense_epochs} epochs, Adam 1e-3, cosine",
                   "sbp": f"{args.epochs} epochs, Adam at each weight lr, gates {args.gate_lr:g}, constant then linear decay",
                   "finetune": "the last K of those epochs: the gate-folded net, rejected channels held at zero, Adam 1e-3, cosine",
                   "torch_pruning": f"L2 magnitude to the SBP net's MACs, {args.epochs} epochs, Adam 1e-3, cosine",
                   "kl_scale": args.kl_scale, "device": args.device, "seed": 0},
        "dense_accuracy": evaluate(_with_state(models, args.width, dense_state), xt, yt, device=dev),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    print("wrote", write_result(args.results, args.run, result))


def _with_state(models, width: float, state: dict):
    net = models.build("vgg_cifar", width=width)
    net.load_state_dict(state)
    return net


if __name__ == "__main__":
    main()
