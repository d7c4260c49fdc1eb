"""The "Your DataLoader" section: torchvision's ResNet-18 trained through a standard augmenting DataLoader, SBP against
Torch-Pruning at the same MACs (benchmarks/resnet18_dataloader.py)."""

from __future__ import annotations

from benchmarks.report.markdown import machine_line, md_table
from onnxprune.table import human

TRAINING_STAGES = ("dense", "sbp", "sbp_finetune", "torch_pruning_finetune")
LABELS = {"dense": "dense", "sbp": "SBP, pruned by onnxprune", "torch_pruning": "Torch-Pruning at SBP's MACs"}


def _latency(r: dict, threads: int, batch: int, model: str) -> float:
    """A model's median ORT CPU latency in ms."""
    return r["latency_cpu"][f"threads{threads}"][f"batch{batch}"][model]["median_ms"]


def _row(r: dict, key: str, threads: int) -> list[str]:
    """One model: test error, MACs (reduction), parameters, latency at batch 1 and 64, speed-up over dense."""
    m, dense = r["models"][key], r["models"]["dense"]
    lat = [_latency(r, threads, b, key) for b in (1, 64)]
    base = [_latency(r, threads, b, "dense") for b in (1, 64)]
    macs = human(m["macs"]) + ("" if key == "dense" else f" ({dense['macs'] / m['macs']:.2f}x fewer)")
    return [LABELS[key], f"{m['error_pct']:.2f}", macs,
            human(m["params"]), f"{lat[0]:.3g} ms", f"{lat[1]:.4g} ms", f"{base[0] / lat[0]:.2f}x / {base[1] / lat[1]:.2f}x"]


def _cuda_line(r: dict) -> str:
    """ORT CUDA medians per model and batch, or "" where they were not measured."""
    cuda = r.get("latency_cuda") or {}
    if not cuda or "skipped" in cuda:
        return ""
    parts = [f"batch {b.removeprefix('batch')}: " + ", ".join(f"{LABELS[k]} {t['median_ms']:.3g} ms" for k, t in per.items())
             for b, per in cuda.items()]
    return "; ".join(parts)


def _exporters(r: dict) -> str:
    """Which ONNX exporter made each model ("dynamo" for all three, or each named)."""
    used = {k: m["exporter"] for k, m in r["models"].items()}
    if len(set(used.values())) == 1:
        return f"{next(iter(used.values()))} for all three"
    return "; ".join(f"{LABELS[k]}: {e}" for k, e in used.items())


def resnet18_dataloader(run: str, r: dict) -> dict:
    """The values of one run: its setting, its recipes and the table (ORT CPU at 1 thread)."""
    c, times = r["config"], r["stage_times_s"]
    head = ["model", "test error % (ORT)", "MACs", "params", "ORT CPU b1 (1 thread)", "ORT CPU b64 (1 thread)",
            "speed-up vs dense (b1 / b64)"]
    table = md_table(head, [_row(r, key, 1) for key in LABELS if key in r["models"]])
    agreement = r["sbp"].get("agreement_pruned_onnx_with_torch")
    return {"run": run, "machine": machine_line(r["machine"]), "device": c["device"], "epochs": c["epochs"],
            "batch": c["batch_size"], "workers": c["num_workers"], "train_images": c["train_images"],
            "test_images": c["test_images"], "steps": c["steps_per_epoch"], "dense_recipe": c["dense_recipe"],
            "sbp_recipe": c["sbp_recipe"], "tp_recipe": c["tp_recipe"], "target": c["target"],
            "kept": f"{r['sbp']['kept_fraction']:.1%}",
            "agreement": "not measured" if agreement is None else f"{agreement:.2%}",
            "rounds": c["rounds"], "minutes": f"{times['total'] / 60:.1f}",
            "training_minutes": f"{sum(v for k, v in times.items() if k in TRAINING_STAGES) / 60:.1f}",
            "exporters": _exporters(r),
            "cuda": _cuda_line(r), "table": table}
