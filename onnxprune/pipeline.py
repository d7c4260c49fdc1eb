"""The train-then-export pipeline behind ``onnxprune train``.

dense model (pre-trained, or trained here) -> Bayesian wrapper -> fit on the
negative ELBO -> ONNX with gates folded in -> ``onnxprune prune`` -> measured
on ONNX Runtime: test error, parameters, MACs and latency, dense vs pruned.

Each stage is a function of its own (``load_data``, ``build_model``, ``train_dense``,
``wrap_model``, ``train_bayesian``, ``finetune``, ``export_models``, ``onnx_predictions``);
``run`` chains them, and benchmarks/paper_table.py chains the same ones with its own
schedules, checkpoints and baselines.

Outputs (in the output folder): dense.onnx, gated.onnx (gates folded, nothing
deleted yet), pruned.onnx, report.json, channels.png; checkpoints/ holds the
training checkpoints (a rerun with the same folder resumes). The final files
are written to a staging folder and moved in at the end: a failed run leaves
checkpoints, never half of the results.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from onnxprune.bayes.wrapper import BayesianModel

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = {"digits": (20, 40), "mnist": (10, 30), "fashion-mnist": (10, 30), "cifar10": (60, 60)}
OUTPUTS = ("dense.onnx", "gated.onnx", "pruned.onnx", "report.json", "channels.png")


@dataclass
class TrainConfig:
    """Everything one pipeline run depends on (recorded in the report)."""

    model: str = "lenet5"
    data: str = "digits"
    data_dir: str | None = None
    out: str = "out/train"
    method: str = "sbp"
    epochs: int | None = None
    pretrain_epochs: int | None = None
    pretrained: str | None = None
    batch_size: int = 128
    lr: float = 1e-3
    # The paper trains 200 epochs at 1e-3; a larger step for the gates' (mu, log sigma)
    # lets shorter runs travel the same distance in log space.
    gate_lr: float | None = 3e-2
    kl_warmup_epochs: float = 0.0
    kl_scale: float = 1.0  # multiplies the KL term (1: the ELBO)
    kl_weighting: str = "none"  # "macs": each group's KL times its MACs per channel over the mean (bayes.costs)
    finetune_epochs: int = 0  # the last N of the epochs train the gate-folded net, noise-free (bayes.finetune_pruned)
    seed: int = 0
    device: str = "cpu"
    gate_inputs: bool = False
    target: str = "ort-cpu"
    threads: int | None = None
    progress: bool = True
    gate_options: dict = field(default_factory=dict)
    train_limit: int | None = None  # train on this many training images (a fixed random subset), for quick trials
    compile: bool | None = None  # torch.compile the Bayesian training step (None: fit's default, on CUDA with Triton)
    deploy: str | None = None  # "int8", "fp16" or "fp32": also `onnxprune deploy` pruned.onnx for ORT into deploy-PRECISION/
    input_size: int | None = None  # images resized to N x N (bilinear) after loading, for architectures that need it
    exporter: str = "dynamo"  # the ONNX exporter of dense.onnx and gated.onnx: "dynamo" or "torchscript" (torch_export)

    def resolved_epochs(self) -> tuple[int, int]:
        pre, bayes = DEFAULT_EPOCHS.get(self.data, (10, 30))
        pre = 0 if self.pretrained else pre  # a loaded checkpoint is fine-tuned only with an explicit --pretrain-epochs
        return (self.pretrain_epochs if self.pretrain_epochs is not None else pre,
                self.epochs if self.epochs is not None else bayes)


@dataclass
class Dataset:
    """The images and labels a run trains and tests on (CIFAR-10 as uint8: batches become float on the fly)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _check(cfg: TrainConfig):
    """Fail fast, with one clear sentence, before any work."""
    import models
    from onnxprune.architectures import check_spec
    from onnxprune.bayes.methods import METHODS
    from onnxprune.data import DATASETS

    check_spec(cfg.model)  # a models/ name, or torchvision:NAME / timm:NAME (importable, known)
    if cfg.data not in DATASETS:
        raise InputError(f"unknown dataset '{cfg.data}'; known: {', '.join(DATASETS)}")
    if cfg.method not in METHODS:
        raise InputError(f"unknown method '{cfg.method}'; known: {', '.join(METHODS)}")
    if cfg.kl_weighting not in ("none", "macs"):
        raise InputError(f"unknown KL weighting '{cfg.kl_weighting}'; known: none, macs")
    if not 0 <= cfg.finetune_epochs < cfg.resolved_epochs()[1]:
        raise InputError(f"--finetune-epochs must be at least 0 and below the {cfg.resolved_epochs()[1]} epochs, "
                         f"got {cfg.finetune_epochs}")
    if cfg.input_size is not None and cfg.input_size < 1:
        raise InputError(f"--input-size must be a positive number of pixels, got {cfg.input_size}")
    spec, data = models.REGISTRY.get(cfg.model), DATASETS[cfg.data]
    if spec is not None and tuple(spec.input_shape) != input_shape(cfg):
        raise InputError(f"model '{cfg.model}' takes inputs {tuple(spec.input_shape)} but dataset '{cfg.data}' has "
                         f"{input_shape(cfg)}")
    if cfg.deploy and cfg.input_size is not None:
        raise InputError("--deploy does not take --input-size yet: run `onnxprune deploy` on pruned.onnx with an .npz "
                         "of resized inputs")
    if cfg.exporter not in ("dynamo", "torchscript"):
        raise InputError(f"unknown exporter '{cfg.exporter}'; known: dynamo, torchscript")
    if cfg.deploy not in (None, "int8", "fp16", "fp32"):
        raise InputError(f"unknown deploy precision '{cfg.deploy}'; known: int8, fp16, fp32")
    if cfg.train_limit is not None and cfg.train_limit < 1:
        raise InputError(f"--train-limit must be a positive number of images, got {cfg.train_limit}")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise InputError(f"data folder {cfg.data_dir} does not exist")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise InputError(f"checkpoint {cfg.pretrained} does not exist")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{cfg.out} exists and is not a folder")
    return spec, data


