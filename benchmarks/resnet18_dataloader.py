"""Your DataLoader: torchvision's ResNet-18 on CIFAR-10, trained through a standard augmenting DataLoader, SBP against
Torch-Pruning at the same MACs.

    python -m benchmarks.resnet18_dataloader --device cuda     # the run: 25 epochs a stage, about 11 min on one H100
    python -m benchmarks.resnet18_dataloader --quick           # a smoke test on CPU (tiny data, 1 epoch a stage)

What a user brings: a ``torch.utils.data.Dataset`` over the CIFAR-10 training images whose items go through a
torchvision transform pipeline (random crop with padding 4, horizontal flip, float, normalised with the CIFAR mean
and std), a shuffling ``DataLoader`` with worker processes, and ``torchvision.models.resnet18(num_classes=10)`` with
the usual CIFAR stem (3x3 conv1 at stride 1, no max-pool), randomly initialised. ``fit`` takes that DataLoader as it
is. Stages, each E epochs (--epochs):

1. dense: Adam 1e-3, cosine decay, cross-entropy (paper_table's dense recipe);
2. SBP: ``wrap`` the dense net, train on the negative ELBO (paper_table's ResNet-56 recipe: weights 1e-3, Adam
   beta1 0.95, constant then linear decay, KL x10 weighted by MACs, the last quarter of the epochs fine-tuning the
   gate-folded net as ``finetune_pruned`` does; the gates at the pipeline's 3e-2 rather than that recipe's 1e-2,
   which had twice the steps: batch 128 and 24 epochs), then export with the gates folded in and prune
   (``compress``: every rejected channel deleted unless --target says otherwise);
3. Torch-Pruning: L2-magnitude pruning of the dense net to the SBP model's MACs (benchmarks/tp_baseline.py), then
   fine-tuned E epochs on the same DataLoader with the same optimiser and schedule.

Then the three ONNX models on ONNX Runtime: test error on the whole test set, MACs and parameters (onnxprune's
count), and CPU latency side by side (batch 1 and 64, 1 and 2 threads, interleaved rounds, medians; CUDA too
where onnxruntime has its CUDA provider). The result goes to OUT/resnet18-dataloader[-quick].json (default OUT:
benchmarks/results/resnet18-dataloader; --quick: a temporary folder), the ONNX files to the work folder
(default benchmarks/work/resnet18-dataloader, ignored by git) so they can be brought back from the GPU machine.

Time on one H100 (16 cores; measured 2026-12-07 with --epochs 3): an epoch takes about 1.9 s dense, 9.3 s SBP,
4 s SBP fine-tuning and 3.4 s Torch-Pruning fine-tuning; once per run come CIFAR-10's decoding (20 s), the compiles
(dense 25 s, SBP 65 s, each fine-tuning about 10 s), wrapping (about 45 s), Torch-Pruning's search (30 s), the
ONNX test errors on ORT CPU (40 s) and the latency (50 s): about 5.5 min fixed plus 13 s an epoch, so 25 epochs
take about 11 min. That is more than one 10-minute command: start it in the background (setsid nohup) and poll,
or pass --epochs 20.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.common import (
    ROOT,
    Stages,
    cuda_side_by_side,
    exported,
    interleaved_latency,
    last_test_error,
    machine_info,
    ort_cuda,
    shown,
)
from benchmarks.store import experiment_folder, write_result

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from onnxprune.bayes.wrapper import BayesianModel

EXPERIMENT = "resnet18-dataloader"
WORK = ROOT / "benchmarks" / "work" / EXPERIMENT
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MODELS = ("dense", "sbp", "torch_pruning")
BATCHES = (1, 64)
THREADS = (1, 2)
CUDA_BATCHES = (1, 256)
log = logging.getLogger("benchmarks.resnet18_dataloader")


def import_torchvision() -> ModuleType:
    """torchvision: a plain import, else through the tests' shim (a CPU torch beside a CUDA-built torchvision)."""
    try:
        import torchvision
    except (ImportError, RuntimeError):
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from tests.vision import import_torchvision as shimmed

        torchvision = shimmed()
    return torchvision


