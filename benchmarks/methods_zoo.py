"""Every MNIST and CIFAR-10 architecture in `models/` through each Bayesian method, end to end.

Issue #5 asks that RBP and Turbo-VBI train the reference architectures on MNIST and CIFAR-10 and
end in a pruned ONNX model whose test accuracy equals the wrapped model's in evaluation mode.
The paper table (`paper_table.py`) does that at full budget for LeNet5, LeNet-300-100, VGG-like
and ResNet-56; this script does it for every architecture in the registry whose dataset is MNIST
or CIFAR-10, with a short budget: `onnxprune train`'s pipeline (`onnxprune.pipeline.run`) on a
fixed random subset of the training set (`--train-limit`), a few dense and Bayesian epochs,
then export, `onnxprune prune --target none` and the whole test set on ONNX Runtime against the
wrapped net's predictions in PyTorch. It checks the pipeline, not the methods' accuracy.

    python -m benchmarks.methods_zoo [--methods rbp turbo-vbi] [--models vgg_cifar resnet20] [--device cuda]

Results: benchmarks/results/methods-zoo/RUN.json (one row per model and method; --run), shown in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import ROOT, machine_info, use_global_ort_threads
from benchmarks.store import add_results_argument, write_result

ZOO_DATASETS = ("mnist", "cifar10")


def zoo_models() -> list[tuple[str, str]]:
    """(model, dataset) for every registry model trained on MNIST or CIFAR-10."""
    import models

    return [(name, spec.dataset) for name, spec in models.REGISTRY.items() if spec.dataset in ZOO_DATASETS]


def run_one(model: str, data: str, method: str, args: argparse.Namespace) -> dict:
    """Train, export, prune and check one (model, method); the row of the result table."""
    from onnxprune.pipeline import TrainConfig, run

    cfg = TrainConfig(model=model, data=data, data_dir=args.data_dir, out=str(args.work / f"{model}-{method}"),
                      method=method, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, seed=args.seed,
                      device=args.device, target="none", threads=2, progress=False, train_limit=args.train_limit,
                      kl_scale=args.kl_scale, kl_weighting=args.kl_weighting,
                      gate_options=dict(args.gate_options.get(method, {})), gate_lr=args.gate_lr.get(method, 3e-2),
                      compile=False if args.no_compile else None)
    t = time.perf_counter()
    report = run(cfg)
    groups = report["groups"]
    return {
        "model": model, "data": data, "method": method,
        "train_images": report["data"]["train"], "test_images": report["data"]["test"],
        "dense_error_torch": report["dense"]["error_torch"], "dense_error_onnx": report["dense"]["error_onnx"],
        "wrapped_error_torch": report["wrapped"]["error_torch_eval"],
        "pruned_error_onnx": report["pruned"]["error_onnx"],
        "agreement_with_wrapped": report["pruned"]["agreement_with_wrapped"],
        "channels_kept": sum(g["kept"] for g in groups), "channels_gated": sum(g["channels"] for g in groups),
        "macs": {"dense": report["dense"]["macs"], "pruned": report["pruned"]["macs"]},
        "params": {"dense": report["dense"]["params"], "pruned": report["pruned"]["params"]},
        "seconds": time.perf_counter() - t,
    }


def parse_gate_options(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, dict[str, float]]:
    """`METHOD.KEY=VALUE` strings as {method: {key: float(value)}}; a malformed one is an argument error."""
    options: dict[str, dict[str, float]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        method, dot, key = head.partition(".")
        if not sep or not dot or method not in ("sbp", "rbp", "turbo-vbi"):
            ap.error(f"--gate-option {item!r}: expected METHOD.KEY=VALUE with METHOD sbp, rbp or turbo-vbi")
        try:
            options.setdefault(method, {})[key] = float(value)
        except ValueError:
            ap.error(f"--gate-option {item!r}: {value!r} is not a number")
    return options


def parse_gate_lrs(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """`METHOD=LR` strings as {method: lr}; a malformed one is an argument error."""
    lrs: dict[str, float] = {}
    for item in items:
        method, sep, value = item.partition("=")
        if not sep or method not in ("sbp", "rbp", "turbo-vbi"):
            ap.error(f"--gate-lr {item!r}: expected METHOD=LR with METHOD sbp, rbp or turbo-vbi")
        try:
            lrs[method] = float(value)
        except ValueError:
            ap.error(f"--gate-lr {item!r}: {value!r} is not a number")
    return lrs


def main() -> None:
    names = [m for m, _ in zoo_models()]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=names, choices=names, metavar="MODEL",
                    help=f"registry models (default: all on MNIST or CIFAR-10: {', '.join(names)})")
    ap.add_argument("--methods", nargs="+", default=["rbp", "turbo-vbi"], choices=["sbp", "rbp", "turbo-vbi"])
    ap.add_argument("--train-limit", type=int, default=10000, help="training images per run (default 10000)")
    ap.add_argument("--pretrain-epochs", type=int, default=2, help="dense epochs (default 2)")
    ap.add_argument("--epochs", type=int, default=3, help="Bayesian epochs (default 3)")
    ap.add_argument("--kl-scale", type=float, default=1.0, help="multiplies the KL term (default 1: the ELBO)")
    ap.add_argument("--kl-weighting", choices=("none", "macs"), default="none", help="weight each channel's KL by its MACs")
    ap.add_argument("--gate-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a gate option for one method's runs, e.g. turbo-vbi.prior_weight=0.01 (repeatable)")
    ap.add_argument("--gate-lr", action="append", default=[], metavar="METHOD=LR",
                    help="the gates' learning rate for one method (default 3e-2, the pipeline's); RBP's layer-by-layer "
                         "stages are short on a deep net, and at 3e-2 its noise cannot reach the rejection threshold")
    ap.add_argument("--no-compile", action="store_true", help="train eagerly (a short run does not win back a compile)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "methods-zoo")
    add_results_argument(ap, "methods-zoo")
    ap.add_argument("--run", default="methods-zoo", help="the zoo's name in the results store (RESULTS/RUN.json)")
    args = ap.parse_args()
    args.gate_options = parse_gate_options(ap, args.gate_option)
    args.gate_lr = parse_gate_lrs(ap, args.gate_lr)
    use_global_ort_threads(2)
    datasets = dict(zoo_models())
    result = {"benchmark": "methods-zoo", "machine": machine_info(),
              "config": {"train_limit": args.train_limit, "pretrain_epochs": args.pretrain_epochs, "epochs": args.epochs,
                         "device": args.device, "seed": args.seed, "kl_scale": args.kl_scale,
                         "kl_weighting": args.kl_weighting, "gate_options": args.gate_options,
                         "gate_lr": args.gate_lr, "compile": not args.no_compile,
                         "torch_eval_precision": "ieee float32", "models": args.models, "methods": args.methods},
              "rows": []}
    for model in args.models:
        for method in args.methods:
            row = run_one(model, datasets[model], method, args)
            result["rows"].append(row)
            # written after every row: a run cut short (a GPU lease ending) keeps the rows it finished
            write_result(args.results, args.run, result)
            print(f"{model} / {method}: wrapped {100 * row['wrapped_error_torch']:.2f} % error, pruned ONNX "
                  f"{100 * row['pruned_error_onnx']:.2f} %, agreement {100 * row['agreement_with_wrapped']:.2f} %, "
                  f"{row['channels_kept']}/{row['channels_gated']} channels kept ({row['seconds']:.0f} s)", flush=True)
    print(f"wrote {args.results / args.run}.json")


if __name__ == "__main__":
    main()