def load_checkpoint(model, path: str) -> None:
    """Load a state dict (plain, or under "state_dict" or "model"); InputError if it does not fit exactly."""
    from onnxprune.architectures import load_state

    load_state(model, path)


# -- the stages ------------------------------------------------------------------------------------------------


def load_data(name: str, data_dir: str | None = None, *, train_limit: int | None = None, seed: int = 0,
              input_size: int | None = None) -> Dataset:
    """Both splits of a dataset (CIFAR-10 kept as uint8); ``train_limit``: a fixed random subset of the training set;
    ``input_size``: every image resized to N x N (kept as uint8, a quarter of float32's memory at large sizes)."""
    from onnxprune.data import load_dataset

    raw = name == "cifar10" or input_size is not None  # uint8; batches become float on the fly
    x_train, y_train = load_dataset(name, data_dir, "train", as_uint8=raw)
    x_test, y_test = load_dataset(name, data_dir, "test", as_uint8=raw)
    if train_limit is not None and train_limit < len(x_train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(x_train))[:train_limit])
        x_train, y_train = x_train[keep], y_train[keep]
    if input_size is not None and x_test.shape[-2:] != (input_size, input_size):
        log.info("images resized from %dx%d to %dx%d (bilinear)", *x_test.shape[-2:], input_size, input_size)
        x_train, x_test = (resize_images(x, input_size) for x in (x_train, x_test))
    return Dataset(name, x_train, y_train, x_test, y_test)


def resize_images(x: np.ndarray, size: int, *, chunk: int = 1024) -> np.ndarray:
    """NCHW images resized to ``size`` x ``size`` (bilinear; antialiased when shrinking), chunk by chunk; the dtype
    is kept (uint8 rounded)."""
    import torch
    import torch.nn.functional as F

    out = np.empty((*x.shape[:2], size, size), dtype=x.dtype)
    shrink = size < max(x.shape[-2:])
    for i in range(0, len(x), chunk):
        batch = F.interpolate(torch.from_numpy(x[i : i + chunk]).float(), size=(size, size), mode="bilinear",
                              align_corners=False, antialias=shrink)
        if x.dtype == np.uint8:
            batch = batch.round_().clamp_(0, 255)
        out[i : i + chunk] = batch.numpy().astype(x.dtype)
    return out