# -- settings --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """One run's choices (recorded in the result's config)."""

    device: str
    epochs: int
    batch_size: int
    num_workers: int
    train_images: int | None  # None: all 50000
    test_images: int | None  # None: all 10000
    image_size: int  # 32; --quick: 16 (resized first: a quarter of the compute, every code path the same)
    finetune_epochs: int  # the last K of SBP's E epochs fine-tune the gate-folded net
    lr: float = 1e-3
    gate_lr: float = 3e-2
    beta1: float = 0.95
    schedule: str = "step-linear"
    kl_scale: float = 10.0
    kl_weighting: str = "macs"
    kl_warmup_epochs: float = 0.0
    target: str = "none"  # onnxprune prune's target for the SBP model
    tp_rule: str = "at-most"
    tp_steps: int = 14  # bisection steps of Torch-Pruning's uniform ratio (each exports the candidate to count MACs)
    exporter: str = "dynamo"
    compile: str = "auto"
    rounds: int = 30
    latency_budget_s: float = 20.0
    seed: int = 0
    quick: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, help="epochs of every stage (default: 25, 1 with --quick)")
    ap.add_argument("--finetune-epochs", type=int, help="of SBP's epochs, the last K fine-tune the gate-folded net "
                    "(default: a quarter of --epochs)")
    ap.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 64 with --quick, else 128")
    ap.add_argument("--workers", type=int, help="DataLoader workers (default: min(8, CPUs); 0 with --quick)")
    ap.add_argument("--data-dir", help="the shared data folder or the CIFAR-10 JPEG folder (default: ../shared/data)")
    ap.add_argument("--out", type=Path, help="the result's folder (default: benchmarks/results/resnet18-dataloader; "
                    "--quick: a temporary folder)")
    ap.add_argument("--work", type=Path, help=f"where the ONNX models go (default: {WORK.relative_to(ROOT)}; "
                    "--quick: OUT/work)")
    ap.add_argument("--gate-lr", type=float, default=3e-2,
                    help="the gates' learning rate (default: the pipeline's 3e-2, for short runs)")
    ap.add_argument("--kl-scale", type=float, default=10.0)
    ap.add_argument("--kl-weighting", choices=("none", "macs"), default="macs")
    ap.add_argument("--target", choices=("none", "ort-cpu"), default="none",
                    help="onnxprune prune's target for the SBP model (none: every rejected channel deleted)")
    ap.add_argument("--tp-rule", choices=("at-most", "nearest"), default="at-most",
                    help="Torch-Pruning's MACs: the nearest reachable at or below SBP's (at-most), or either side")
    ap.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    ap.add_argument("--compile", choices=("auto", "none"), default="auto",
                    help="torch.compile the training step (auto: fit's default, on CUDA with Triton)")
    ap.add_argument("--rounds", type=int, help="interleaved latency rounds (default 30; --quick: 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 128 training and 256 test images resized to "
                    "16x16, 1 epoch a stage, batch 64, 2 steps of Torch-Pruning's search, 3 latency rounds")
    return ap.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    """The run's settings: the flags, with defaults by device and --quick."""
    cuda = args.device.startswith("cuda")
    epochs = args.epochs or (1 if args.quick else 25)
    finetune = args.finetune_epochs if args.finetune_epochs is not None else epochs // 4
    if not 0 <= finetune < epochs:
        raise SystemExit(f"--finetune-epochs must be at least 0 and below --epochs ({epochs}), got {finetune}")
    workers = args.workers if args.workers is not None else 0 if args.quick else min(8, os.cpu_count() or 1)
    batch = args.batch_size or (64 if args.quick else 256 if cuda else 128)
    return Settings(device=args.device, epochs=epochs, batch_size=batch, num_workers=workers,
                    train_images=128 if args.quick else None, test_images=256 if args.quick else None,
                    image_size=16 if args.quick else 32, tp_steps=2 if args.quick else 14,
                    finetune_epochs=finetune, gate_lr=args.gate_lr, kl_scale=args.kl_scale,
                    kl_weighting=args.kl_weighting, target=args.target, tp_rule=args.tp_rule, exporter=args.exporter,
                    compile=args.compile, rounds=args.rounds or (3 if args.quick else 30),
                    latency_budget_s=2.0 if args.quick else 20.0, seed=args.seed, quick=args.quick)


# -- data ------------------------------------------------------------------------------------------------------


