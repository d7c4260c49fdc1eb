"""The train-then-export pipeline behind ``onnxprune train``.

dense model (pre-trained, or trained here) -> Bayesian wrapper -> fit on the
negative ELBO -> ONNX with gates folded in -> ``onnxprune prune`` -> measured
on ONNX Runtime: test error, parameters, MACs and latency, dense vs pruned.

Outputs (in the output folder): dense.onnx, gated.onnx (gates folded, nothing
deleted yet), pruned.onnx, report.json, channels.png; checkpoints/ holds the
training checkpoints (a rerun with the same folder resumes). The final files
are written to a staging folder and moved in at the end: a failed run leaves
checkpoints, never half of the results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.errors import InputError

DEFAULT_EPOCHS = {"digits": (20, 40), "mnist": (10, 30), "fashion-mnist": (10, 30), "cifar10": (60, 60)}


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

    def resolved_epochs(self) -> tuple[int, int]:
        pre, bayes = DEFAULT_EPOCHS.get(self.data, (10, 30))
        return (self.pretrain_epochs if self.pretrain_epochs is not None else pre,
                self.epochs if self.epochs is not None else bayes)


def _check(cfg: TrainConfig):
    """Fail fast, with one clear sentence, before any work."""
    import models
    from onnxprune.bayes.methods import METHODS
    from onnxprune.data import DATASETS

    if cfg.model not in models.REGISTRY:
        raise InputError(f"unknown model '{cfg.model}'; known: {', '.join(models.names())}")
    if cfg.data not in DATASETS:
        raise InputError(f"unknown dataset '{cfg.data}'; known: {', '.join(DATASETS)}")
    if cfg.method not in METHODS:
        raise InputError(f"unknown method '{cfg.method}'; known: {', '.join(METHODS)}")
    if cfg.kl_weighting not in ("none", "macs"):
        raise InputError(f"unknown KL weighting '{cfg.kl_weighting}'; known: none, macs")
    if not 0 <= cfg.finetune_epochs < cfg.resolved_epochs()[1]:
        raise InputError(f"--finetune-epochs must be at least 0 and below the {cfg.resolved_epochs()[1]} epochs, "
                         f"got {cfg.finetune_epochs}")
    spec, data = models.REGISTRY[cfg.model], DATASETS[cfg.data]
    if tuple(spec.input_shape) != tuple(data.input_shape):
        raise InputError(
            f"model '{cfg.model}' takes inputs {tuple(spec.input_shape)} but dataset '{cfg.data}' has {tuple(data.input_shape)}"
        )
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
    """Load a state dict (plain, or {'state_dict': ...} as the CIFAR ResNet checkpoints); InputError if it does not fit."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, ...
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise InputError(f"checkpoint {path} does not fit the model ({detail})")
    model.load_state_dict(state)


def onnx_predictions(model_path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    from onnxprune.runtime import make_session

    session = make_session(model_path)
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: x[i : i + batch].astype(np.float32)})[0].argmax(1) for i in range(0, len(x), batch)]
    return np.concatenate(out)


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