def input_shape(cfg: TrainConfig) -> tuple[int, ...]:
    """The (C, H, W) of one image as the run's model sees it: the dataset's, resized by ``cfg.input_size``."""
    from onnxprune.data import DATASETS

    shape = tuple(DATASETS[cfg.data].input_shape)
    return shape if cfg.input_size is None else (shape[0], cfg.input_size, cfg.input_size)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; under torchrun, "cuda" is this rank's GPU."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def augmentation(data_name: str) -> Callable | None:
    """The training-time augmentation of a dataset: random crops and flips for CIFAR-10, none otherwise."""
    from onnxprune.data import augment_batch

    return augment_batch if data_name == "cifar10" else None


def build_model(name: str, seed: int, **model_kwargs) -> nn.Module:
    """A registry model, initialised from ``seed`` (the Bayesian stages draw from the same generator after it)."""
    import torch

    import models

    torch.manual_seed(seed)
    return models.build(name, **model_kwargs)


def train_dense(dense: nn.Module, data: Dataset, *, epochs: int, pretrained: str | None = None,
                checkpoint: Path | None = None, **fit_options) -> None:
    """The dense stage: load ``pretrained`` (if any), then train ``epochs`` epochs (fine-tuning it, if loaded)."""
    from onnxprune.bayes.training import fit

    if pretrained:
        load_checkpoint(dense, pretrained)
    if epochs:
        fit(dense, data.x_train, data.y_train, epochs=epochs, checkpoint=checkpoint, desc="dense", **fit_options)


def example_input(data: Dataset, device: torch.device) -> torch.Tensor:
    """The first test image as a float batch of one in [0, 1], on ``device`` (what the exports trace)."""
    import torch

    example = torch.as_tensor(data.x_test[:1]).float().to(device)
    return example / 255.0 if example.max() > 1.0 else example


def wrap_model(dense: nn.Module, example: torch.Tensor, *, method: str, gate_inputs: bool = False,
               kl_weighting: str = "none", **gate_options) -> tuple[BayesianModel, dict[str, float] | None]:
    """The Bayesian wrapper around ``dense`` on ``example``'s device, with each group's KL weighted by its MACs per
    channel where ``kl_weighting`` is "macs"; returns it and those weights (None when not weighted)."""
    from onnxprune.bayes.costs import weight_kl_by_macs
    from onnxprune.bayes.wrapper import wrap

    wrapped = wrap(dense, (example,), method=method, gate_inputs=gate_inputs, **gate_options).to(example.device)
    weights = weight_kl_by_macs(wrapped, (example,)) if kl_weighting == "macs" else None
    return wrapped, weights


def train_bayesian(wrapped: BayesianModel, data: Dataset, *, epochs: int, checkpoint: Path | None = None,
                   **fit_options) -> None:
    """The Bayesian stage: ``epochs`` epochs on the negative ELBO (``fit_options``: fit's keywords)."""
    from onnxprune.bayes.training import fit

    fit(wrapped, data.x_train, data.y_train, epochs=epochs, checkpoint=checkpoint, desc=wrapped.method, **fit_options)


def finetune(wrapped: BayesianModel, data: Dataset, *, epochs: int, lr: float, checkpoint: Path | None = None,
             **fit_options) -> nn.Module:
    """The gate-folded net trained ``epochs`` more, noise-free, its rejected channels held at zero (cosine decay)."""
    from onnxprune.bayes.finetune import finetune_pruned

    return finetune_pruned(wrapped, data.x_train, data.y_train, epochs=epochs, lr=lr, lr_schedule="cosine",
                           checkpoint=checkpoint, desc="fine-tune", **fit_options)