def _dataset_class() -> type[Dataset]:
    """CifarArrays, defined where torch is imported (the module itself imports torch lazily)."""
    import torch
    from torch.utils.data import Dataset

    class CifarArrays(Dataset):
        """CIFAR-10 images as torchvision's CIFAR10 holds them (uint8 HWC) with their labels, each item through
        ``transform``: what a user's Dataset looks like."""

        def __init__(self, images_nchw: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
            self.images = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
            self.labels = labels.astype(np.int64)
            self.transform = transform

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            return self.transform(self.images[i]).as_subclass(torch.Tensor), int(self.labels[i])

    return CifarArrays


def transforms(train: bool, size: int = 32) -> Callable:
    """The torchvision v2 pipeline: [random crop (padding 4), flip], to float in [0, 1], normalised (``size`` other
    than 32: resized first, the padding scaled)."""
    import torch

    import_torchvision()
    from torchvision.transforms import v2

    resize = [] if size == 32 else [v2.Resize(size, antialias=True)]
    augment = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if train else []
    return v2.Compose([v2.ToImage(), *resize, *augment, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(CIFAR_MEAN, CIFAR_STD)])


def subset(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random ``n`` of the images (all of them for None)."""
    if n is None or n >= len(y):
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
    return x[keep], y[keep]


def make_loaders(s: Settings, data_dir: str | None) -> tuple[DataLoader, DataLoader]:
    """(training DataLoader with augmentation, test DataLoader without) over the CIFAR-10 JPEG copy."""
    from torch.utils.data import DataLoader

    from onnxprune.data import load_dataset

    dataset = _dataset_class()
    x, y = subset(*load_dataset("cifar10", data_dir, "train", as_uint8=True), s.train_images, s.seed)
    xt, yt = subset(*load_dataset("cifar10", data_dir, "test", as_uint8=True), s.test_images, s.seed + 1)
    cuda = s.device.startswith("cuda")
    common = dict(num_workers=s.num_workers, pin_memory=cuda, persistent_workers=s.num_workers > 0)
    train = DataLoader(dataset(x, y, transforms(True, s.image_size)), batch_size=s.batch_size, shuffle=True, drop_last=True,
                       **common)
    test = DataLoader(dataset(xt, yt, transforms(False, s.image_size)), batch_size=max(s.batch_size, 256), shuffle=False,
                      **common)
    return train, test


def test_arrays(test_loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """The test set as the test DataLoader gives it (normalised float32 NCHW), for ONNX Runtime."""
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in test_loader))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


# -- training --------------------------------------------------------------------------------------------------


def resnet18_cifar(seed: int) -> nn.Module:
    """torchvision's ResNet-18 for 10 classes with the CIFAR stem (3x3 conv1, stride 1; no max-pool), random init."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = import_torchvision().models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def fit_options(s: Settings, test_loader: DataLoader) -> dict:
    """fit's keywords every stage shares."""
    import torch

    device = torch.device(s.device)
    compile_flags = {} if s.compile == "auto" else {"compile_step": False, "compile_gates": False}
    return dict(device=device, seed=s.seed, amp=device.type == "cuda", eval_data=test_loader, progress=True,
                **compile_flags)


def sbp_schedule(s: Settings) -> dict:
    """The optimiser and schedule of SBP's weights and of Torch-Pruning's fine-tuning (paper_table's ResNet-56)."""
    return dict(lr=s.lr, lr_schedule=s.schedule, betas=(s.beta1, 0.999))


def train_dense(s: Settings, train_loader: DataLoader, test_loader: DataLoader, stages: Stages) -> tuple[nn.Module, list]:
    """Stage 1: the dense net, E epochs of Adam at 1e-3 with cosine decay; (net in eval mode, history)."""
    from onnxprune.bayes import fit

    dense = resnet18_cifar(s.seed)
    with stages.timed("dense"):
        history = fit(dense, train_loader, epochs=s.epochs, lr=s.lr, lr_schedule="cosine", desc="dense",
                      **fit_options(s, test_loader))
    return dense.eval(), history.to_dict()


def train_sbp(s: Settings, dense: nn.Module, example: torch.Tensor, train_loader: DataLoader, test_loader: DataLoader,
              stages: Stages) -> dict:
    """Stage 2: SBP from the dense net, E - K epochs on the ELBO, then K fine-tuning the gate-folded net;
    returns {"wrapped", "tuned" (None without fine-tuning), "history", "kl_weights"}."""
    import torch

    from onnxprune.bayes import fit, wrap
    from onnxprune.bayes.costs import weight_kl_by_macs

    device = torch.device(s.device)
    options = fit_options(s, test_loader)
    with stages.timed("sbp"):
        example = example.to(device)  # wrap traces the net where it is
        wrapped = wrap(dense.to(device), (example,), method="sbp").to(device)
        weights = weight_kl_by_macs(wrapped, (example,)) if s.kl_weighting == "macs" else None
        history = fit(wrapped, train_loader, epochs=s.epochs - s.finetune_epochs, gate_lr=s.gate_lr,
                      kl_scale=s.kl_scale, kl_warmup_epochs=s.kl_warmup_epochs, desc="sbp", **sbp_schedule(s), **options)
    log.info("[%s] SBP keeps %.1f%% of the channels", EXPERIMENT, 100 * wrapped.kept_fraction())
    tuned, tuned_history = None, []
    if s.finetune_epochs:
        with stages.timed("sbp_finetune"):
            tuned, tuned_history = finetune_folded(s, wrapped, train_loader, options)
    return {"wrapped": wrapped, "tuned": tuned, "history": history.to_dict(), "finetune_history": tuned_history,
            "kl_weights": weights}


def finetune_folded(s: Settings, wrapped: BayesianModel, train_loader: DataLoader, options: dict) -> tuple[nn.Module, list]:
    """What ``finetune_pruned`` does (gates folded in, rejected channels held at zero, K epochs at lr with cosine
    decay), on the DataLoader; (net in eval mode, history)."""
    from onnxprune.bayes import fit
    from onnxprune.bayes.exporting import fold_gates
    from onnxprune.bayes.finetune import freeze_rejected

    plain = fold_gates(wrapped).to(options["device"])
    freeze_rejected(plain)
    history = fit(plain, train_loader, epochs=s.finetune_epochs, lr=s.lr, lr_schedule="cosine", desc="sbp-finetune",
                  **options)
    return plain.eval(), history.to_dict()


def train_torch_pruning(s: Settings, dense: nn.Module, example: torch.Tensor, target_macs: int, train_loader: DataLoader,
                        test_loader: DataLoader, stages: Stages) -> tuple[nn.Module, list]:
    """Stage 3: Torch-Pruning to ``target_macs`` (by s.tp_rule), fine-tuned E epochs; (net in eval mode, history)."""
    from benchmarks.tp_baseline import prune_to_macs
    from onnxprune.bayes import fit

    with stages.timed("torch_pruning_search"):
        pruned = prune_to_macs(copy.deepcopy(dense).cpu().eval(), example.cpu(), target_macs, rule=s.tp_rule,
                               steps=s.tp_steps)
    with stages.timed("torch_pruning_finetune"):
        history = fit(pruned, train_loader, epochs=s.epochs, desc="tp-finetune", **sbp_schedule(s),
                      **fit_options(s, test_loader))
    return pruned.eval(), history.to_dict()


# -- ONNX: export, errors, costs, latency ------------------------------------------------------------------------


def export_sbp(s: Settings, sbp: dict, example: torch.Tensor, path: Path, notes: dict[str, str]) -> str:
    """SBP's model, gates folded in (or its fine-tuned net), pruned by onnxprune into ``path``; the exporter used."""
    from onnxprune.api import prune
    from onnxprune.bayes import compress, export
    from onnxprune.modelio import save_model

    wrapped, tuned = sbp["wrapped"], sbp["tuned"]

    def make(exporter: str) -> onnx.ModelProto:
        if tuned is None:
            return compress(wrapped, example, exporter=exporter, target=s.target)
        return prune(export(wrapped, example, finetuned=tuned, exporter=exporter), target=s.target)

    model, used = exported(make, s.exporter, "sbp", notes, EXPERIMENT)
    save_model(model, path)
    return used


def export_plain(s: Settings, net: nn.Module, example: torch.Tensor, key: str, path: Path, notes: dict[str, str]) -> str:
    """A plain net's ONNX model into ``path``; the exporter used."""
    from onnxprune.modelio import save_model
    from onnxprune.torch_export import export_onnx

    model, used = exported(lambda e: export_onnx(net.cpu().eval(), example, exporter=e), s.exporter, key, notes, EXPERIMENT)
    save_model(model, path)
    return used


def measure_models(files: dict[str, Path], x: np.ndarray, y: np.ndarray) -> tuple[dict[str, dict], dict]:
    """Each model's test error on ONNX Runtime (CUDA where it has it, else CPU), MACs and parameters; and its test
    predictions."""
    from onnxprune.api import inspect_model
    from onnxprune.pipeline import onnx_predictions

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_cuda() else ["CPUExecutionProvider"]
    out, predictions = {}, {}
    for key, path in files.items():
        cost = inspect_model(path)[2]
        predictions[key] = onnx_predictions(path, x, batch=500, providers=providers)
        out[key] = {"error_pct": 100 * float((predictions[key] != y).mean()), "macs": int(cost.macs),
                    "params": int(cost.params)}
    return out, predictions


def cpu_latency(files: dict[str, Path], s: Settings) -> dict:
    """ORT CPU latency of every model side by side, per thread count and batch: each session its own pool with
    spinning off (as onnxprune times), interleaved rounds, medians."""
    from onnxprune.latency.target import Target

    out: dict = {}
    for threads in THREADS:
        target = Target("ort-cpu", threads)
        sessions = {k: target.session(str(p)) for k, p in files.items()}
        out[f"threads{threads}"] = {}
        for batch in BATCHES:
            x = np.random.default_rng(batch).standard_normal((batch, 3, s.image_size, s.image_size), dtype=np.float32)
            feeds = {k: {sess.get_inputs()[0].name: x} for k, sess in sessions.items()}
            runners = {k: (lambda sess=sess, feed=feeds[k]: sess.run(None, feed)) for k, sess in sessions.items()}
            out[f"threads{threads}"][f"batch{batch}"] = interleaved_latency(runners, repeats=s.rounds,
                                                                            warmup=1 if s.quick else 2,
                                                                            budget_s=s.latency_budget_s)
            medians = ", ".join(f"{k} {t['median_ms']:.3g} ms" for k, t in out[f"threads{threads}"][f"batch{batch}"].items())
            log.info("[%s] ORT CPU %d thread(s), batch %d: %s", EXPERIMENT, threads, batch, medians)
    return out


def cuda_latency(files: dict[str, Path], s: Settings) -> dict:
    """ORT CUDA latency (batch 1 and 256, IO binding) where onnxruntime has the CUDA provider, else why not."""
    return cuda_side_by_side(files, s.image_size, CUDA_BATCHES, s.rounds)


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    """What the training stages leave: the ONNX files, the histories, SBP's facts, the export notes."""

    files: dict[str, Path]
    history: dict[str, list]
    exporters: dict[str, str]
    sbp: dict
    sbp_predictions: np.ndarray  # the SBP net's (wrapped, or fine-tuned) test predictions in PyTorch
    notes: dict[str, str]


def train_all(s: Settings, train_loader: DataLoader, test_loader: DataLoader, x_test: np.ndarray, work: Path, stages: Stages) -> Trained:
    """Dense, SBP (exported and pruned), Torch-Pruning at SBP's MACs (exported); the ONNX files in ``work``."""
    import torch

    from onnxprune.api import inspect_model
    from onnxprune.bayes.evaluation import predict

    example = torch.from_numpy(x_test[:1].copy())
    files = {k: work / f"{k}.onnx" for k in MODELS}
    notes: dict[str, str] = {}
    dense, dense_history = train_dense(s, train_loader, test_loader, stages)
    sbp = train_sbp(s, dense, example, train_loader, test_loader, stages)
    exporters = {}
    with stages.timed("sbp_export_prune"):
        exporters["sbp"] = export_sbp(s, sbp, example, files["sbp"], notes)
    sbp_macs = int(inspect_model(files["sbp"])[2].macs)
    tp, tp_history = train_torch_pruning(s, dense, example, sbp_macs, train_loader, test_loader, stages)
    with stages.timed("export_dense_tp"):
        exporters["dense"] = export_plain(s, dense, example, "dense", files["dense"], notes)
        exporters["torch_pruning"] = export_plain(s, tp, example, "torch_pruning", files["torch_pruning"], notes)
    final = sbp["tuned"] if sbp["tuned"] is not None else sbp["wrapped"]
    predictions = predict(final.to(s.device), x_test, batch_size=500, device=s.device)
    facts = {"kept_fraction": float(sbp["wrapped"].kept_fraction()), "kl_weights": sbp["kl_weights"]}
    history = {"dense": dense_history, "sbp": sbp["history"], "sbp_finetune": sbp["finetune_history"],
               "torch_pruning": tp_history}
    return Trained({k: files[k] for k in MODELS}, history, exporters, facts, predictions, notes)


def sbp_agreement(trained: Trained, models: dict, predictions: dict[str, np.ndarray], y: np.ndarray) -> None:
    """SBP's PyTorch test error (its net after training: BatchNorm statistics re-estimated, the epochs' evaluations
    came before) and the share of test images on which the pruned ONNX model predicts what that net predicts."""
    models["sbp"]["torch_error_pct"] = 100 * float((trained.sbp_predictions != y).mean())
    trained.sbp["agreement_pruned_onnx_with_torch"] = float((predictions["sbp"] == trained.sbp_predictions).mean())


def result_of(s: Settings, trained: Trained, models: dict, latency: dict, stages: Stages, loaders: tuple) -> dict:
    """The result file's content."""
    train_loader, test_loader = loaders
    last = {"dense": trained.history["dense"], "sbp": trained.history["sbp_finetune"] or trained.history["sbp"],
            "torch_pruning": trained.history["torch_pruning"]}
    for key, m in models.items():
        m.setdefault("torch_error_pct", last_test_error(last[key]))
        m.update(exporter=trained.exporters[key], file=shown(trained.files[key]))
    config = {**asdict(s), "model": "torchvision resnet18(num_classes=10), conv1 3x3 stride 1, maxpool Identity",
              "data": "cifar10 (JPEG copy)", "train_images": len(train_loader.dataset),
              "test_images": len(test_loader.dataset), "steps_per_epoch": len(train_loader),
              "train_transform": repr(train_loader.dataset.transform), "test_transform": repr(test_loader.dataset.transform),
              "dense_recipe": f"Adam lr {s.lr:g}, cosine decay",
              "sbp_recipe": f"{s.epochs - s.finetune_epochs} epochs on the ELBO (Adam lr {s.lr:g}, gates {s.gate_lr:g}, "
                            f"beta1 {s.beta1:g}, {s.schedule}, the KL term x{s.kl_scale:g}"
                            + (", weighted by MACs per channel" if s.kl_weighting == "macs" else "")
                            + f"), then {s.finetune_epochs} fine-tuning the gate-folded net (Adam lr {s.lr:g}, cosine)",
              "tp_recipe": f"L2 magnitude to SBP's MACs ({s.tp_rule}), then {s.epochs} epochs (Adam lr {s.lr:g}, "
                           f"beta1 {s.beta1:g}, {s.schedule})"}
    return {"benchmark": EXPERIMENT, "machine": machine_info(), "config": config, "models": models,
            "sbp": trained.sbp, **latency, "stage_times_s": {**stages.times, "total": round(time.perf_counter() - stages.start, 2)},
            "history": trained.history, "export_notes": trained.notes}


def main(argv: list[str] | None = None) -> None:
    """Train the three nets on the DataLoader, measure their ONNX models, write the result."""

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("onnxprune", log.name):
        logging.getLogger(name).setLevel(logging.INFO)
    args = parse_args(argv)
    s = settings_of(args)
    out = args.out or (Path(tempfile.mkdtemp(prefix=f"{EXPERIMENT}-")) if s.quick else experiment_folder(EXPERIMENT))
    work = args.work or (out / "work" if s.quick else WORK)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(EXPERIMENT, log)
    with stages.timed("data"):
        train_loader, test_loader = make_loaders(s, args.data_dir)
        x_test, y_test = test_arrays(test_loader)
    log.info("[%s] %d training images (%d batches of %d, %d workers), %d test images, on %s", EXPERIMENT,
             len(train_loader.dataset), len(train_loader), s.batch_size, s.num_workers, len(y_test), s.device)
    trained = train_all(s, train_loader, test_loader, x_test, work, stages)
    with stages.timed("evaluate"):
        models, predictions = measure_models(trained.files, x_test, y_test)
        sbp_agreement(trained, models, predictions, y_test)
    for key, m in models.items():
        log.info("[%s] %s: %.2f %% test error (ORT), %.3g MACs, %.3g params", EXPERIMENT, key, m["error_pct"],
                 m["macs"], m["params"])
    with stages.timed("latency"):
        latency = {"latency_cpu": cpu_latency(trained.files, s), "latency_cuda": cuda_latency(trained.files, s)}
    result = result_of(s, trained, models, latency, stages, (train_loader, test_loader))
    path = write_result(out, EXPERIMENT + ("-quick" if s.quick else ""), result)
    log.info("[%s] wrote %s; ONNX models in %s (%.0f s in all)", EXPERIMENT, path, work, result["stage_times_s"]["total"])


if __name__ == "__main__":
    main()