def run(cfg: TrainConfig) -> dict:
    """Run the pipeline; returns the report (also written to report.json)."""
    import torch

    import models
    from onnxprune.api import inspect_model, prune_model
    from onnxprune.bayes.costs import weight_kl_by_macs
    from onnxprune.bayes.exporting import export, gate_summary
    from onnxprune.bayes.finetune import finetune_pruned
    from onnxprune.bayes.training import finish_distributed, fit, predict
    from onnxprune.bayes.wrapper import wrap
    from onnxprune.data import augment_batch, load_dataset
    from onnxprune.latency.guarantee import time_side_by_side
    from onnxprune.latency.target import make_target
    from onnxprune.modelio import atomic_write_text, save_model
    from onnxprune.torch_export import export_onnx

    spec, data_spec = _check(cfg)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.out)
    ckpt = out / "checkpoints"
    pre_epochs, epochs = cfg.resolved_epochs()
    raw = cfg.data == "cifar10"  # keep 50000 color images as uint8; batches become float on the fly
    x_train, y_train = load_dataset(cfg.data, cfg.data_dir, "train", as_uint8=raw)
    x_test, y_test = load_dataset(cfg.data, cfg.data_dir, "test", as_uint8=raw)
    if cfg.train_limit is not None and cfg.train_limit < len(x_train):
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(x_train))[: cfg.train_limit])
        x_train, y_train = x_train[keep], y_train[keep]
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    augment = augment_batch if cfg.data == "cifar10" else None
    torch.manual_seed(cfg.seed)
    dense = models.build(cfg.model)
    t = time.perf_counter()
    if cfg.pretrained:
        load_checkpoint(dense, cfg.pretrained)
    elif pre_epochs:
        fit(dense, x_train, y_train, epochs=pre_epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
            device=device, augment=augment, checkpoint=ckpt / "dense.pt", progress=cfg.progress, desc="dense")
    timings["dense_training_s"] = time.perf_counter() - t
    dense = dense.to(device).eval()
    example = torch.as_tensor(x_test[:1]).float().to(device)
    if example.max() > 1.0:
        example = example / 255.0
    dense_acc_torch = float((predict(dense, x_test, device=device) == y_test).mean())

    t = time.perf_counter()
    wrapped = wrap(dense, (example,), method=cfg.method, gate_inputs=cfg.gate_inputs, **cfg.gate_options).to(device)
    if cfg.kl_weighting == "macs":
        weight_kl_by_macs(wrapped, (example,))
    fit(wrapped, x_train, y_train, epochs=epochs - cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.lr, gate_lr=cfg.gate_lr,
        kl_warmup_epochs=cfg.kl_warmup_epochs, kl_scale=cfg.kl_scale, seed=cfg.seed, device=device, augment=augment,
        checkpoint=ckpt / f"{cfg.method}.pt", progress=cfg.progress, desc=cfg.method,
        compile_step=cfg.compile, compile_gates=cfg.compile)
    timings["bayesian_training_s"] = time.perf_counter() - t
    tuned = None
    if cfg.finetune_epochs:
        t = time.perf_counter()
        tuned = finetune_pruned(wrapped, x_train, y_train, epochs=cfg.finetune_epochs, lr=cfg.lr, lr_schedule="cosine",
                                batch_size=cfg.batch_size, seed=cfg.seed, device=device, augment=augment,
                                checkpoint=ckpt / "finetune.pt", progress=cfg.progress, desc="fine-tune")
        timings["finetune_s"] = time.perf_counter() - t
    rank = finish_distributed()
    if rank != 0:  # under torchrun, rank 0 alone exports, prunes, verifies and writes
        return {"rank": rank}
    wrapped_pred = predict(tuned if tuned is not None else wrapped, x_test, device=device)
    wrapped_acc = float((wrapped_pred == y_test).mean())

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out))
    try:
        t = time.perf_counter()
        save_model(export_onnx(dense.cpu(), example.cpu()), stage / "dense.onnx")
        export(wrapped.cpu(), example.cpu(), stage / "gated.onnx", finetuned=tuned)
        result = prune_model(stage / "gated.onnx", output=stage / "pruned.onnx", target=cfg.target, threads=cfg.threads)
        timings["export_prune_s"] = time.perf_counter() - t

        x_eval = x_test.astype(np.float32) / (255.0 if x_test.dtype == np.uint8 else 1.0)
        dense_pred = onnx_predictions(stage / "dense.onnx", x_eval)
        pruned_pred = onnx_predictions(stage / "pruned.onnx", x_eval)
        agreement = float((pruned_pred == wrapped_pred).mean())
        dense_cost = inspect_model(stage / "dense.onnx")[2]
        pruned_cost = inspect_model(stage / "pruned.onnx")[2]
        target = make_target("ort-cpu", threads=cfg.threads)
        ms = time_side_by_side(target, stage / "dense.onnx", {"pruned": result.model}, budget_s=3.0)
        summary = gate_summary(wrapped)
        groups = [{"name": k, "channels": v["channels"], "kept": v["kept"], "layers": v["layers"]} for k, v in summary.items()]
        report = {
            "config": {**asdict(cfg), "pretrain_epochs": pre_epochs, "epochs": epochs},
            "data": {"name": cfg.data, "train": int(len(x_train)), "test": int(len(x_test))},
            "dense": {"error_torch": 1 - dense_acc_torch, "error_onnx": float((dense_pred != y_test).mean()),
                      "params": dense_cost.params, "macs": dense_cost.macs, "latency_ms": ms["input"]},
            "wrapped": {"error_torch_eval": 1 - wrapped_acc, "kept_fraction": wrapped.kept_fraction()},
            "pruned": {"error_onnx": float((pruned_pred != y_test).mean()), "params": pruned_cost.params,
                       "macs": pruned_cost.macs, "latency_ms": ms["pruned"],
                       "agreement_with_wrapped": agreement},
            "latency": {"target": "ort-cpu", "threads": target.threads, "batch": 1},
            "groups": groups,
            "prune_report": result.report.to_dict(),
            "timings_s": {**timings, "total": time.perf_counter() - t_start},
        }
        atomic_write_text(stage / "report.json", json.dumps(report, indent=2) + "\n")
        plot_channels(groups, stage / "channels.png", f"{cfg.model} on {cfg.data} ({cfg.method}): channels kept")
        for name in ("dense.onnx", "gated.onnx", "pruned.onnx", "report.json", "channels.png"):
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def results_table(report: dict) -> str:
    """The before/after table the CLI prints."""
    from onnxprune.table import format_table, human

    d, p, w = report["dense"], report["pruned"], report["wrapped"]
    rows = [
        ["test error", f"{d['error_onnx']:.2%}", f"{p['error_onnx']:.2%}", f"(wrapped, PyTorch eval: {w['error_torch_eval']:.2%})"],
        ["parameters", human(d["params"]), human(p["params"]), f"{d['params'] / max(p['params'], 1):.2f}x fewer"],
        ["MACs", human(d["macs"]), human(p["macs"]), f"{d['macs'] / max(p['macs'], 1):.2f}x fewer"],
        ["ORT CPU latency (batch 1)", f"{d['latency_ms']:.3g} ms", f"{p['latency_ms']:.3g} ms", f"{d['latency_ms'] / p['latency_ms']:.2f}x faster"],
    ]
    return format_table(["", "dense", "pruned", ""], rows, "lrrl")