def export_models(dense: nn.Module, wrapped: BayesianModel, example: torch.Tensor, folder: Path, *,
                  finetuned: nn.Module | None = None, exporter: str = "dynamo") -> None:
    """FOLDER/dense.onnx (the dense net) and FOLDER/gated.onnx (gates folded in, or the fine-tuned net), exported
    with ``exporter`` ("dynamo" or "torchscript"); both nets end on the CPU."""
    from onnxprune.bayes.exporting import export
    from onnxprune.modelio import save_model
    from onnxprune.torch_export import export_onnx

    example = example.cpu()
    save_model(export_onnx(dense.cpu(), example, exporter=exporter), folder / "dense.onnx")
    export(wrapped.cpu(), example, folder / "gated.onnx", finetuned=finetuned, exporter=exporter)


def onnx_predictions(model_path: Path, x: np.ndarray, batch: int = 256,
                     providers: Sequence[str] = ("CPUExecutionProvider",)) -> np.ndarray:
    """Class predictions of an ONNX model on ONNX Runtime for images ``x`` (uint8 scaled to [0, 1])."""
    from onnxprune.runtime import make_session

    session = make_session(str(model_path), providers=providers)
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        xb = xb.astype(np.float32) / 255.0 if xb.dtype == np.uint8 else xb.astype(np.float32)
        out.append(session.run(None, {name: xb})[0].argmax(1))
    return np.concatenate(out)


@contextmanager
def timed(times: dict[str, float], key: str, after: Callable[[dict[str, float]], None] | None = None) -> Iterator[None]:
    """Adds the wall time of the block to ``times[key]`` when it succeeds, then calls ``after(times)``."""
    start = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - start
    if after is not None:
        after(times)


# -- onnxprune train ---------------------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> dict:
    """Run the pipeline; returns the report (also written to report.json)."""
    from onnxprune.bayes.training import finish_distributed, predict

    _check(cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = load_data(cfg.data, cfg.data_dir, train_limit=cfg.train_limit, seed=cfg.seed, input_size=cfg.input_size)
    device = resolve_device(cfg.device)
    dense = _train_dense(cfg, data, device, timings)
    dense_acc_torch = float((predict(dense, data.x_test, device=device) == data.y_test).mean())
    example = example_input(data, device)
    wrapped, tuned = _train_bayesian(cfg, data, dense, example, device, timings)
    if (rank := finish_distributed()) != 0:  # under torchrun, rank 0 alone exports, prunes, verifies and writes
        return {"rank": rank}
    wrapped_pred = predict(tuned if tuned is not None else wrapped, data.x_test, device=device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out))
    try:
        with timed(timings, "export_prune_s"):
            export_models(dense, wrapped, example, stage, finetuned=tuned, exporter=cfg.exporter)
            result = _prune(cfg, stage)
        report = _report(cfg, data, stage, result, wrapped, wrapped_pred, dense_acc_torch)
        if cfg.deploy:
            with timed(timings, "deploy_s"):
                report["deploy"] = deploy_pruned(cfg, stage)
        report["timings_s"] = {**timings, "total": time.perf_counter() - t_start}
        _write_outputs(cfg, report, stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _fit_options(cfg: TrainConfig, device: torch.device) -> dict:
    """fit's keywords shared by every training stage of ``onnxprune train``."""
    return dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, augment=augmentation(cfg.data),
                progress=cfg.progress)


def _train_dense(cfg: TrainConfig, data: Dataset, device: torch.device, timings: dict[str, float]) -> nn.Module:
    """The dense net of ``onnxprune train``: the pretrained checkpoint (fine-tuned with an explicit --pretrain-epochs),
    else trained here; on ``device``, in eval mode."""
    from onnxprune.architectures import build_architecture, probe_input
    from onnxprune.data import DATASETS

    spec = DATASETS[cfg.data]
    dense = build_architecture(cfg.model, num_classes=spec.num_classes, in_channels=spec.input_shape[0], seed=cfg.seed,
                               pretrained=cfg.pretrained)
    probe_input(dense, cfg.model, data.x_test.shape[1:])
    with timed(timings, "dense_training_s"):
        train_dense(dense, data, epochs=cfg.resolved_epochs()[0], checkpoint=Path(cfg.out) / "checkpoints" / "dense.pt",
                    lr=cfg.lr, **_fit_options(cfg, device))
    return dense.to(device).eval()


