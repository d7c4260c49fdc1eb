"""Attention heads: a small ViT on CIFAR-10, SBP over heads and MLP neurons against Torch-Pruning at the same MACs.

    python -m benchmarks.vit_heads --device cuda      # the run (defaults: 50 dense epochs, 20 for each pruning method)
    python -m benchmarks.vit_heads --smoke            # CPU smoke test: dim 32, depth 2, 512 images, 1-2 epochs

The net is ``models.vit_cifar`` (patch 4: 64 tokens and a class token, dim 192, depth 6, 6 heads of 32, MLP 384,
GELU, pre-norm), randomly initialised. The data are the CIFAR-10 arrays of ``onnxprune.data`` (the JPEG copy in
../shared/data), batched on the device with random crops (padding 4) and flips (``augment_batch``). Stages:

1. dense: ``--dense-epochs`` epochs of AdamW (lr 1e-3, weight decay 0.05 on the weight matrices, a linear warm-up
   then cosine decay), cross-entropy;
2. SBP: ``onnxprune.bayes.wrap(dense, example, method="sbp")`` gates every channel group the engine can delete
   (MLP neurons and, where the engine deletes heads, one gate per head on the value projection), trained ``--epochs``
   epochs on the negative ELBO (Adam, weights at --lr, gates at --gate-lr, step-linear, the KL term x10 weighted by MACs),
   the last quarter of them fine-tuning the gate-folded net; then exported with the gates folded in and pruned
   (``onnxprune.bayes.export`` and ``onnxprune.prune``: every rejected channel deleted unless --target says otherwise);
3. Torch-Pruning: ``MetaPruner`` with L2-magnitude importance, ``num_heads`` for the q/k/v layers,
   ``prune_num_heads=True, prune_head_dims=False`` (whole heads) and the MLP's hidden neurons, the residual
   stream left alone (patch embedding, attention and MLP output layers, classifier ignored). By default (``--tp-rule
   match``) it removes as many heads as SBP did, spread evenly over the blocks (the nearest whole number per block),
   and its MLP ratio (the same in every layer) is bisected to SBP's MACs (onnxprune's cost model): both nets then
   have the same MACs within a few neurons' worth; ``at-most``/``nearest`` instead search one ratio for heads and
   neurons (whole heads move the count in steps), per layer or ranked across layers (--tp-global); then fine-tuned
   the same ``--epochs`` epochs with SBP's weight optimiser and schedule.

Then the three ONNX models: test error on ONNX Runtime (CUDA where it has its provider, else CPU), parameters and
MACs (onnxprune's count), heads kept per layer (read from the ONNX: the value projection's output width over the
head width; for Torch-Pruning also from its modules), MLP neurons kept per layer, ONNX Runtime CPU latency with one
thread at batch 1 and 64 (interleaved rounds, medians) and CUDA latency at batch 1 and 256 (IO binding) where
onnxruntime has its CUDA provider. The result goes to OUT/vit-heads[-smoke].json (default OUT:
benchmarks/results/vit-heads; --smoke: a temporary folder), the ONNX files to the work folder (default
benchmarks/work/vit-heads, ignored by git), and a summary table to stdout.

Time (estimated, not yet measured on a GPU): on an idle 2-core CPU a training step of the full net takes about 4 ms
an image (SBP about 1.3 times that; up to 18 ms when the machine is shared), an epoch of the 50,000 images about
200 s; an H100 at roughly 100 times that (and the FLOPs agree: 0.125 GMACs an image) trains an epoch in about 2 s
dense, 2.5 s for Torch-Pruning's and SBP's fine-tuning, and about 5 s for SBP on the ELBO (the gates' kernels; the
ResNet-18 run's SBP epochs took 5 times its dense ones). Fixed costs come to about 4.5 min (CIFAR-10's decoding
20 s, four compiles about 2 min, wrapping and SBP's export and pruning 20 s, Torch-Pruning's 12-step search 20 s,
the exports 10 s, ONNX test errors 20 s, latency 50 s): D dense and E pruning epochs take about
2 D + 6.9 E s + 4.5 min, the defaults (D 50, E 20) about 8.5 minutes. Close to one 10-minute command: start it in
the background (setsid nohup) and poll, or lower the epochs.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
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

    from onnxprune.bayes.wrapper import BayesianModel

EXPERIMENT = "vit-heads"
WORK = ROOT / "benchmarks" / "work" / EXPERIMENT
MODELS = ("dense", "sbp", "torch_pruning")
LABELS = {"dense": "dense", "sbp": "onnxprune SBP", "torch_pruning": "Torch-Pruning"}
CPU_THREADS = 1
CPU_BATCHES = (1, 64)
CUDA_BATCHES = (1, 256)
log = logging.getLogger("benchmarks.vit_heads")


# -- settings --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """One run's choices (recorded in the result's config)."""

    device: str
    dense_epochs: int
    epochs: int  # of each pruning method: SBP (ELBO + fine-tuning) and Torch-Pruning's fine-tuning
    finetune_epochs: int  # the last K of SBP's epochs fine-tune the gate-folded net
    batch_size: int
    train_images: int | None  # None: all 50000
    test_images: int | None  # None: all 10000
    model: dict = field(default_factory=dict)  # vit_cifar's keywords
    dense_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    lr: float = 5e-4  # SBP's weights and Torch-Pruning's fine-tuning
    gate_lr: float = 3e-2
    beta1: float = 0.95
    schedule: str = "step-linear"
    kl_scale: float = 10.0
    kl_weighting: str = "macs"
    target: str = "none"  # onnxprune prune's target for the SBP model
    tp_rule: str = "match"
    tp_global: bool = False
    tp_steps: int = 12  # bisection steps of Torch-Pruning's ratio (each exports the candidate to count MACs)
    tp_search_exporter: str = "torchscript"  # counts the same MACs as dynamo, several times faster
    exporter: str = "dynamo"
    compile: str = "auto"
    rounds: int = 30
    latency_budget_s: float = 20.0
    seed: int = 0
    smoke: bool = False


TP_RULES = ("match", "at-most", "nearest")
SMOKE_MODEL = {"dim": 32, "depth": 2, "heads": 4, "mlp": 64}
SMOKE_TP_FRACTION = 0.75  # --smoke, where SBP rejected nothing: Torch-Pruning's MACs target, of the dense net's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dense-epochs", type=int, help="dense training epochs (default: 50, 1 with --smoke)")
    ap.add_argument("--epochs", type=int, help="epochs of each pruning method: SBP (ELBO, then fine-tuning) and "
                    "Torch-Pruning's fine-tuning (default: 20; --smoke: 2, SBP's one on the ELBO, one fine-tuning)")
    ap.add_argument("--finetune-epochs", type=int, help="of SBP's epochs, the last K fine-tune the gate-folded net "
                    "(default: a quarter of --epochs; --smoke: 1)")
    ap.add_argument("--batch-size", type=int, help="default: 256 on CUDA, 64 with --smoke, else 128")
    ap.add_argument("--train-images", type=int, help="a fixed random subset of the training images (default: all; "
                    "--smoke: 512)")
    ap.add_argument("--test-images", type=int, help="a fixed random subset of the test images (default: all; "
                    "--smoke: 256)")
    ap.add_argument("--dim", type=int, help="ViT width (default 192; --smoke: 32)")
    ap.add_argument("--depth", type=int, help="ViT blocks (default 6; --smoke: 2)")
    ap.add_argument("--heads", type=int, help="heads per block (default 6; --smoke: 4)")
    ap.add_argument("--mlp", type=int, help="MLP hidden width (default 384; --smoke: 64)")
    ap.add_argument("--data-dir", help="the shared data folder or the CIFAR-10 JPEG folder (default: ../shared/data)")
    ap.add_argument("--out", type=Path, help="the result's folder (default: benchmarks/results/vit-heads; "
                    "--smoke: a temporary folder)")
    ap.add_argument("--work", type=Path, help=f"where the ONNX models go (default: {WORK.relative_to(ROOT)}; "
                    "--smoke: OUT/work)")
    ap.add_argument("--dense-lr", type=float, default=1e-3, help="AdamW's peak learning rate (dense stage)")
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="the weights' learning rate of SBP and of Torch-Pruning's fine-tuning (default: 5e-4)")
    ap.add_argument("--gate-lr", type=float, default=3e-2, help="the gates' learning rate (default: 3e-2)")
    ap.add_argument("--kl-scale", type=float, default=10.0)
    ap.add_argument("--kl-weighting", choices=("none", "macs"), default="macs")
    ap.add_argument("--target", choices=("none", "ort-cpu"), default="none",
                    help="onnxprune prune's target for the SBP model (none: every rejected channel deleted)")
    ap.add_argument("--tp-rule", choices=TP_RULES, default="match",
                    help="Torch-Pruning's MACs: SBP's number of heads (even over the blocks) and an MLP ratio "
                    "bisected to SBP's MACs (match, the default); or one ratio for heads and neurons, the nearest "
                    "reachable at or below SBP's MACs (at-most), or either side (nearest)")
    ap.add_argument("--tp-global", action="store_true",
                    help="Torch-Pruning ranks heads and neurons across layers (default: the same ratio in every layer)")
    ap.add_argument("--tp-steps", type=int, help="bisection steps of Torch-Pruning's ratio (default 12; --smoke: 3)")
    ap.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    ap.add_argument("--compile", choices=("auto", "none"), default="auto",
                    help="torch.compile the training steps (auto: on CUDA with Triton, as fit does)")
    ap.add_argument("--rounds", type=int, help="interleaved latency rounds (default 30; --smoke: 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cuda-latency-of", type=Path, metavar="RESULT",
                    help="only measure ORT CUDA latency of RESULT's models (in --work) and write it into RESULT: for a "
                         "run whose process started before onnxruntime-gpu was importable")
    ap.add_argument("--smoke", action="store_true", help="a smoke test: ViT dim 32, depth 2, 4 heads, MLP 64; 512 "
                    "training and 256 test images, 1 dense epoch, 2 for each pruning method (SBP: 1 on the ELBO, 1 "
                    "fine-tuning), batch 64, 3 steps of Torch-Pruning's search, 3 latency rounds; where SBP rejects "
                    "nothing in so few steps, Torch-Pruning goes to 3/4 of the dense MACs so its path runs (noted)")
    return ap.parse_args(argv)


def settings_of(args: argparse.Namespace) -> Settings:
    """The run's settings: the flags, with defaults by device and --smoke."""
    cuda = args.device.startswith("cuda")
    smoke = args.smoke
    epochs = args.epochs or (2 if smoke else 20)
    finetune = args.finetune_epochs if args.finetune_epochs is not None else (1 if smoke else epochs // 4)
    if not 0 <= finetune < epochs:
        raise SystemExit(f"--finetune-epochs must be at least 0 and below --epochs ({epochs}), got {finetune}")
    base = SMOKE_MODEL if smoke else {"dim": 192, "depth": 6, "heads": 6, "mlp": 384}
    model = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    dense_epochs = args.dense_epochs if args.dense_epochs is not None else (1 if smoke else 50)
    return Settings(
        device=args.device, dense_epochs=dense_epochs, epochs=epochs, finetune_epochs=finetune,
        batch_size=args.batch_size or (64 if smoke else 256 if cuda else 128),
        train_images=args.train_images or (512 if smoke else None),
        test_images=args.test_images or (256 if smoke else None), model=model, dense_lr=args.dense_lr,
        warmup_epochs=min(2.0, dense_epochs / 10), lr=args.lr, gate_lr=args.gate_lr, kl_scale=args.kl_scale,
        kl_weighting=args.kl_weighting, target=args.target, tp_rule=args.tp_rule, tp_global=args.tp_global,
        tp_steps=args.tp_steps or (3 if smoke else 12), exporter=args.exporter, compile=args.compile,
        rounds=args.rounds or (3 if smoke else 30), latency_budget_s=2.0 if smoke else 20.0, seed=args.seed,
        smoke=smoke)


# -- data ------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """CIFAR-10 as uint8 NCHW arrays with int64 labels (the training loaders make float batches on the device)."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(s: Settings, data_dir: str | None) -> Data:
    """The training and test images (fixed random subsets where the settings ask for them)."""
    from benchmarks.resnet18_dataloader import subset
    from onnxprune.data import load_dataset

    x, y = subset(*load_dataset("cifar10", data_dir, "train", as_uint8=True), s.train_images, s.seed)
    xt, yt = subset(*load_dataset("cifar10", data_dir, "test", as_uint8=True), s.test_images, s.seed + 1)
    return Data(x, y.astype(np.int64), xt, yt.astype(np.int64))


# -- training --------------------------------------------------------------------------------------------------


def _compile(s: Settings) -> bool:
    """Whether to torch.compile training steps: fit's default (CUDA with Triton) unless --compile none."""
    import importlib.util

    return s.compile == "auto" and s.device.startswith("cuda") and importlib.util.find_spec("triton") is not None


def fit_options(s: Settings, data: Data) -> dict:
    """fit's keywords every pruning stage shares: arrays batched and augmented on the device, test accuracy per
    epoch."""
    import torch

    from onnxprune.data import augment_batch

    device = torch.device(s.device)
    compile_flags = {} if s.compile == "auto" else {"compile_step": False, "compile_gates": False}
    return dict(device=device, seed=s.seed, amp=device.type == "cuda", batch_size=s.batch_size, augment=augment_batch,
                eval_data=(data.x_test, data.y_test), progress=True, **compile_flags)


def weight_schedule(s: Settings) -> dict:
    """The optimiser and schedule of SBP's weights and of Torch-Pruning's fine-tuning (the same for both)."""
    return dict(lr=s.lr, lr_schedule=s.schedule, betas=(s.beta1, 0.999))


def vit(s: Settings) -> nn.Module:
    """The ViT of the settings, initialised from the seed."""
    import torch

    import models

    torch.manual_seed(s.seed)
    return models.build("vit_cifar", **s.model)


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on the weight matrices and kernels, none on biases, norms, tokens, positions."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith(("cls_token", "pos_embed")) else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_dense(s: Settings, data: Data, stages: Stages) -> tuple[nn.Module, list[dict]]:
    """Stage 1: the dense ViT, AdamW with a linear warm-up and cosine decay; (net in eval mode, history)."""
    import torch
    import torch.nn.functional as F

    from onnxprune.bayes.evaluation import evaluate
    from onnxprune.data import ArrayLoader, augment_batch

    device = torch.device(s.device)
    cuda = device.type == "cuda"
    model = vit(s).to(device)
    loader = ArrayLoader(data.x, data.y, s.batch_size, shuffle=True, seed=s.seed, device=device, augment=augment_batch,
                         drop_last=True)
    optimizer = torch.optim.AdamW(_decay_groups(model, s.weight_decay), lr=s.dense_lr, betas=(0.9, 0.999),
                                  fused=cuda)
    total = max(1, len(loader) * s.dense_epochs)
    warmup = max(1, int(s.warmup_epochs * len(loader)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    train_model = torch.compile(model) if _compile(s) else model
    history: list[dict] = []
    with stages.timed("dense"):
        for epoch in range(s.dense_epochs):
            loader.set_epoch(epoch)
            model.train()
            t = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            for xb, yb in loader:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                    logits = train_model(xb)
                loss = F.cross_entropy(logits.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(yb)
                correct += (logits.argmax(1) == yb).sum()
                seen += len(yb)
            accuracy = evaluate(model, data.x_test, data.y_test, device=device, batch_size=500)
            row = {"epoch": epoch + 1, "loss": float(loss_sum) / max(1, seen), "accuracy": int(correct) / max(1, seen),
                   "eval_accuracy": accuracy, "seconds": round(time.perf_counter() - t, 2)}
            history.append(row)
            log.info("[%s] dense %d/%d: loss %.4f, train acc %.4f, test acc %.4f (%.1f s)", EXPERIMENT, epoch + 1,
                     s.dense_epochs, row["loss"], row["accuracy"], accuracy, row["seconds"])
    return model.eval(), history


def train_sbp(s: Settings, dense: nn.Module, example: torch.Tensor, data: Data, stages: Stages) -> dict:
    """Stage 2: wrap with SBP gates, E-K epochs on the negative ELBO, then K epochs fine-tuning the gate-folded net;
    returns {"wrapped", "tuned" (None without fine-tuning), "history", "finetune_history", "kl_weights"}."""
    import torch

    from onnxprune.bayes import fit, wrap
    from onnxprune.bayes.costs import weight_kl_by_macs

    device = torch.device(s.device)
    options = fit_options(s, data)
    with stages.timed("sbp"):
        example = example.to(device)  # wrap traces the net where it is
        wrapped = wrap(copy.deepcopy(dense).to(device), (example,), method="sbp").to(device)
        log.info("[%s] SBP gates: %s", EXPERIMENT, ", ".join(f"{k} ({g.num_channels})" for k, g in wrapped.gates.items()))
        weights = weight_kl_by_macs(wrapped, (example,)) if s.kl_weighting == "macs" else None
        history = fit(wrapped, data.x, data.y, epochs=s.epochs - s.finetune_epochs, gate_lr=s.gate_lr,
                      kl_scale=s.kl_scale, desc="sbp", **weight_schedule(s), **options)
    log.info("[%s] SBP keeps %.1f%% of the gated channels", EXPERIMENT, 100 * wrapped.kept_fraction())
    tuned, tuned_history = None, []
    if s.finetune_epochs:
        with stages.timed("sbp_finetune"):
            tuned, tuned_history = finetune_folded(s, wrapped, data, options)
    return {"wrapped": wrapped, "tuned": tuned, "history": history.to_dict(), "finetune_history": tuned_history,
            "kl_weights": weights}


def finetune_folded(s: Settings, wrapped: BayesianModel, data: Data, options: dict) -> tuple[nn.Module, list]:
    """What ``finetune_pruned`` does (gates folded in, rejected channels held at zero, K epochs at lr with cosine
    decay); (net in eval mode, history)."""
    from onnxprune.bayes import fit
    from onnxprune.bayes.exporting import fold_gates
    from onnxprune.bayes.finetune import freeze_rejected

    plain = fold_gates(wrapped).to(options["device"])
    freeze_rejected(plain)
    history = fit(plain, data.x, data.y, epochs=s.finetune_epochs, lr=s.lr, lr_schedule="cosine",
                  desc="sbp-finetune", **options)
    return plain.eval(), history.to_dict()


# -- Torch-Pruning: heads and MLP neurons ---------------------------------------------------------------------------


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules (q/k/v/out Linear layers and ``num_heads``), in block order."""
    return [m for m in model.modules() if all(hasattr(m, a) for a in ("q", "k", "v", "out", "num_heads"))]


def tp_prune(model: nn.Module, example: torch.Tensor, ratio: float, global_pruning: bool = False,
             head_ratio: float | None = None) -> nn.Module:
    """A copy of ``model`` with Torch-Pruning's MetaPruner (L2 magnitude) at ``ratio``: that share of every block's
    MLP hidden neurons removed, and ``head_ratio`` (default: ``ratio``) of its heads (whole heads:
    ``prune_num_heads=True, prune_head_dims=False``; at least one kept); the residual stream (patch embedding,
    attention and MLP outputs, classifier) is left alone. ``num_heads`` of each attention module is set to the heads
    left."""
    import torch_pruning as tp

    m = copy.deepcopy(model).cpu().eval()
    attentions = _attention_layers(m)
    heads = max(a.num_heads for a in attentions)
    num_heads = {layer: a.num_heads for a in attentions for layer in (a.q, a.k, a.v)}
    ignored = [m.patch_embed, m.head] + [a.out for a in attentions] + [b.mlp.fc2 for b in m.blocks]
    pruner = tp.pruner.MetaPruner(
        m, example.cpu(), importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        global_pruning=global_pruning, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=True,
        prune_head_dims=False, head_pruning_ratio=min(ratio if head_ratio is None else head_ratio, (heads - 1) / heads),
        unwrapped_parameters=[(m.cls_token, 2), (m.pos_embed, 2)],
        # fresh dicts: MetaPruner's defaults are shared between calls, and it writes num_heads into them
        in_channel_groups={}, out_channel_groups={},
    )
    pruner.step()
    for a in attentions:
        a.num_heads = int(pruner.num_heads[a.q])
    if any(a.num_heads == 0 for a in attentions):
        raise EmptyBlock(f"ratio {ratio:.4f} leaves a block without heads")
    return m


class EmptyBlock(ValueError):
    """Torch-Pruning's global ranking removed every head of a block: no network at that ratio."""


def count_macs(model: nn.Module, example: torch.Tensor, exporter: str) -> int:
    """MACs as onnxprune's cost model counts them in the exported graph (the units the report compares)."""
    from onnxprune.api import inspect_model
    from onnxprune.torch_export import export_onnx

    return int(inspect_model(export_onnx(model.cpu().eval(), example.cpu(), exporter=exporter))[2].macs)


def tp_to_macs(s: Settings, dense: nn.Module, example: torch.Tensor, target_macs: int) -> tuple[nn.Module, dict]:
    """Torch-Pruning's ratio bisected so the pruned net has at most (``nearest``: about) ``target_macs``;
    (the pruned net, the search: each ratio tried and its MACs, the ratio taken)."""
    dense = copy.deepcopy(dense).cpu().eval()
    tried: list[dict] = []

    def pruned(ratio: float) -> tuple[nn.Module | None, int]:
        try:
            net = tp_prune(dense, example, ratio, s.tp_global) if ratio > 0 else copy.deepcopy(dense)
        except EmptyBlock as why:  # counts as too far: the search moves to smaller ratios
            log.info("[%s] Torch-Pruning %s", EXPERIMENT, why)
            return None, -1
        macs = count_macs(net, example, s.tp_search_exporter)
        tried.append({"ratio": round(ratio, 6), "macs": macs})
        log.info("[%s] Torch-Pruning ratio %.4f: %d MACs (target %d)", EXPERIMENT, ratio, macs, target_macs)
        return net, macs

    below, below_macs, below_ratio = pruned(0.0) + (0.0,)
    if below_macs > target_macs:
        lo, hi = 0.0, 0.99
        below = None
        for _ in range(s.tp_steps):
            mid = (lo + hi) / 2
            net, macs = pruned(mid)
            if macs > target_macs:
                lo = mid
            elif net is None:
                hi = mid
            else:
                hi, below, below_macs, below_ratio = mid, net, macs, mid
        if below is None:
            below, below_macs = pruned(hi)
            below_ratio = hi
        if s.tp_rule == "nearest" and lo > 0:
            above, above_macs = pruned(lo)
            if above_macs - target_macs < target_macs - below_macs:
                below, below_macs, below_ratio = above, above_macs, lo
    return below, {"tried": tried, "ratio": below_ratio, "macs": below_macs, "target_macs": target_macs}


def tp_match(s: Settings, dense: nn.Module, example: torch.Tensor, target_macs: int,
             sbp_heads: int) -> tuple[nn.Module, dict]:
    """Torch-Pruning with SBP's number of heads (``sbp_heads`` kept in all, spread evenly: the nearest whole number
    removed per block) and its MLP ratio bisected to the nearest of ``target_macs``; where no MLP ratio reaches the
    target, one head more (or fewer) per block goes. (The pruned net, the search.)"""
    dense = copy.deepcopy(dense).cpu().eval()
    heads = module_heads(dense)
    per_block, blocks = max(heads), len(heads)
    removed = min(per_block - 1, max(0, round((sum(heads) - sbp_heads) / blocks)))
    tried: list[dict] = []

    def pruned(ratio: float, head_ratio: float) -> tuple[nn.Module, int]:
        net = tp_prune(dense, example, ratio, head_ratio=head_ratio)
        macs = count_macs(net, example, s.tp_search_exporter)
        tried.append({"ratio": round(ratio, 6), "head_ratio": round(head_ratio, 6), "macs": macs})
        log.info("[%s] Torch-Pruning heads %.4f, MLP %.4f: %d MACs (target %d)", EXPERIMENT, head_ratio, ratio, macs,
                 target_macs)
        return net, macs

    moved = 0  # +1 once a head more per block went, -1 once one fewer: never back and forth
    while True:
        # Torch-Pruning keeps int(H * (1 - ratio)) heads: just below removed/H so the float product cannot round down
        head_ratio = max(0.0, removed / per_block - 1e-6)
        # a ratio of 0 prunes nothing at all (heads neither; 1e-9 takes one neuron a layer), 0.99 no neuron (its guard)
        lo, hi = 1e-9, 0.95
        lo_net, lo_macs = pruned(lo, head_ratio)
        hi_net, hi_macs = pruned(hi, head_ratio)
        if hi_macs > target_macs and removed < per_block - 1 and moved >= 0:
            removed, moved = removed + 1, 1
            continue
        if lo_macs < target_macs and removed > 0 and moved <= 0:
            removed, moved = removed - 1, -1
            continue
        break
    for _ in range(s.tp_steps):
        if lo_macs <= target_macs or hi_macs >= target_macs:
            break
        mid = (lo + hi) / 2
        net, macs = pruned(mid, head_ratio)
        if macs > target_macs:
            lo, lo_net, lo_macs = mid, net, macs
        else:
            hi, hi_net, hi_macs = mid, net, macs
    take_lo = abs(lo_macs - target_macs) <= abs(hi_macs - target_macs)
    net, macs, ratio = (lo_net, lo_macs, lo) if take_lo else (hi_net, hi_macs, hi)
    return net, {"tried": tried, "ratio": ratio, "head_ratio": head_ratio, "heads_removed_per_block": removed,
                 "sbp_heads": sbp_heads, "macs": macs, "target_macs": target_macs}


def train_torch_pruning(s: Settings, dense: nn.Module, example: torch.Tensor, target_macs: int, sbp_heads: int,
                        data: Data, stages: Stages) -> tuple[nn.Module, list, dict]:
    """Stage 3: Torch-Pruning to ``target_macs`` (by ``s.tp_rule``; ``match`` also to ``sbp_heads`` heads in all),
    fine-tuned E epochs; (net in eval mode, history, search)."""
    from onnxprune.bayes import fit

    with stages.timed("torch_pruning_search"):
        if s.tp_rule == "match":
            pruned, search = tp_match(s, dense, example, target_macs, sbp_heads)
        else:
            pruned, search = tp_to_macs(s, dense, example, target_macs)
    log.info("[%s] Torch-Pruning: ratio %.4f, heads %s, MLP %s", EXPERIMENT, search["ratio"], module_heads(pruned),
             [b.mlp.fc1.out_features for b in pruned.blocks])
    with stages.timed("torch_pruning_finetune"):
        history = fit(pruned, data.x, data.y, epochs=s.epochs, desc="tp-finetune", **weight_schedule(s),
                      **fit_options(s, data))
    return pruned.eval(), history.to_dict(), search


def module_heads(model: nn.Module) -> list[int]:
    """Heads per block, as the attention modules say."""
    return [int(a.num_heads) for a in _attention_layers(model)]


# -- ONNX: export, heads, errors, costs, latency ------------------------------------------------------------------


def layer_nodes(proto: onnx.ModelProto) -> list[tuple[str, tuple[int, int]]]:
    """(name, (in, out) width) of every Conv/Gemm/MatMul with a constant weight, in the proto's order."""
    import onnx

    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    consts = {o: tuple(a.t.dims) for n in proto.graph.node if n.op_type == "Constant"
              for o in n.output for a in n.attribute if a.name == "value"}
    out = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dims = inits.get(node.input[1]) or consts.get(node.input[1])
        if not dims or len(dims) < 2:
            continue
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            out.append((node.name, (dims[1] * group, dims[0])))
        elif node.op_type == "Gemm":
            trans_b = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
            out.append((node.name, (dims[1], dims[0]) if trans_b else (dims[0], dims[1])))
        else:
            out.append((node.name, (dims[0], dims[1])))
    return out


def structure(unpruned: onnx.ModelProto, pruned: onnx.ModelProto, net: nn.Module, example: torch.Tensor) -> dict:
    """Heads and MLP neurons per block read from the ONNX model ``pruned``: its layers matched to ``net``'s modules
    by call order in ``unpruned`` (the export before pruning; the engine keeps node names), heads as the value
    projection's output width over the head width (a float where the engine deleted part of a head)."""
    import models

    order = models.layer_call_order(net.cpu().eval(), example.cpu())
    before = layer_nodes(unpruned)
    if len(before) != len(order):
        return {"error": f"{len(before)} ONNX layers but {len(order)} module calls"}
    widths = dict(layer_nodes(pruned))
    by_module = {module: widths.get(name, (0, 0))[1] for module, (name, _) in zip(order, before)}
    heads, v_widths, mlp = [], [], []
    for i, attention in enumerate(_attention_layers(net)):
        v = by_module[f"blocks.{i}.attn.v"]
        v_widths.append(v)
        h = v / attention.head_dim
        heads.append(int(h) if float(h).is_integer() else round(h, 2))
        mlp.append(by_module[f"blocks.{i}.mlp.fc1"])
    return {"heads": heads, "v_widths": v_widths, "mlp": mlp,
            "qk_widths": [[by_module[f"blocks.{i}.attn.{p}"] for p in "qk"] for i in range(len(heads))]}


def export_sbp(s: Settings, sbp: dict, dense: nn.Module, example: torch.Tensor, path: Path,
               notes: dict[str, str]) -> tuple[str, dict]:
    """SBP's model, gates folded in (or its fine-tuned net), pruned by onnxprune into ``path``; (the exporter used,
    the structure read from the pruned model; the folded net has the dense net's layers, called in the same order)."""
    from onnxprune.api import prune
    from onnxprune.bayes import export
    from onnxprune.modelio import save_model

    unpruned, used = exported(lambda e: export(sbp["wrapped"], example, finetuned=sbp["tuned"], exporter=e), s.exporter,
                              "sbp", notes, EXPERIMENT)
    pruned = prune(unpruned, target=s.target)
    save_model(pruned, path)
    return used, structure(unpruned, pruned, dense, example)


def export_plain(s: Settings, net: nn.Module, example: torch.Tensor, key: str, path: Path,
                 notes: dict[str, str]) -> tuple[str, dict]:
    """A plain net's ONNX model into ``path``; (the exporter used, the structure read from it)."""
    from onnxprune.modelio import save_model
    from onnxprune.torch_export import export_onnx

    proto, used = exported(lambda e: export_onnx(net.cpu().eval(), example, exporter=e), s.exporter, key, notes, EXPERIMENT)
    save_model(proto, path)
    return used, structure(proto, proto, net, example)


def measure_models(files: dict[str, Path], data: Data) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Each model's test error on ONNX Runtime (CUDA where it has it, else CPU), MACs and parameters; and its test
    predictions."""
    from onnxprune.api import inspect_model
    from onnxprune.pipeline import onnx_predictions

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if ort_cuda() else ["CPUExecutionProvider"]
    out, predictions = {}, {}
    for key, path in files.items():
        cost = inspect_model(path)[2]
        predictions[key] = onnx_predictions(path, data.x_test, batch=500, providers=providers)
        out[key] = {"error_pct": 100 * float((predictions[key] != data.y_test).mean()), "macs": int(cost.macs),
                    "params": int(cost.params)}
    return out, predictions


def cpu_latency(files: dict[str, Path], s: Settings) -> dict:
    """ORT CPU latency of every model side by side with one thread, per batch: each session its own pool with
    spinning off (as onnxprune times), interleaved rounds, medians."""
    from onnxprune.latency.target import Target

    target = Target("ort-cpu", CPU_THREADS)
    sessions = {k: target.session(str(p)) for k, p in files.items()}
    out: dict = {"threads": CPU_THREADS}
    for batch in CPU_BATCHES:
        x = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
        feeds = {k: {sess.get_inputs()[0].name: x} for k, sess in sessions.items()}
        runners = {k: (lambda sess=sess, feed=feeds[k]: sess.run(None, feed)) for k, sess in sessions.items()}
        out[f"batch{batch}"] = interleaved_latency(runners, repeats=s.rounds, warmup=1 if s.smoke else 3,
                                                   budget_s=s.latency_budget_s)
        log.info("[%s] ORT CPU %d thread, batch %d: %s", EXPERIMENT, CPU_THREADS, batch,
                 ", ".join(f"{k} {t['median_ms']:.3g} ms" for k, t in out[f"batch{batch}"].items()))
    return out


def cuda_latency(files: dict[str, Path], s: Settings) -> dict:
    """ORT CUDA latency (batch 1 and 256, IO binding) where onnxruntime has the CUDA provider, else why not."""
    return cuda_side_by_side(files, 32, CUDA_BATCHES, s.rounds)


# -- the run ---------------------------------------------------------------------------------------------------


def rows_of(models: dict[str, dict], latency: dict) -> list[dict]:
    """The summary table's rows, one per model."""
    rows = []
    for key, m in models.items():
        row = {"model": key, "label": LABELS[key], "error_pct": m["error_pct"], "params": m["params"], "macs": m["macs"],
               "heads": m["structure"].get("heads"), "mlp": m["structure"].get("mlp")}
        for batch in CPU_BATCHES:
            row[f"cpu_b{batch}_ms"] = latency["latency_cpu"][f"batch{batch}"][key]["median_ms"]
        for batch in CUDA_BATCHES:
            timing = latency["latency_cuda"].get(f"batch{batch}")
            row[f"cuda_b{batch}_ms"] = timing[key]["median_ms"] if timing else None
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a plain-text table."""
    from onnxprune.table import format_table, human

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    headers = ["model", "test err %", "params", "MACs", "heads/layer", "MLP/layer",
               *(f"CPU b{b} ms" for b in CPU_BATCHES), *(f"CUDA b{b} ms" for b in CUDA_BATCHES)]
    body = [[r["label"], f"{r['error_pct']:.2f}", human(r["params"]), human(r["macs"]),
             " ".join(str(h) for h in r["heads"] or []), " ".join(str(n) for n in r["mlp"] or []),
             *(ms(r[f"cpu_b{b}_ms"]) for b in CPU_BATCHES), *(ms(r[f"cuda_b{b}_ms"]) for b in CUDA_BATCHES)]
            for r in rows]
    return format_table(headers, body)


def run(s: Settings, data: Data, work: Path, stages: Stages) -> dict:
    """Train, prune, export, measure: the result file's content."""
    import torch

    from onnxprune.api import inspect_model
    from onnxprune.bayes.evaluation import predict

    example = torch.from_numpy(data.x_test[:1].astype(np.float32) / 255.0)
    files = {k: work / f"{k}.onnx" for k in MODELS}
    notes: dict[str, str] = {}
    exporters, shapes = {}, {}
    dense, dense_history = train_dense(s, data, stages)
    sbp = train_sbp(s, dense, example, data, stages)
    dense = dense.cpu().eval()
    with stages.timed("sbp_export_prune"):
        exporters["sbp"], shapes["sbp"] = export_sbp(s, sbp, dense, example, files["sbp"], notes)
    target_macs = int(inspect_model(files["sbp"])[2].macs)
    if s.smoke and target_macs >= count_macs(dense, example, s.tp_search_exporter):
        target_macs = int(SMOKE_TP_FRACTION * target_macs)
        notes["torch_pruning_target"] = (f"smoke: SBP rejected nothing, Torch-Pruning pruned to {SMOKE_TP_FRACTION:g} "
                                         "of the dense MACs instead")
    sbp_heads = sum(shapes["sbp"].get("heads") or [0])
    tp, tp_history, search = train_torch_pruning(s, dense, example, target_macs, round(sbp_heads), data, stages)
    with stages.timed("export_dense_tp"):
        for key, net in (("dense", dense), ("torch_pruning", tp)):
            exporters[key], shapes[key] = export_plain(s, net, example, key, files[key], notes)
    shapes["torch_pruning"]["heads_modules"] = module_heads(tp)
    final = sbp["tuned"] if sbp["tuned"] is not None else sbp["wrapped"]
    sbp_predictions = predict(final.to(s.device), data.x_test, batch_size=500, device=s.device)
    with stages.timed("evaluate"):
        models, predictions = measure_models(files, data)
    last = {"dense": dense_history, "sbp": sbp["finetune_history"] or sbp["history"], "torch_pruning": tp_history}
    for key, m in models.items():
        m.update(torch_error_pct=last_test_error(last[key]), structure=shapes[key], exporter=exporters[key],
                 file=shown(files[key]))
    models["sbp"]["torch_error_pct"] = 100 * float((sbp_predictions != data.y_test).mean())
    search["final_macs"] = models["torch_pruning"]["macs"]
    if search["final_macs"] != search["macs"]:
        notes["torch_pruning_macs"] = (f"the {s.tp_search_exporter} export counted {search['macs']} MACs, the "
                                       f"{exporters['torch_pruning']} export {search['final_macs']}")
    with stages.timed("latency"):
        latency = {"latency_cpu": cpu_latency(files, s), "latency_cuda": cuda_latency(files, s)}
    wrapped = sbp["wrapped"]
    sbp_facts = {"kept_fraction": float(wrapped.kept_fraction()), "kept": wrapped.kept(), "kl_weights": sbp["kl_weights"],
                 "agreement_pruned_onnx_with_torch": float((predictions["sbp"] == sbp_predictions).mean())}
    config = {**asdict(s), "model_name": "vit_cifar", "data": "cifar10 (JPEG copy), uint8 arrays",
              "train_images": len(data.y), "test_images": len(data.y_test),
              "steps_per_epoch": len(data.y) // s.batch_size,
              "augmentation": "random crop (zero padding 4) and horizontal flip on the device (augment_batch)",
              "dense_recipe": f"{s.dense_epochs} epochs AdamW lr {s.dense_lr:g}, weight decay {s.weight_decay:g} on "
                              f"weight matrices, {s.warmup_epochs:g} warm-up epochs, cosine decay",
              "sbp_recipe": f"{s.epochs - s.finetune_epochs} epochs on the ELBO (Adam lr {s.lr:g}, gates {s.gate_lr:g}, "
                            f"beta1 {s.beta1:g}, {s.schedule}, the KL term x{s.kl_scale:g}"
                            + (", weighted by MACs per channel" if s.kl_weighting == "macs" else "")
                            + f"), then {s.finetune_epochs} fine-tuning the gate-folded net (Adam lr {s.lr:g}, cosine)",
              "tp_recipe": ("MetaPruner, L2 magnitude, SBP's number of whole heads (even over the blocks) and an MLP "
                            "ratio per layer bisected to SBP's MACs (match), " if s.tp_rule == "match" else
                            f"MetaPruner, L2 magnitude, whole heads and MLP neurons at one ratio "
                            f"({'ranked across layers' if s.tp_global else 'per layer'}), to SBP's MACs ({s.tp_rule}), ")
                           + f"then {s.epochs} epochs (Adam lr {s.lr:g}, beta1 {s.beta1:g}, {s.schedule})"}
    result = {"benchmark": EXPERIMENT, "machine": machine_info(), "config": config, "models": models,
              "rows": rows_of(models, latency), **latency, "sbp": sbp_facts, "torch_pruning": search,
              "stage_times_s": {**stages.times, "total": round(time.perf_counter() - stages.start, 2)},
              "history": {"dense": dense_history, "sbp": sbp["history"], "sbp_finetune": sbp["finetune_history"],
                          "torch_pruning": tp_history},
              "export_notes": notes}
    return result


def add_cuda_latency(path: Path, work: Path, rounds: int) -> dict:
    """Measure ORT CUDA latency of the models of the result at ``path`` (ONNX files in ``work``) and write it there,
    rows included; the result."""
    import json

    result = json.loads(path.read_text())
    files = {k: work / f"{k}.onnx" for k in MODELS}
    result["latency_cuda"] = cuda_side_by_side(files, 32, CUDA_BATCHES, rounds)
    result["rows"] = rows_of(result["models"], result)
    result["export_notes"]["cuda_latency"] = "measured by a second process (--cuda-latency-of), same machine"
    write_result(path.parent, path.stem, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the three nets, measure their ONNX models, write the result and print the table; returns the result."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("onnxprune", log.name):
        logging.getLogger(name).setLevel(logging.INFO)
    args = parse_args(argv)
    s = settings_of(args)
    if args.cuda_latency_of:
        result = add_cuda_latency(args.cuda_latency_of, args.work or WORK, s.rounds)
        print(table(result["rows"]))
        return result
    if s.smoke and not args.device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)  # tiny nets: a second thread only waits on the first on a shared CPU
    out = args.out or (Path(tempfile.mkdtemp(prefix=f"{EXPERIMENT}-")) if s.smoke else experiment_folder(EXPERIMENT))
    work = args.work or (out / "work" if s.smoke else WORK)
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(EXPERIMENT, log)
    with stages.timed("data"):
        data = load_data(s, args.data_dir)
    log.info("[%s] %d training images (batch %d), %d test images, on %s; ViT %s", EXPERIMENT, len(data.y),
             s.batch_size, len(data.y_test), s.device, s.model)
    result = run(s, data, work, stages)
    path = write_result(out, EXPERIMENT + ("-smoke" if s.smoke else ""), result)
    print(table(result["rows"]))
    cuda = result["latency_cuda"]
    if "skipped" in cuda:
        print(f"CUDA latency skipped: {cuda['skipped']}")
    print(f"SBP keeps {100 * result['sbp']['kept_fraction']:.1f}% of its gated channels "
          f"({', '.join(f'{k} {a}/{t}' for k, (a, t) in result['sbp']['kept'].items())}); Torch-Pruning ratio "
          f"{result['torch_pruning']['ratio']:.4f}; {result['stage_times_s']['total']:.0f} s in all")
    print(f"wrote {path}; ONNX models in {work}")
    return result


if __name__ == "__main__":
    main()