def _train_bayesian(cfg: TrainConfig, data: Dataset, dense: nn.Module, example: torch.Tensor, device: torch.device,
                    timings: dict[str, float]) -> tuple[BayesianModel, nn.Module | None]:
    """The Bayesian and fine-tuning stages of ``onnxprune train``: (wrapped, fine-tuned net or None)."""
    ckpt = Path(cfg.out) / "checkpoints"
    fit_options = _fit_options(cfg, device)
    with timed(timings, "bayesian_training_s"):
        wrapped, _ = wrap_model(dense, example, method=cfg.method, gate_inputs=cfg.gate_inputs,
                                kl_weighting=cfg.kl_weighting, **cfg.gate_options)
        train_bayesian(wrapped, data, epochs=cfg.resolved_epochs()[1] - cfg.finetune_epochs, checkpoint=ckpt / f"{cfg.method}.pt",
                       lr=cfg.lr, gate_lr=cfg.gate_lr, kl_warmup_epochs=cfg.kl_warmup_epochs, kl_scale=cfg.kl_scale,
                       compile_step=cfg.compile, compile_gates=cfg.compile, **fit_options)
    tuned = None
    if cfg.finetune_epochs:
        with timed(timings, "finetune_s"):
            tuned = finetune(wrapped, data, epochs=cfg.finetune_epochs, lr=cfg.lr, checkpoint=ckpt / "finetune.pt",
                             **fit_options)
    return wrapped, tuned


def _prune(cfg: TrainConfig, stage: Path):
    """``onnxprune prune`` of the staged gated.onnx into pruned.onnx, for the run's target."""
    from onnxprune.api import prune_model

    return prune_model(stage / "gated.onnx", output=stage / "pruned.onnx", target=cfg.target, threads=cfg.threads)


def _report(cfg: TrainConfig, data: Dataset, stage: Path, result, wrapped: BayesianModel, wrapped_pred: np.ndarray,
            dense_acc_torch: float) -> dict:
    """report.json's content but the timings: errors on ONNX Runtime, costs, latency, the posterior's groups."""
    from onnxprune.api import inspect_model
    from onnxprune.bayes.exporting import gate_summary
    from onnxprune.latency.guarantee import time_side_by_side
    from onnxprune.latency.target import make_target

    dense_pred = onnx_predictions(stage / "dense.onnx", data.x_test)
    pruned_pred = onnx_predictions(stage / "pruned.onnx", data.x_test)
    dense_cost, pruned_cost = (inspect_model(stage / name)[2] for name in ("dense.onnx", "pruned.onnx"))
    target = make_target("ort-cpu", threads=cfg.threads)
    ms = time_side_by_side(target, stage / "dense.onnx", {"pruned": result.model}, budget_s=3.0)
    groups = [{"name": k, "channels": v["channels"], "kept": v["kept"], "layers": v["layers"]}
              for k, v in gate_summary(wrapped).items()]
    pre_epochs, epochs = cfg.resolved_epochs()
    return {
        "config": {**asdict(cfg), "pretrain_epochs": pre_epochs, "epochs": epochs},
        "data": {"name": cfg.data, "train": int(len(data.x_train)), "test": int(len(data.x_test)),
                 "input_shape": [int(d) for d in data.x_test.shape[1:]]},
        "dense": {"error_torch": 1 - dense_acc_torch, "error_onnx": float((dense_pred != data.y_test).mean()),
                  "params": dense_cost.params, "macs": dense_cost.macs, "latency_ms": ms["input"]},
        "wrapped": {"error_torch_eval": 1 - float((wrapped_pred == data.y_test).mean()),
                    "kept_fraction": wrapped.kept_fraction()},
        "pruned": {"error_onnx": float((pruned_pred != data.y_test).mean()), "params": pruned_cost.params,
                   "macs": pruned_cost.macs, "latency_ms": ms["pruned"],
                   "agreement_with_wrapped": float((pruned_pred == wrapped_pred).mean())},
        "latency": {"target": "ort-cpu", "threads": target.threads, "batch": 1},
        "groups": groups,
        "prune_report": result.report.to_dict(),
    }


def deploy_folder(cfg: TrainConfig) -> str:
    """The folder, beside pruned.onnx, that ``TrainConfig.deploy`` writes the deployable artifacts into."""
    return f"deploy-{cfg.deploy}"


def deploy_pruned(cfg: TrainConfig, stage: Path) -> dict:
    """``onnxprune deploy`` of the staged pruned.onnx for ONNX Runtime in ``cfg.deploy``'s precision, calibrated and
    checked on the run's dataset (training split, test split); returns deploy's report."""
    from onnxprune.deploy import deploy

    result = deploy(stage / "pruned.onnx", stage / deploy_folder(cfg), runtime="ort", precision=cfg.deploy,
                    calibration=cfg.data, data_dir=cfg.data_dir, threads=cfg.threads or 2, progress=cfg.progress)
    return result.report


def _write_outputs(cfg: TrainConfig, report: dict, stage: Path, out: Path) -> None:
    """report.json and channels.png into the staging folder, then every output moved into ``out``."""
    from onnxprune.modelio import atomic_write_text

    atomic_write_text(stage / "report.json", json.dumps(report, indent=2) + "\n")
    plot_channels(report["groups"], stage / "channels.png", f"{cfg.model} on {cfg.data} ({cfg.method}): channels kept")
    for name in OUTPUTS:
        os.replace(stage / name, out / name)
    if cfg.deploy:  # a folder: the previous run's is replaced whole
        target = out / deploy_folder(cfg)
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage / deploy_folder(cfg), target)


def plot_channels(groups: list[dict], path: Path, title: str) -> None:
    """Horizontal bars: the share of each gated group's channels the posterior keeps, labelled kept/total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g["name"] for g in groups][::-1]
    frac = [g["kept"] / g["channels"] for g in groups][::-1]
    labels = [f"{g['kept']}/{g['channels']}" for g in groups][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.4))
    ys = np.arange(len(names))
    ax.barh(ys, [1.0] * len(names), color="#dfe6ee", label="pruned")
    ax.barh(ys, frac, color="#2e86de", label="kept")
    for y, f, text in zip(ys, frac, labels):
        ax.text(min(f, 0.85) + 0.01, y, text, va="center", fontsize=8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of channels / neurons kept")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(report: dict) -> str:
    """The before/after table the CLI prints."""
    from onnxprune.table import format_table, human

    d, p, w = report["dense"], report["pruned"], report["wrapped"]
    rows = [
        ["test error", f"{d['error_onnx']:.2%}", f"{p['error_onnx']:.2%}", f"(wrapped, PyTorch eval: {w['error_torch_eval']:.2%})"],
        ["parameters", human(d["params"]), human(p["params"]), f"{d['params'] / max(p['params'], 1):.2f}x fewer"],
        ["MACs", human(d["macs"]), human(p["macs"]), f"{d['macs'] / max(p['macs'], 1):.2f}x fewer"],
        ["ORT CPU latency (batch 1)", f"{d['latency_ms']:.3g} ms", f"{p['latency_ms']:.3g} ms",
         f"{d['latency_ms'] / p['latency_ms']:.2f}x faster"],
    ]
    return format_table(["", "dense", "pruned", ""], rows, "lrrl")


def deploy_summary(report: dict) -> str | None:
    """The deployed artifacts' table (size, latency at 1 and N threads, agreement, error), when the run deployed."""
    if "deploy" not in report:
        return None
    from onnxprune.deploy.report import deploy_table

    deployed = report["deploy"]
    where = f"{deployed['settings']['precision']}, ORT CPU, batch {deployed['timing']['batch']}"
    return f"pruned.onnx deployed ({where}):\n" + deploy_table(deployed)
