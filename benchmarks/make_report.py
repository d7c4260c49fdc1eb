"""Render BENCHMARKS.md from benchmarks/results/*/result.json (every figure there comes from a result file).

    python benchmarks/make_report.py
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT, median  # noqa: E402
from onnxprune.table import human  # noqa: E402

SECTIONS: dict[str, Callable[[str, dict], str]] = {}


def section(kind: str):
    def register(fn):
        SECTIONS[kind] = fn
        return fn

    return register


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    parts = [m.get("cpu", "?"), f"{m.get('cpu_count', '?')} cores"]
    if m.get("avx512"):
        parts.append("AVX-512")
    if m.get("gpu"):
        parts.append(m["gpu"])
    parts += [f"onnxruntime {m.get('onnxruntime', '?')}", f"torch {m.get('torch', '?')}", m.get("date", "")]
    return "Measured on: " + ", ".join(p for p in parts if p)


def _s(x: float) -> str:
    return f"{x:.2f} s"


@section("prune-resnet50")
def engine_section(run: str, r: dict) -> str:
    cfg = r["config"]
    size = cfg["model_file_bytes"]
    out = [f"### {run}: `onnxprune prune` on {cfg['model']} ({cfg['input'][2]}x{cfg['input'][3]}), half of every prunable group dead\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/prune_resnet50.py`. "
               f"{cfg['channels_killed']} channels dead in {cfg['groups_killed']} groups; model file {size / 1e6:.0f} MB; "
               f"medians of {cfg['repeats']} runs, each tool in its own process.\n")
    rows = []
    for tool, label in (("onnxprune", "onnxprune prune (ONNX)"), ("torch_pruning", "Torch-Pruning 1.6 (PyTorch)")):
        m = r[tool]["median"]
        over = m["peak_rss"] - r[tool]["baseline_rss"]
        rows.append([
            label, _s(m["load"]), _s(m["analysis+rewrite"]), _s(m["verify"]), _s(m["save"]), _s(m["wall"]),
            f"{m['peak_rss'] / 1e6:.0f} MB ({over / 1e6:.0f} MB = {over / size:.2f}x model above imports)",
        ])
    out.append(md_table(["tool", "load", "analysis+rewrite", "verify", "save / export", "whole command", "peak RSS"], rows))
    out.append("\nTorch-Pruning's columns: load = build the model and read its state dict; analysis+rewrite = "
               "dependency graph + pruning the same channel indices; verify = one forward pass compared with the "
               "dense output; save = `torch.onnx.export`. Its process also carries PyTorch itself.\n")
    rows = []
    mr = r["mac_reduction"]
    for key, label in (("dense", "dense (dead channels still in)"), ("onnxprune", "pruned by onnxprune"), ("torch_pruning", "pruned by Torch-Pruning")):
        lat = [r["latency"][b][key]["median_ms"] for b in ("batch1", "batch8")]
        base = [r["latency"][b]["dense"]["median_ms"] for b in ("batch1", "batch8")]
        rows.append([label, human(r["macs"][key]), human(r["params"][key]), f"{lat[0]:.1f} ms", f"{lat[1]:.1f} ms",
                     f"{base[0] / lat[0]:.2f}x / {base[1] / lat[1]:.2f}x", f"{r['macs']['dense'] / r['macs'][key]:.2f}x"])
    out.append(md_table(["model", "MACs", "params", "ORT CPU batch 1", "ORT CPU batch 8", "speed-up (b1 / b8)", "MAC reduction"], rows))
    sb = r["speedup_over_mac_reduction"]
    out.append(f"\nONNX Runtime CPU, one shared pool of {cfg['ort_threads']} threads, interleaved runs, medians. Speed-up / MAC reduction: "
               f"{sb['batch1']:.2f} (batch 1), {sb['batch8']:.2f} (batch 8); MAC reduction {mr:.2f}x.\n")
    out.append("Targets: " + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in r["targets"].items()) + ".\n")
    return "\n".join(out)


@section("latency-targets")
def latency_section(run: str, r: dict) -> str:
    cfg = r["config"]
    tgt = cfg["target"]
    out = [f"### {run}: is the pruned model faster on {tgt}? (`--target {tgt}` vs `--target none` vs `--round-to 16`)\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/latency_targets.py"
               + (" --target ort-cuda" if tgt == "ort-cuda" else "") + "`. "
               f"{int(cfg['dead_fraction'] * 100)} % of the channels of every prunable group dead (zeroed weights); "
               f"{cfg['threads']} threads; medians of up to {cfg['rounds']} interleaved rounds, all variants of a model "
               "in one run. Noise floor: the input file timed in two sessions against each other. A row whose checks fail is "
               "timed once more with three times the rounds, and that sample decides (marked *re-timed*; the first is "
               "kept in result.json). "
               "`--round-to 16` gives the widths Torch-Pruning's fixed `round_to=16` gives.\n")
    if r.get("complete") is False:
        out.append("**Incomplete run:** " + r.get("source", "the script stopped before every model was measured") + "\n")
    elif r.get("source"):
        out.append("**Source:** " + r["source"] + "\n")
    for batch in cfg["batch"]:
        rows = []
        ok_all = {"target <= input": 0, "target <= none": 0, "target <= round16": 0}
        for m in r["models"]:
            b = m.get(f"batch{batch}")
            if not b:
                continue
            lat = {k: v["median_ms"] for k, v in b["latency"].items()}
            checks = b["checks"]
            for k in ok_all:
                ok_all[k] += bool(checks[k])
            def cell(k):
                return f"{lat[k]:.3g} ms ({lat['input'] / lat[k]:.2f}x)"
            notes = []
            if b.get("first_timing"):
                notes.append("re-timed")
            if b.get("remeasured_on"):
                notes.append(f"re-measured {b['remeasured_on']['date'][:10]}")
            rows.append([
                m["model"] + (f" ({', '.join(notes)})" if notes else ""), f"{lat['input']:.3g} ms", f"{b['noise_floor']:.1%}",
                cell("none"), cell("round16"),
                "**" + cell("target") + "**", b["attempts"] and next(a["attempt"] for a in b["attempts"] if a["accepted"]),
                f"{b['calibration_s']:.1f} s", "yes" if all(checks.values()) else
                "no: " + ", ".join(k for k, v in checks.items() if not v),
            ])
        n = len(rows)
        out.append(f"**Batch {batch}.** Latency (speed-up over the input):\n")
        out.append(md_table(["model", "input", "noise", "--target none", "--round-to 16", f"--target {tgt}", "plan kept",
                             "calibration (cold)", "target <= all (within noise)"], rows))
        out.append("\n" + "; ".join(f"{k}: {v}/{n}" for k, v in ok_all.items()) + " (within the noise floor, at least 1 %).\n")
    cli = r.get("cli_extra_time_resnet50")
    if cli:
        out.append(f"Wall time of `onnxprune prune` on ResNet-50 (224x224, 40 % dead), separate processes, warm cache: "
                   f"`--target none` {cli['prune_none_s']:.2f} s, `--target {tgt}` {cli['prune_target_s']:.2f} s: "
                   f"**+{cli['extra_s']:.2f} s** (target: under 2 s). Cold calibration of the same model "
                   f"(`onnxprune calibrate`): {cli['calibrate_cold_s']:.1f} s.\n")
    return "\n".join(out)


STEP_VARIANTS = {"eager": "SBP, eager gates", "gates": "SBP, gates compiled", "step": "SBP, whole step compiled"}


def _ms(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.2f} ms"


@section("rbp-compile")
def rbp_compile_section(run: str, r: dict) -> str:
    """RBP's compiled training step: gates reading their stage as data against gates branching on it."""
    c = r["config"]
    out = [f"### {run}: RBP's compiled step, one graph for every stage or one per stage\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/rbp_compile.py --model {c['model']} --epochs "
               f"{c['epochs']} --train-limit {c['train_limit']} --device {c['device']}`. RBP's schedule moves its gates "
               "from dormant to active to frozen stage by stage; `fit` compiles its whole training step "
               "(`compile_step`). Gates that branch on their state make each stage a new graph, compiled when the stage "
               "begins; gates that read it as data (`state_as_data`, what `fit` sets since 2026-11-22) share one graph. "
               "Each way in a fresh process, Inductor's caches off; the first epoch holds the first compilation.\n")
    rows = [[x["label"], x["stages"], x["graphs_compiled"], " / ".join(f"{s:.1f}" for s in x["epoch_seconds"]),
             f"{sum(x['epoch_seconds']):.1f} s"] for x in r["rows"]]
    out.append(md_table(["gates", "stages", "graphs compiled", "seconds per epoch", "total"], rows))
    return "\n".join(out) + "\n"


@section("sbp-step-time")
def step_time_section(run: str, r: dict) -> str:
    """Old results: eager vs compiled gates (``sbp_compiled_ms``); new ones: eager gates, gates compiled alone and
    the whole step compiled (the variants in ``config["variants"]``; one not run reads "not measured")."""
    if any("sbp_compiled_ms" in m for m in r["models"]):
        return _step_time_section_gates(run, r)
    cfg = r["config"]
    out = [f"### {run}: one SBP training step: eager gates, gates compiled, whole step compiled\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/sbp_step_time.py --device {cfg['device']}`. "
               f"Median of {cfg['steps']} steps after warm-up, batch {cfg['batch']}, random data on the device; a step is "
               f"{cfg['step']}. `fit` compiles the whole forward pass and loss into one graph on CUDA by default "
               "(`compile_step`, one process, Triton installed); compiling the gates alone (`compile_gates`) was the "
               "previous default. The dense step is timed eager and with its forward pass and loss compiled the same "
               "way. Compile time: the warm-up steps, compilation included, paid once on the first steps, not per "
               "step (the gates' kernels are compiled once per process, so only the first model pays for them; the "
               "whole step is compiled for each model). In brackets: speed-up over eager gates; the fastest SBP step in bold.\n")
    rows = []
    for m in r["models"]:
        sbp = {v: m.get(f"sbp_{v}_ms") for v in STEP_VARIANTS}
        measured = {v: t for v, t in sbp.items() if t is not None}
        best = min(measured, key=measured.get) if measured else None
        cells = [m["model"], _ms(m.get("dense_ms")), _ms(m.get("dense_step_compiled_ms"))]
        for v, t in sbp.items():
            cell = _ms(t)
            if t is not None and v != "eager" and sbp["eager"] is not None:
                cell += f" ({sbp['eager'] / t:.1f}x)"
            cells.append(f"**{cell}**" if v == best and len(measured) > 1 else cell)
        compile_s = [m.get(f"{v}_compile_s") for v in ("gates", "step")]
        cells.append(" / ".join("—" if c is None else f"{c:.0f} s" if c >= 10 else f"{c:.2g} s" for c in compile_s))
        rows.append(cells)
    out.append(md_table(["model", "dense step (eager)", "dense step (compiled)", *STEP_VARIANTS.values(),
                         "compile time (gates / step)"], rows))
    if cfg.get("note"):
        out.append(f"\n**Note**: {cfg['note']}")
    return "\n".join(out) + "\n"


def _step_time_section_gates(run: str, r: dict) -> str:
    """The earlier result format: eager vs compiled gates only."""
    cfg = r["config"]
    out = [f"### {run}: one SBP training step, eager vs compiled gates\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/sbp_step_time.py --device {cfg['device']}` "
               "(an earlier version, which timed the gates compiled alone). "
               f"Median of {cfg['steps']} steps after warm-up, batch {cfg['batch']}, random data on the device; a step is "
               f"{cfg['step']}. Compiling the gates alone (`compile_gates`) was `fit`'s default on CUDA when this was "
               "measured; `fit` now compiles the whole forward pass and loss into one graph on CUDA by default "
               "(`compile_step`), which this run does not measure. The compile time is paid once per process.\n")
    rows = [[m["model"], f"{m['dense_ms']:.2f} ms", f"{m['sbp_eager_ms']:.2f} ms", f"**{m['sbp_compiled_ms']:.2f} ms**",
             f"{m['speedup']:.1f}x", f"{m['compile_s']:.0f} s"] for m in r["models"]]
    out.append(md_table(["model", "dense step", "SBP step, eager gates", "SBP step, compiled gates", "speed-up",
                         "compile (first model)"], rows))
    return "\n".join(out) + "\n"


@section("subnormals")
def subnormals_section(run: str, r: dict) -> str:
    out = ["### Subnormal weights: what they cost on ORT CPU (`flush-subnormals`)\n"]
    out.append(machine_line(r["machine"]) + ". Script: `python benchmarks/subnormals.py`. Each committed pruned model as "
               "committed and after the `flush-subnormals` pass (which `onnxprune prune` now runs first), timed side by "
               f"side: {r['config']['threads']} threads, medians of up to {r['config']['rounds']} interleaved rounds.\n")
    rows = []
    for m in r["models"]:
        cells = [m["model"], f"{m['subnormal_weights']} of {m['float_weights']}"]
        for b in ("batch1", "batch64"):
            c, f = m[b]["committed"]["median_ms"], m[b]["flushed"]["median_ms"]
            cells.append(f"{c:.4g} -> {f:.4g} ms ({c / f:.2f}x)")
        rows.append(cells)
    out.append(md_table(["pruned model", "subnormal weights", "batch 1: committed -> flushed", "batch 64"], rows))
    return "\n".join(out) + "\n"


@section("bn-recalibration")
def bn_recalibration_section(run: str, r: dict) -> str:
    cfg, res = r["config"], r["result"]
    out = [f"### {run}: BatchNorm statistics after Bayesian training (`recalibrate_norms`)\n"]
    out.append(machine_line(r["machine"]) + ". Script: `python benchmarks/bn_recalibration.py`. Gates multiply channels by "
               "noise while training, and a BatchNorm fed by gated channels stores that noise in its running variance; the "
               "deterministic gates of evaluation (and of the exported model) then meet statistics that no longer fit. "
               f"{cfg['model']} at width {cfg['width']}, {cfg['train_images']} training images of the CIFAR-10 JPEG copy, "
               f"dense {cfg['dense']}, SBP {cfg['sbp']} with the KL term x{cfg['kl_scale']:g}; test accuracy on "
               f"{cfg['test_images']} random test images ({cfg.get('device', 'cpu')}). `fit` now re-estimates the statistics after its last epoch.\n")
    out.append(md_table(["dense", "SBP, training's statistics", "SBP, statistics re-estimated", "channels kept", "BatchNorms"],
                        [[f"{res['dense_accuracy']:.1%}", f"{res['sbp_accuracy_training_statistics']:.1%}",
                          f"**{res['sbp_accuracy_recalibrated']:.1%}**", f"{res['kept_fraction']:.1%}",
                          res["batchnorms_recalibrated"]]]))
    return "\n".join(out) + "\n"


@section("sbp-weight-lr")
def sbp_weight_lr_section(run: str, r: dict) -> str:
    cfg = r["config"]
    out = [f"### {run}: SBP's weight learning rate against Torch-Pruning at the same MACs\n"]
    out.append(machine_line(r["machine"]) + ". Script: `python benchmarks/sbp_weight_lr.py`. The CIFAR rows above train "
               "SBP's weights at the authors' VGG rate (1e-5) and fine-tune the Torch-Pruning baseline at 1e-3. "
               f"{cfg['model']} at width {cfg['width']}, {cfg['train_images']} training images of the CIFAR-10 JPEG copy, "
               f"dense {cfg['dense']} ({r['dense_accuracy']:.1%} test accuracy); SBP {cfg['sbp']}, the KL term "
               f"x{cfg['kl_scale']:g}, BatchNorm statistics re-estimated; " + (f"K > 0: {cfg['finetune']}; " if "finetune" in cfg else "")
               + f"Torch-Pruning {cfg['torch_pruning']}. Test accuracy "
               f"on {cfg['test_images']} random test images.\n")
    rows = [[f"{row['sbp_weight_lr']:g}", str(row.get("finetune_epochs", 0)), f"{row['kept_fraction']:.1%}", f"{row['macs_reduction']:.2f}x",
             f"**{row['sbp_accuracy']:.1%}**", f"{row['torch_pruning_accuracy']:.1%} ({row['torch_pruning_macs_reduction']:.2f}x)"]
            for row in r["rows"]]
    out.append(md_table(["SBP weights' lr", "of which fine-tuned (K)", "channels kept", "MACs reduction", "SBP test accuracy",
                         "Torch-Pruning (its MACs reduction)"], rows))
    return "\n".join(out) + "\n"


@section("tvbi-batchnorm")
def tvbi_batchnorm_section(run: str, r: dict) -> str:
    cfg = r["config"]
    out = [f"### {run}: Turbo-VBI's prior on a layer followed by BatchNorm\n"]
    out.append(machine_line(r["machine"]) + ". Script: `python benchmarks/tvbi_batchnorm.py`. A BatchNorm makes the "
               "likelihood blind to the scale of the layer's weight rows, so a prior on the raw weights shrinks them until "
               "BatchNorm's eps kills the channel; Turbo-VBI now regularises the BatchNorm-folded weights (`fold_norms`, "
               f"the default). {cfg['model']} at width {cfg['width']}, {cfg['train_images']} training images of the CIFAR-10 "
               f"JPEG copy, dense {cfg['dense']}, Turbo-VBI {cfg['turbo_vbi']}; test accuracy on {cfg['test_images']} random "
               "test images. Row norm: the smallest ratio, over the gated convs, of the mean weight-row norm after training to "
               "before.\n")
    rows = []
    for row in r["rows"]:
        if row["variant"] == "dense":
            rows.append(["dense", "-", "-", "-", f"{row['test_accuracy']:.1%}"])
            continue
        rows.append([row["variant"], f"{row['train_accuracy_last_epoch']:.1%}", f"{row['kept_fraction']:.1%}",
                     f"{row['smallest_row_norm_ratio']:.3g}", f"**{row['test_accuracy']:.1%}**"])
    out.append(md_table(["Turbo-VBI", "training accuracy, last epoch", "channels kept", "row norm after / before",
                         "test accuracy"], rows))
    return "\n".join(out) + "\n"


def _speedup(lat: dict, batch: str, key: str) -> float | None:
    if not lat or batch not in lat:
        return None
    return lat[batch]["dense"]["median_ms"] / lat[batch][key]["median_ms"]


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


PAPER_NAMES = {"lenet500": "LeNet-500-300", "lenet5": "LeNet5-Caffe", "vgg_cifar": "VGG-like", "resnet56": "ResNet-56",
               "lenet300": "LeNet-300-100"}


def _net_name(cfg: dict) -> str:
    net = PAPER_NAMES.get(cfg["model"], cfg["model"])
    if cfg["model"] == "vgg_cifar":
        net += f" x{cfg['model_kwargs'].get('width', 1.0):g}"
    return f"{net} / {cfg['data']}"


def _kl(cfg: dict) -> str | None:
    """"KL x<scale>" for a run trained on a tempered ELBO (``--kl-scale``, in the config only when not 1), with
    "by MACs" when each group's KL was weighted by its channels' compute (``--kl-weighting macs``)."""
    scale = cfg.get("kl_scale")
    text = None if scale is None or scale == 1 else f"KL x{scale:g}"
    if cfg.get("kl_weighting") == "macs":
        text = (text or "KL") + " by MACs"
    return text


def _speedups(r: dict, key: str) -> tuple[str, str]:
    cpu, gpu = r.get("latency_cpu", {}), r.get("latency_cuda")
    cpu_s = f"{_x(_speedup(cpu, 'batch1', key))} / **{_x(_speedup(cpu, 'batch64', key))}**"
    gpu_s = f"{_x(_speedup(gpu, 'batch1', key))} / {_x(_speedup(gpu, 'batch256', key))}" if gpu else "not measured"
    return cpu_s, gpu_s


def paper_table(results: list[tuple[str, dict]]) -> str:
    """The SBP rows: ours beside the paper's numbers, with the Torch-Pruning baseline at the same MACs."""
    rows = []
    for run, r in results:
        cfg, paper = r["config"], r.get("paper", {})
        err, macs = r["error_pct"], r["macs"]
        paper_err = f"{paper['error']}" if "error" in paper else "-"
        if "dense_error" in paper:
            paper_err += f" (dense {paper['dense_error']})"
        cpu_s, gpu_s = _speedups(r, "pruned")
        rows.append([
            _net_name(cfg) + (f" ({_kl(cfg)})" if _kl(cfg) else ""), f"{err['dense']:.2f} -> **{err['pruned']:.2f}**",
            paper_err,
            f"{err['torch_pruning']:.2f}" if "torch_pruning" in err else "-",
            _units(r), paper.get("units", "-"), _mac_cell(r), _x(paper.get("flops_reduction")),
            cpu_s, _x(paper.get("cpu_speedup")), gpu_s, _x(paper.get("gpu_speedup")),
        ])
    head = ["net / data", "test error % dense -> SBP", "paper error %", "Torch-Pruning error % (same MACs)",
            "units kept (shipped)", "paper units", "MAC reduction (shipped)", "paper FLOPs red.", "ORT CPU speed-up b1 / b64",
            "paper CPU", "ORT CUDA speed-up b1 / b256", "paper GPU"]
    return md_table(head, rows)


def _units(r: dict) -> str:
    """The posterior's widths (every rejected channel deleted), then the shipped model's where they differ."""
    units = r["units"]
    everything = "-".join(str(u) for u in units.get("pruned_all", units["pruned"]))
    shipped = "-".join(str(u) for u in units["pruned"])
    return everything if shipped == everything else f"{everything} ({shipped})"


def _mac_cell(r: dict) -> str:
    macs = r["macs"]
    everything = f"**{macs['dense'] / macs.get('pruned_all', macs['pruned']):.2f}x**"
    return everything if "pruned_all" not in macs or macs["pruned_all"] == macs["pruned"] else \
        f"{everything} ({macs['dense'] / macs['pruned']:.2f}x)"


def _epochs(cfg: dict) -> str:
    """The Bayesian epochs, and how many of the last ones fine-tuned the gate-folded net (``--finetune-epochs``)."""
    tuned = cfg.get("finetune_epochs")
    return f"{cfg['epochs']} (last {tuned} fine-tuning)" if tuned else str(cfg["epochs"])


def _within_paper(r: dict) -> float | None:
    """The highest test error % that meets the paper's row: its error (MNIST), or our dense error plus the paper's
    loss over its dense net (CIFAR, where the JPEG copy shifts every error)."""
    paper = r.get("paper", {})
    if "error" not in paper:
        return None
    if "dense_error" in paper:
        return r["error_pct"]["dense"] + paper["error"] - paper["dense_error"]
    return paper["error"]


def best_within_paper(results: list[tuple[str, dict]]) -> dict[str, tuple[str, dict] | None]:
    """Per net of the paper: of its SBP runs (any variant) whose error meets the paper's, the one with the largest
    MAC reduction (None when no run meets the error)."""
    best: dict[str, tuple[str, dict] | None] = {}
    for net in dict.fromkeys(_net_name(r["config"]) for _, r in results):
        rs = [(run, r) for run, r in results if _net_name(r["config"]) == net and r["method"] == "sbp"]
        bound = next((_within_paper(r) for _, r in rs if _within_paper(r) is not None), None)
        if bound is None:
            continue
        ok = [(run, r) for run, r in rs if r["error_pct"]["pruned"] <= bound + 1e-9]
        best[net] = max(ok, key=lambda item: _reduction(item[1])) if ok else None
    return best


def _reduction(r: dict) -> float:
    """MAC reduction with every rejected channel deleted."""
    return r["macs"]["dense"] / r["macs"].get("pruned_all", r["macs"]["pruned"])


def _best_cpu(r: dict) -> float | None:
    """The better of the run's ORT CPU speed-ups at batch 1 and 64."""
    cpu = r.get("latency_cpu", {})
    found = [s for s in (_speedup(cpu, "batch1", "pruned"), _speedup(cpu, "batch64", "pruned")) if s is not None]
    return max(found) if found else None


def nearest_with_paper_speed(results: list[tuple[str, dict]], net: str) -> str:
    """Of the net's SBP runs that reach the paper's CPU speed-up, the one with the lowest error ('-' if none)."""
    fast = [(run, r) for run, r in results if _net_name(r["config"]) == net and r["method"] == "sbp"
            and "cpu_speedup" in r.get("paper", {}) and (_best_cpu(r) or 0) >= r["paper"]["cpu_speedup"]]
    if not fast:
        return "-"
    run, r = min(fast, key=lambda item: item[1]["error_pct"]["pruned"])
    return f"`{run}`: {r['error_pct']['pruned']:.2f} %, {_reduction(r):.2f}x, CPU {_best_cpu(r):.2f}x"


def scoreboard_table(results: list[tuple[str, dict]]) -> str:
    """Per net of the paper, its best SBP run (any variant) whose error meets the paper's, against the paper's
    compression and CPU speed-up; where that run falls short, the most accurate run that has the paper's speed-up."""
    rows = []
    for net, picked in best_within_paper(results).items():
        if picked is None:
            rs = [r for _, r in results if _net_name(r["config"]) == net and _within_paper(r) is not None]
            rows.append([net, "-", f"<= {_within_paper(rs[0]):.2f}", "no run meets the error", "", "", "", "",
                         nearest_with_paper_speed(results, net)])
            continue
        run, r = picked
        paper, cpu = r["paper"], r.get("latency_cpu", {})
        b1, b64 = _speedup(cpu, "batch1", "pruned"), _speedup(cpu, "batch64", "pruned")
        macs = _reduction(r)
        misses = [what for what, short in (("FLOPs", "flops_reduction" in paper and macs < paper["flops_reduction"]),
                                           ("CPU speed-up", b1 is not None and max(b1, b64 or 0) < paper["cpu_speedup"])) if short]
        rows.append([net, f"`{run}`", f"{r['error_pct']['pruned']:.2f} (<= {_within_paper(r):.2f})",
                     f"{macs:.2f}x", _x(paper.get("flops_reduction")), f"{_x(b1)} / {_x(b64)}", _x(paper["cpu_speedup"]),
                     "meets the paper" if not misses else "short of the paper's " + " and ".join(misses),
                     "-" if not misses else nearest_with_paper_speed(results, net)])
    head = ["net / data", "best SBP run within the paper's error", "test error % (bound)", "MAC reduction", "paper FLOPs red.",
            "ORT CPU speed-up b1 / b64", "paper CPU", "verdict", "if short: most accurate run with the paper's CPU speed-up"]
    return md_table(head, rows)


def shapes_latency_table(results: list[tuple[str, dict]]) -> str:
    """ORT CPU latency of the runs rebuilt from their shapes on another machine (benchmarks/cpu_latency_shapes.py),
    beside the speed-ups the run measured on its own models."""
    rows = []
    for run, r in results:
        t = r.get("latency_cpu_shapes")
        if not t:
            continue
        cells = []
        for batch in ("batch1", "batch64"):
            d, p = t[batch]["dense"]["median_ms"], t[batch]["pruned"]["median_ms"]
            cells.append(f"{d:.2f} / {p:.2f} ms (**{d / p:.2f}x**)")
        here = r.get("latency_cpu_planned_here")
        planned = "-"
        if here:
            planned = " / ".join(f"{_x(_speedup(here, b, 'pruned'))}" + ("" if here[b]["units"] == r["units"]["pruned"]
                                 else f" ({'-'.join(map(str, here[b]['units']))})") for b in ("batch1", "batch64"))
        own = r.get("latency_cpu", {})
        rows.append([f"`{run}`", f"{r['error_pct']['pruned']:.2f}", "-".join(map(str, r["units"]["pruned"])), *cells,
                     planned, f"{_x(_speedup(own, 'batch1', 'pruned'))} / {_x(_speedup(own, 'batch64', 'pruned'))}"])
    if not rows:
        return ""
    head = ["run", "test error %", "units kept (shipped)", "dense / pruned, batch 1", "dense / pruned, batch 64",
            "widths planned here: speed-up b1 / b64", "the run's own speed-up b1 / b64 (GPU host's CPU)"]
    return md_table(head, rows)


SEED_BLIND = ("seed", "tag", "note", "cuda_note", "trained_on", "baseline_macs")  # not how SBP trained
# Which SBP model each Torch-Pruning baseline matches in MACs: (what the report calls it, its key, the baseline's key)
SEED_COMPARISONS = (("shipped", "pruned", "torch_pruning"), ("posterior's", "pruned_all", "torch_pruning_posterior"))


def seed_groups(results: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """SBP runs compared with Torch-Pruning whose configs differ only in the seed (and tag, notes, machine), groups of
    at least two seeds, each sorted by seed."""
    groups: dict[str, list[tuple[str, dict]]] = {}
    for run, r in results:
        if r["method"] != "sbp" or not any(theirs in r["error_pct"] for _, _, theirs in SEED_COMPARISONS):
            continue
        key = json.dumps({k: v for k, v in r["config"].items() if k not in SEED_BLIND}, sort_keys=True)
        groups.setdefault(key, []).append((run, r))
    runs = [sorted(g, key=lambda x: x[1]["config"]["seed"]) for g in groups.values()]
    return [g for g in runs if len({r["config"]["seed"] for _, r in g}) >= 2]


def paired_difference(ours: list[float], theirs: list[float]) -> tuple[float, float | None, int]:
    """Per-seed differences ours - theirs: their mean, its standard error (None for one pair), and how many are < 0."""
    d = [a - b for a, b in zip(ours, theirs)]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else None
    return mean, se, sum(x < 0 for x in d)


def sign_test_p(diffs: list[float]) -> float | None:
    """Two-sided exact sign test that SBP and Torch-Pruning are equally likely to be lower (seeds with no difference
    left out): robust where one seed's gap is far from the others'. None with no nonzero difference."""
    n = sum(d != 0 for d in diffs)
    if not n:
        return None
    k = min(sum(d < 0 for d in diffs), sum(d > 0 for d in diffs))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _mean_sd(v: list[float]) -> str:
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    return f"{mean:.2f} ({sd:.2f})"


def seed_comparisons(results: list[tuple[str, dict]]) -> list[tuple[str, str, str, list[tuple[str, dict]]]]:
    """(net, SBP model, its key, baseline key, runs) for every seed group and every baseline at least two of its
    seeds trained: the shipped model against Torch-Pruning at its MACs, the posterior's against Torch-Pruning at its."""
    out = []
    for seeds in seed_groups(results):
        for model, ours, theirs in SEED_COMPARISONS:
            runs = [(run, r) for run, r in seeds if theirs in r["error_pct"] and ours in r["error_pct"]]
            if len({r["config"]["seed"] for _, r in runs}) >= 2:
                rule = runs[0][1]["config"].get("baseline_rule", "at-most")
                label = model if rule == "at-most" else f"{model}, Torch-Pruning {rule}"
                out.append((_net_name(runs[0][1]["config"]), label, ours, theirs, runs))
    return out


def _reduction_range(v: list[float]) -> str:
    """'1.60x to 1.63x', or '1.70x' when every seed has the same."""
    lo, hi = f"{min(v):.2f}x", f"{max(v):.2f}x"
    return lo if lo == hi else f"{lo} to {hi}"


def seeds_table(results: list[tuple[str, dict]]) -> str:
    """Per net, SBP against Torch-Pruning over seeds of one recipe: the means, the paired difference with its
    standard error, how often SBP is lower; then every seed's row, so that one seed's gap is read against the spread."""
    summary, detail = [], []
    for net, model, ours_key, theirs_key, seeds in seed_comparisons(results):
        ours = [r["error_pct"][ours_key] for _, r in seeds]
        tp = [r["error_pct"][theirs_key] for _, r in seeds]
        mean, se, lower = paired_difference(ours, tp)
        macs = [r["macs"]["dense"] / r["macs"][ours_key] for _, r in seeds]
        tp_macs = [r["macs"]["dense"] / r["macs"][theirs_key] for _, r in seeds]
        p = sign_test_p([a - b for a, b in zip(ours, tp)])
        summary.append([net, model, len(seeds), _mean_sd([r["error_pct"]["dense"] for _, r in seeds]),
                        f"**{_mean_sd(ours)}**", f"**{_mean_sd(tp)}**", f"{mean:+.2f} ({se:.2f})",
                        f"{lower} of {len(seeds)}", "-" if p is None else f"{p:.3f}",
                        f"{_reduction_range(macs)} / {_reduction_range(tp_macs)}"])
        for (run, r), a, b, m, t in zip(seeds, ours, tp, macs, tp_macs):
            detail.append([net, model, r["config"]["seed"], f"`{run}`", f"{r['error_pct']['dense']:.2f}", f"{a:.2f}",
                           f"{b:.2f}", f"{a - b:+.2f}", f"{m:.2f}x / {t:.2f}x"])
    if not summary:
        return ""
    head = ["net / data", "SBP model", "seeds", "dense error %: mean (sd)", "SBP error %: mean (sd)",
            "Torch-Pruning error % at its MACs: mean (sd)", "SBP - Torch-Pruning, paired by seed: mean (s.e.)",
            "seeds SBP is lower", "sign test p", "MAC reduction: SBP / Torch-Pruning"]
    detail_head = ["net / data", "SBP model", "seed", "run", "dense error %", "SBP error %", "Torch-Pruning error %",
                   "SBP - Torch-Pruning", "MAC reduction: SBP / Torch-Pruning"]
    return md_table(head, summary) + "\n\nSeed by seed:\n\n" + md_table(detail_head, detail)


def seeds_digest(results: list[tuple[str, dict]]) -> str:
    """One sentence per seed comparison, for the paper table: SBP minus Torch-Pruning over seeds, and how often lower."""
    said = []
    for net, model, ours_key, theirs_key, seeds in seed_comparisons(results):
        ours = [r["error_pct"][ours_key] for _, r in seeds]
        theirs = [r["error_pct"][theirs_key] for _, r in seeds]
        mean, se, lower = paired_difference(ours, theirs)
        p = sign_test_p([a - b for a, b in zip(ours, theirs)])
        which, _, rule = model.partition(", Torch-Pruning ")
        against = {"nearest": "the nearest reachable count"}.get(rule, "its MACs" if which == "shipped" else "most its MACs")
        said.append(f"{net}, SBP's {which} model against Torch-Pruning at {against}: {mean:+.2f} points (s.e. {se:.2f}), lower in {lower} of {len(seeds)} "
                    f"seeds" + ("" if p is None else f" (sign test p = {p:.3f})"))
    if not said:
        return ""
    return ("Over several seeds of one recipe, SBP minus Torch-Pruning, paired by seed (\"The same recipe, another "
            "seed\" below): " + "; ".join(said) + ".")


SEED_LATENCY = (("ORT CPU batch 1", "latency_cpu", "batch1"), ("ORT CPU batch 64", "latency_cpu", "batch64"),
                ("ORT CUDA batch 1", "latency_cuda", "batch1"), ("ORT CUDA batch 256", "latency_cuda", "batch256"))


def seed_latency_table(results: list[tuple[str, dict]]) -> str:
    """SBP's shipped model against each Torch-Pruning baseline over the seeds of one recipe: the paired error gap and,
    per runtime and batch, the median over seeds of Torch-Pruning's latency over SBP's (each pair timed side by side
    in one run) with the seeds where SBP's model is the faster."""
    rows = []
    for seeds in seed_groups(results):
        for theirs, macs in (("torch_pruning", "the shipped model's"), ("torch_pruning_posterior", "the posterior's")):
            runs = [r for _, r in seeds if theirs in r["error_pct"]]
            if len({r["config"]["seed"] for r in runs}) < 2:
                continue
            rule = runs[0]["config"].get("baseline_rule", "at-most")
            mean, se, lower = paired_difference([r["error_pct"]["pruned"] for r in runs],
                                                [r["error_pct"][theirs] for r in runs])
            cells = []
            for _, kind, batch in SEED_LATENCY:
                timed = [r[kind][batch] for r in runs if {"pruned", theirs} <= set(r.get(kind, {}).get(batch, {}))]
                ratios = [t[theirs]["median_ms"] / t["pruned"]["median_ms"] for t in timed]
                cells.append(f"{median(ratios):.2f}x ({sum(x > 1 for x in ratios)} of {len(ratios)})" if ratios else "-")
            rows.append([_net_name(runs[0]["config"]), f"at {macs} MACs" + ("" if rule == "at-most" else f" ({rule})"),
                         len(runs), f"{mean:+.2f} ({se:.2f}), {lower} of {len(runs)} lower", *cells])
    if not rows:
        return ""
    head = ["net / data", "Torch-Pruning", "seeds", "SBP's shipped model - Torch-Pruning, error: mean (s.e.)",
            *(f"{name}: Torch-Pruning / SBP latency, median (SBP faster)" for name, _, _ in SEED_LATENCY)]
    return md_table(head, rows)


def plot_seeds(results: list[tuple[str, dict]], path: Path) -> bool:
    """One panel per net and SBP model with several seeds: each seed's SBP and Torch-Pruning errors joined by a
    line, the means dashed. False (and no file) when no net has several seeds."""
    panels = seed_comparisons(results)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
    for ax, (net, model, ours_key, theirs_key, seeds) in zip(axes.flat, panels):
        x = [r["config"]["seed"] for _, r in seeds]
        ours = [r["error_pct"][ours_key] for _, r in seeds]
        tp = [r["error_pct"][theirs_key] for _, r in seeds]
        for xi, a, b in zip(x, ours, tp):
            ax.plot([xi, xi], [a, b], color="#c8d6e5", linewidth=2, zorder=1)
        ours_x, tp_x = (_reduction_range([r["macs"]["dense"] / r["macs"][k] for _, r in seeds])
                        for k in (ours_key, theirs_key))
        ax.scatter(x, ours, marker="*", s=110, color="#2e86de", label=f"SBP + onnxprune ({model.split(',')[0]} "
                   f"model), {ours_x} fewer MACs", zorder=3)
        ax.scatter(x, tp, marker="s", s=45, color="#ee5253", label=f"Torch-Pruning, {tp_x} fewer MACs", zorder=3)
        ax.axhline(sum(ours) / len(ours), color="#2e86de", linestyle="--", linewidth=1, label="SBP mean")
        ax.axhline(sum(tp) / len(tp), color="#ee5253", linestyle=":", linewidth=1, label="Torch-Pruning mean")
        ax.set_xticks(x)
        which, _, rule = model.partition(", ")
        ax.set_title(net + (f": SBP's {which} model" if which != "shipped" else "") + (f"; {rule}" if rule else ""),
                     fontsize=9)
        ax.set_xlabel("seed")
        ax.set_ylabel("test error %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: off the points
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def is_variant(r: dict) -> bool:
    """A run of paper_table.py with --tag: an ablation beside the run its RUNS entry defines."""
    return bool(r["config"].get("tag"))


def variants_table(results: list[tuple[str, dict]]) -> str:
    """Every SBP run of each net that has tagged variants: how it was trained, and what it gave."""
    nets = {_net_name(r["config"]) for _, r in results if is_variant(r) and r["method"] == "sbp"}
    rows = []
    for run, r in sorted(results, key=lambda x: (_net_name(x[1]["config"]), x[1]["config"]["epochs"], x[0])):
        cfg = r["config"]
        if r["method"] != "sbp" or _net_name(cfg) not in nets:
            continue
        err = r["error_pct"]
        cpu_s, gpu_s = _speedups(r, "pruned")
        rows.append([_net_name(cfg), f"`{run}`", _epochs(cfg), cfg.get("optimizer", "-").replace("Adam lr 1e-3", "Adam"),
                     cfg.get("placement", "output"), cfg.get("noise", "example"),
                     "ELBO" + (f", **{_kl(cfg)}**" if _kl(cfg) else ""), f"{err['dense']:.2f} -> **{err['pruned']:.2f}**",
                     f"{err['torch_pruning']:.2f}" if "torch_pruning" in err else "-", _units(r), _mac_cell(r), cpu_s, gpu_s])
    head = ["net / data", "run", "epochs", "optimizer", "gate placement", "noise draw", "loss", "test error % dense -> SBP",
            "Torch-Pruning error %", "units kept (shipped)", "MAC reduction (shipped)", "ORT CPU speed-up b1 / b64",
            "ORT CUDA speed-up b1 / b256"]
    return md_table(head, rows)


METHOD_NAMES = {"sbp": "SBP", "rbp": "RBP", "turbo-vbi": "Turbo-VBI"}


def longest_runs(results: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """One row per (net, method): the longest schedule (a net retrained for longer keeps its shorter run for
    the same-budget methods table)."""
    best: dict[tuple[str, str], tuple[str, dict]] = {}
    for run, r in results:
        key = (_net_name(r["config"]), r["method"])
        rank = (r["config"]["epochs"], not is_variant(r))  # at equal epochs, the run RUNS defines
        if key not in best or rank > (best[key][1]["config"]["epochs"], not is_variant(best[key][1])):
            best[key] = (run, r)
    return [item for item in results if item in best.values()]


def _same_budget(rs: list[dict]) -> list[dict]:
    """One row per method, at the epochs most methods of this net were trained for."""
    epochs = [r["config"]["epochs"] for r in rs]
    common = max(set(epochs), key=lambda e: (len({r["method"] for r in rs if r["config"]["epochs"] == e}), e))

    def changed(r: dict) -> bool:  # changed gate constants, a tempered ELBO or fine-tuning epochs
        return bool(r["config"].get("gate_options")) or _kl(r["config"]) is not None or bool(r["config"].get("finetune_epochs"))

    picked: dict[str, dict] = {}
    for r in rs:
        if changed(r):
            continue  # a method with changed constants: listed beside its default run, below
        if r["method"] not in picked or (r["config"]["epochs"] == common) > (picked[r["method"]]["config"]["epochs"] == common):
            picked[r["method"]] = r
    extra = [r for r in rs if changed(r) and r["config"]["epochs"] == common]
    return list(picked.values()) + extra


def _agreement(r: dict) -> str:
    """Share of test images on which the shipped ONNX model predicts what the wrapped net predicts in evaluation
    mode, with the wrapped net's error ('not recorded' for runs trained before the check)."""
    agree = r.get("agreement_with_wrapped", {}).get("pruned")
    if agree is None:
        return "not recorded"
    return f"{100 * agree:.2f} % (wrapped {r['error_pct']['wrapped_torch']:.2f} % error)"


def methods_table(results: list[tuple[str, dict]]) -> str:
    """SBP, RBP and Turbo-VBI side by side on every net trained with more than one of them, same epochs where
    a run exists at the same budget."""
    by_net: dict[str, list[dict]] = {}
    for _, r in results:
        by_net.setdefault(_net_name(r["config"]), []).append(r)
    rows = []
    for net, rs in by_net.items():
        rs = _same_budget(rs)
        if len({r["method"] for r in rs}) < 2:  # a net trained with SBP alone belongs to the tables above
            continue
        for r in sorted(rs, key=lambda r: (bool(r["config"].get("tag")), list(METHOD_NAMES).index(r["method"]))):
            err, macs, method = r["error_pct"], r["macs"], r["method"]
            cpu_s, gpu_s = _speedups(r, "pruned")
            seconds = r.get("stage_times_s", {}).get(f"{method}_training_s")
            settings = [f"{k} {v}" for k, v in (r["config"].get("gate_options") or {}).items()]
            lr = re.search(r"Adam lr ([0-9.e+-]+)", r["config"].get("optimizer", ""))
            settings += [f"weights at lr {float(lr.group(1)):g}"] if lr and float(lr.group(1)) != 1e-3 else []
            settings += [_kl(r["config"])] if _kl(r["config"]) else []
            settings += [f"last {r['config']['finetune_epochs']} fine-tuning"] if r["config"].get("finetune_epochs") else []
            settings += ["schedule restarted per stage"] if r["config"].get("lr_restarts") == "stage" else []
            name = METHOD_NAMES[method] + (" (" + ", ".join(settings) + ")" if settings else "")
            if not r["config"].get("tag"):  # the run's recipe in paper_table.RUNS, not a variant
                name = f"**{name}**, the script's recipe"
            rows.append([net, name, f"{err['dense']:.2f} -> **{err['pruned']:.2f}**",
                         "-".join(str(u) for u in r["units"]["pruned"]), f"{macs['dense'] / macs['pruned']:.2f}x",
                         f"{r['params']['dense'] / r['params']['pruned']:.2f}x", cpu_s, gpu_s,
                         f"{r['config']['epochs']} ({seconds:.0f} s)" if seconds else str(r["config"]["epochs"]),
                         _agreement(r)])
    head = ["net / data", "method", "test error % dense -> pruned", "units kept", "MAC reduction", "parameter reduction",
            "ORT CPU speed-up b1 / b64", "ORT CUDA speed-up b1 / b256", "Bayesian epochs (time)",
            "pruned ONNX predicts as the wrapped net"]
    return md_table(head, rows)


def _schedule_note(run: str, r: dict) -> str:
    """Where a row was trained and for how long; flags schedules cut below the script's default."""
    from benchmarks.paper_table import RUNS

    cfg = r["config"]
    suffix = "-" + r["method"].replace("-", "") + (f"-{cfg['tag']}" if cfg.get("tag") else "")
    name = run.removesuffix(suffix)
    default = RUNS[name].recipe_for(r["method"]).get("epochs", RUNS[name].epochs) if name in RUNS else None
    where = cfg.get("trained_on") or {}
    short = f" (**cut short**: the script's default is {default})" if default and cfg["epochs"] < default else ""
    if cfg.get("dense"):
        pre = f"dense net {cfg['dense']}"
    else:
        pre = "pretrained checkpoint" if cfg.get("pretrained") else f"{cfg.get('pretrain_epochs', '?')} dense epochs"
    kl = f" on a tempered ELBO ({_kl(cfg)})" if _kl(cfg) else ""
    if cfg.get("finetune_epochs"):
        kl += f" (the last {cfg['finetune_epochs']} fine-tuning the gate-folded net, rejected channels held at zero)"
    times = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in r.get("stage_times_s", {}).items())
    notes = "".join(f" **Note**: {cfg[k]}." for k in ("note", "cuda_note") if cfg.get(k))
    if r.get("shipped_batch64"):
        b64 = r["shipped_batch64"]
        notes += (f" At batch 64 the model `onnxprune prune --batch 64` ships is timed: units "
                  f"{'-'.join(map(str, b64['units']))}, {r['macs']['dense'] / b64['macs']:.2f}x fewer MACs, "
                  f"{b64['error_pct']:.2f} % error.")
    return (f"{run}: {pre}, {cfg['epochs']} Bayesian epochs{kl}{short}, on {where.get('gpu') or where.get('device', '?')}; "
            f"{times}. Latency CPU: {r['machine'].get('cpu', '?')} ({r['machine'].get('cpu_count', '?')} cores, 2 threads used)"
            f".{notes}")


HEADER = """# Benchmarks

Every number here is generated by `python benchmarks/make_report.py` from the
`result.json` files under `benchmarks/results/`, each written by the script named
in its section. Timings on shared machines are noisy: latencies are medians of
interleaved runs measured side by side in one process.
"""


def _zoo_options(config: dict, method: str) -> str:
    """A zoo run's gate options for one method, as `key=value`, with its gate learning rate where one was given
    (or the method's defaults)."""
    options = dict(config.get("gate_options", {}).get(method, {}))
    if method in config.get("gate_lr", {}):
        options["gate lr"] = config["gate_lr"][method]
    return ", ".join(f"{k}={v:g}" for k, v in sorted(options.items())) or "defaults"


def _tf32(config: dict) -> bool:
    """Whether a zoo run on CUDA took the wrapped net's predictions with TF32 convolutions (before 2026-11-22's fix)."""
    return config["device"].startswith("cuda") and "torch_eval_precision" not in config


def methods_zoo_section(paths: list[Path]) -> str:
    """Every MNIST/CIFAR-10 architecture through each method (benchmarks/methods_zoo.py), one table over every
    zoo result file (a lease may split the zoo over GPUs, and finish on a CPU): the export's check."""
    zoos = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not zoos:
        return ""
    import models  # the registry's order: a zoo split over several files lists part of it each

    names = list(models.REGISTRY) + [m for z in zoos for m in z["config"].get("models", []) if m not in models.REGISTRY]
    order = {m: i for i, m in enumerate(dict.fromkeys(names))}
    kl_scales = [z["config"].get("kl_scale", 1) for z in zoos for _ in z["rows"]]
    usual_kl = max(set(kl_scales), key=kl_scales.count) if kl_scales else 1
    entries = []  # (config, row, machine)
    planned, done = [], set()
    for z in zoos:
        c = z["config"]
        for m in c.get("models", []):
            planned += [(m, k, _zoo_options(c, k)) for k in c.get("methods", [])]
        for r in z["rows"]:
            entries.append((c, r, z["machine"]))
            done.add((r["model"], r["method"], _zoo_options(c, r["method"])))
    entries.sort(key=lambda e: (order.get(e[1]["model"], len(order)), e[1]["method"], _zoo_options(e[0], e[1]["method"]),
                                e[0]["device"]))

    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}"

    def options(c: dict, method: str) -> str:  # a zoo trained with another KL weight than most says so
        text = _zoo_options(c, method)
        kl = c.get("kl_scale", 1)
        return text if kl == usual_kl else f"{text}, **KL x{kl:g}**" if kl != 1 else f"{text}, **the plain ELBO**"

    rows = [[f"`{r['model']}`", r["data"], METHOD_NAMES[r["method"]], options(c, r["method"]),
             f"{r['train_images']} on {c['device'].split(':')[0].upper()}", pct(r.get("dense_error_torch")),
             pct(r["dense_error_onnx"]), pct(r["wrapped_error_torch"]), pct(r["pruned_error_onnx"]),
             f"**{100 * r['agreement_with_wrapped']:.2f} %**" + (" (TF32)" if _tf32(c) else ""),
             f"{r['channels_kept']} / {r['channels_gated']}",
             f"{r['macs']['dense'] / r['macs']['pruned']:.2f}x", f"{r['seconds']:.0f}"] for c, r, _ in entries]
    budgets = sorted({(c["pretrain_epochs"], c["epochs"], c.get("kl_scale", 1), c.get("kl_weighting", "none"))
                      for c, _, _ in entries})
    budget_text = "; ".join(f"{p} dense and {e} Bayesian epochs" + (f", KL x{k:g}" + (" by MACs" if w == "macs" else "")
                                                                     if k != 1 else ", the plain ELBO") for p, e, k, w in budgets)
    machines = sorted({machine_line({**m, "date": m.get("date", "")[:10]}) for _, _, m in entries})
    text = ("\n### Every architecture through RBP and Turbo-VBI: the export's check\n\n"
            "`python benchmarks/methods_zoo.py` runs `onnxprune train`'s pipeline on every architecture in `models/` whose "
            f"dataset is MNIST or CIFAR-10, on a fixed random subset of the training set: {budget_text}; then export, "
            "`onnxprune prune --target none`, and the whole test set on ONNX Runtime against the wrapped net's predictions "
            "in PyTorch evaluation mode. A short budget: it checks that every architecture trains and exports exactly "
            "under each method, not the methods' accuracy (thousands of training images for a few epochs: the CIFAR nets stay far from it). "
            + ("The dense net's two columns compare the two runtimes before any pruning (– where not recorded). "
               if any("dense_error_torch" in r for _, r, _ in entries) else "") + "; ".join(machines) + ".")
    if any(_tf32(c) for c, _, _ in entries):
        text += (" Rows marked (TF32) were trained on CUDA before `predict` switched TF32 off: the wrapped net's "
                 "predictions came from TF32 convolutions (PyTorch's default for cuDNN), against ONNX Runtime's float32.")
        exact = [r for c, r, _ in entries if not _tf32(c)]
        if exact and all(r["agreement_with_wrapped"] == 1.0 for r in exact):
            text += (f" The {len(exact)} rows computed in float32 on both sides agree on every test image, which points to that rounding, not the pruning, "
                     "for the few images of a TF32 row.")
    if any(c.get("gate_lr") for c, _, _ in entries):
        text += (" A gate lr in the options column is the gates' learning rate where it is not the pipeline's 3e-2: RBP's "
                 "stages are one epoch each on these nets (78 steps), in which Adam moves log alpha by about "
                 "3 x lr x 39 (cosine restarted per stage), and a channel needs 11 to be rejected (from -8 past 3). At "
                 "3e-2 that is 3.5, and RBP kept every channel of the CIFAR nets, whatever the data said; `fit` now "
                 "warns of it (docs/methods.md, RBP, how far the noise can travel in a stage).")
    notes = list(dict.fromkeys(z["note"] for z in zoos if z.get("note")))
    if notes:
        text += " Notes of the zoo files: " + " ".join(f"({i}) {n}." for i, n in enumerate(notes, 1))
    superseded = sorted(p.parent.name for p in (RESULTS / "superseded").glob("methods-zoo*/result.json"))
    if superseded:
        text += (f" Earlier zoos, superseded by these rows, are kept in `benchmarks/results/superseded/` "
                 f"({', '.join(superseded)}).")
    missing = [f"{m} / {METHOD_NAMES[k]} ({o})" for m, k, o in dict.fromkeys(planned) if (m, k, o) not in done]
    if missing:
        text += f" **Cut short**: not run: {', '.join(missing)}."
    text += "\n\n"
    head = ["model", "data", "method", "gate options", "train images", "dense error % (PyTorch)", "dense error % (ORT)",
            "wrapped error % (PyTorch)", "pruned error % (ORT)", "pruned predicts as wrapped", "channels kept / gated",
            "MAC reduction", "seconds"]
    return text + md_table(head, rows)


def plot_error_vs_macs(results: list[tuple[str, dict]], path: Path, extra: dict[str, tuple[str, dict]] | None = None) -> None:
    """One panel per net: test error against MACs for dense, every Bayesian method and Torch-Pruning; ``extra``
    adds, per net, one more SBP run (a variant), drawn as a hollow star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    by_net: dict[str, list[dict]] = {}
    for _, r in results:
        by_net.setdefault(_net_name(r["config"]), []).append(r)
    n = len(by_net)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    method_style = {"sbp": ("*", "#2e86de"), "rbp": ("D", "#10ac84"), "turbo-vbi": ("^", "#ff9f43")}
    for ax, (net, rs) in zip(axes.flat, by_net.items()):
        points = {}
        dense: dict[tuple[int, float], list[str]] = {}  # runs of one net trained in different leases start from different dense nets
        for r in rs:
            dense.setdefault((r["macs"]["dense"], round(r["error_pct"]["dense"], 2)), []).append(METHOD_NAMES[r["method"]])
        for i, ((m, e), methods) in enumerate(dense.items()):
            label = "dense" if len(dense) == 1 else f"dense net of the {', '.join(methods)} run{'s' if len(methods) > 1 else ''}"
            points[label] = (m, e, "o" if i == 0 else "oo", "#8395a7")  # the second dense net hollow
        for r in rs:
            marker, color = method_style[r["method"]]
            points[f"{METHOD_NAMES[r['method']]} + onnxprune"] = (r["macs"]["pruned"], r["error_pct"]["pruned"], marker, color)
            if "torch_pruning" in r["macs"]:
                points["Torch-Pruning (same MACs as SBP)"] = (r["macs"]["torch_pruning"], r["error_pct"]["torch_pruning"], "s", "#ee5253")
        variant = (extra or {}).get(net)
        if variant is not None and variant[1] not in rs:
            run, r = variant
            points[f"SBP variant {r['config'].get('tag')} (best within the paper's error)"] = (
                r["macs"]["pruned"], r["error_pct"]["pruned"], "*o", "#2e86de")
        for label, (m, e, marker, color) in points.items():
            if marker in ("*o", "oo"):  # hollow star, hollow circle
                ax.scatter(m / 1e6, e, marker=marker[0], s=130 if marker == "*o" else 70, facecolors="none", edgecolors=color,
                           linewidths=1.2, label=label, zorder=3)
                continue
            ax.scatter(m / 1e6, e, marker=marker, s=110 if marker == "*" else 70, color=color, label=label, zorder=3,
                       alpha=0.85, edgecolors="white", linewidths=0.5)
        macs = [p[0] / 1e6 for p in points.values()]
        if max(macs) / min(macs) > 20:
            ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_title(net, fontsize=9)
        ax.set_xlabel("MACs (millions)")
        ax.set_ylabel("test error %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parts = [HEADER]
    paper = [(p.parent.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*/result.json"))]
    paper = [(run, r) for run, r in paper if r.get("benchmark") == "paper-table" and not r["config"].get("quick")]
    if paper:
        canonical = [(run, r) for run, r in paper if not is_variant(r)]
        best = {net: picked for net, picked in best_within_paper(paper).items() if picked is not None}
        plot_error_vs_macs(longest_runs(canonical + [item for item in paper if is_variant(item[1]) and item[1]["method"] != "sbp"]),
                           RESULTS / "paper_error_vs_macs.png", extra=best)  # every method's longest run
        sbp = [(run, r) for run, r in longest_runs(canonical) if r["method"] == "sbp"]
        parts.append("### The SBP paper's table, reproduced and measured on ONNX Runtime\n")
        parts.append(
            "Scripts: `python benchmarks/paper_table.py RUN --method METHOD` (one per row; results in "
            "`benchmarks/results/RUN-METHOD/`); CUDA columns from `--stage measure-cuda` on the GPU "
            "machine. Errors are on the test set, computed by ONNX Runtime on the exported dense and pruned models. CIFAR rows use "
            "the JPEG copy of CIFAR-10 (its artefacts cost about 10 points against published numbers), so they are compared "
            "with our own dense baseline on the same data, never with the literature. Units: the width of every layer but the "
            "classifier (for the MLPs, the input pixels kept first). Speed-ups: median latency of the dense model over the pruned "
            "one, timed side by side (CPU: one shared ORT pool of 2 threads; CUDA: I/O bound on the device). The paper measured "
            "its speed-ups in its own framework. Torch-Pruning: L2-magnitude pruning of the same dense net to the same MACs as "
            "the SBP model, fine-tuned for as many epochs.\n"
        )
        parts.append(paper_table(sbp))
        parts.append("\nThe paper's bar, met or not: per net, of all its SBP runs (the variants below included), the one "
                     "with the largest MAC reduction among those whose error meets the paper's (MNIST: the paper's error; "
                     "CIFAR: our dense error plus the paper's loss over its own dense net, 7.2 - 6.8 = 0.4 points). "
                     "It meets the paper when its MAC reduction and its better CPU speed-up (batch 1 or 64) are at least "
                     "the paper's.\n")
        parts.append(scoreboard_table(paper))
        parts.append("\nUnits and MACs: the posterior's decision, every rejected channel deleted (`--target none`); in "
                     "brackets, the model `onnxprune prune --target ort-cpu` ships, which keeps dead channels where whole "
                     "blocks of 16 run faster on ORT CPU. Speed-ups are the shipped model's; at batch 64, the model "
                     "`onnxprune prune --batch 64` ships, where it differs (runs measured since 2026-11-22 evening: the "
                     "run's note below gives its units).\n")
        digest = seeds_digest(paper)
        if digest:
            parts.append("\nTorch-Pruning's column is one seed at the shipped model's MACs. " + digest + "\n")
        shapes = shapes_latency_table(paper)
        if shapes:
            machine = next(r["latency_cpu_shapes"]["machine"] for _, r in paper if r.get("latency_cpu_shapes"))
            parts.append("\n#### The CIFAR models' CPU latency on a 2-core machine\n")
            parts.append("The CIFAR models are too large to come back from the GPU machine, so the runs timed them on its "
                         "CPU (2 of its 64 cores). `python benchmarks/cpu_latency_shapes.py RUN..` rebuilds each run's dense "
                         "and shipped models through the same pipeline with random weights (latency on ORT CPU does not "
                         "depend on the weights' values), checks every layer's width against the shipped model, and times "
                         "them side by side here (2 threads, medians of interleaved runs). The shipped widths were "
                         "planned for the GPU host's CPU; with `--plan-here` the script also lets `onnxprune prune "
                         "--target ort-cpu --threads 2` plan them here from the posterior's widths, for batch 1 and for "
                         "batch 64 (the widths it picks are given where they differ from the shipped ones). Timings of one "
                         "model differ by up to about 10 % between invocations on this shared machine. "
                         + machine_line(machine) + ".\n")
            parts.append(shapes)
        seeds = seeds_table(paper)
        if seeds:
            parts.append("\n#### The same recipe, another seed\n")
            parts.append("Runs whose configuration differs only in the seed (`--seed`; the dense net each started from "
                         "was retrained in its lease, hence the dense column; the seeds of one lease share it). "
                         "Torch-Pruning prunes the same dense net to the MACs of the model SBP ships (landing a little "
                         "below them) and fine-tunes as long; its seed is the run's. Where a run also trained it to the "
                         "MACs of the posterior's own model, every rejected channel deleted (`--baseline-macs "
                         "posterior`; the shipped model keeps dead channels where ORT CPU runs them faster, so the two "
                         "compute the same function), a row marked posterior's compares that model with it. A uniform "
                         "ratio moves every layer by whole channels, so only some MAC counts are reachable (ResNet-56: "
                         "1.60x, then 1.70x): by default Torch-Pruning takes the nearest at or below its target, never "
                         "more MACs than SBP; rows marked *Torch-Pruning nearest* (`--baseline-rule nearest`) took the "
                         "nearest on either side. The difference is taken seed by seed "
                         "(both from one dense net), then averaged; s.e. is its standard error (sd over the square root of "
                         "the number of seeds): a mean within about two of them of zero is a tie. The sign test's p is the "
                         "chance, were each seed a coin toss between the two, of a count of seeds at least as one-sided "
                         "as this; one seed far from the rest does not move it as it moves the mean. One test image is "
                         "0.01 points.\n")
            parts.append(seeds)
            latency = seed_latency_table(paper)
            if latency:
                parts.append("\nThe model SBP ships against each baseline on the runtime. Every run timed its models "
                             "side by side (medians of interleaved runs; ORT CPU on 2 threads), on the GPU host while "
                             "other runs trained there, so one run's timings are noisy: the table gives the median over "
                             "seeds of Torch-Pruning's latency over SBP's, and in how many seeds SBP's model is the "
                             "faster (more than 1.00x: SBP faster). At CPU batch 64 SBP's model is the one `onnxprune "
                             "prune --batch 64` ships. The shipped model computes the posterior's function (errors "
                             "within 0.01 points), so against the baseline at the posterior's MACs it has more MACs "
                             "than Torch-Pruning's model and a lower error.\n")
                parts.append(latency + "\n")
            if plot_seeds(paper, RESULTS / "paper_seeds.png"):
                parts.append("\n![SBP and Torch-Pruning, seed by seed](benchmarks/results/paper_seeds.png)\n")
        parts.append("\n### SBP variants: the authors' recipe, piece by piece\n")
        parts.append("The same dense net per architecture (`--dense-dir`), trained on with `--tag` variants of "
                     "`benchmarks/paper_table.py` (the plans in `benchmarks/plans/`, run with `benchmarks/gpu_block.sh "
                     "launch-plan`): the SBP authors' 200-epoch schedule (Adam, constant, then linear decay to 0 over the "
                     "second half), the gate on `W x` before the bias (`--placement pre-bias`; a rejected channel is then the "
                     "constant `relu(b)`, which `onnxprune prune` folds into the next layer's bias), one noise draw per "
                     "minibatch (`--noise batch`), the gates' learning rate and the KL term's weight (`--kl-scale`: "
                     "the loss column reads KL x*s* for a tempered ELBO, its KL term multiplied by *s*, which trades "
                     "accuracy for sparsity, and ELBO for the plain one; *by MACs*: each channel's KL weighted by its "
                     "compute, `--kl-weighting macs`, docs/methods.md), and noise-free fine-tuning epochs at the end "
                     "(`--finetune-epochs`, in the epochs column). Every variant that was run is listed.\n")
        parts.append(variants_table(paper))
        parts.append("\n### SBP vs RBP vs Turbo-VBI\n")
        parts.append("Same dense recipe, same export and `onnxprune prune` for every method of a net "
                     "(`--method sbp|rbp|turbo-vbi`), and the same epochs (the Bayesian epochs column): where SBP was trained for longer "
                     "(the MNIST LeNets at 200 epochs, in the table above), this table takes its run at the other methods' "
                     "budget (LeNet5: `mnist-lenet5-sbp-100ep-output`, with RBP and Turbo-VBI also at 100 epochs). The papers' own numbers for these nets could not be retrieved here: "
                     "RBP's abstract (arXiv 1812.00353) gives only ILSVRC2012 figures (5.0x FLOPs reduction for VGG-16, 2.2x "
                     "for ResNet-50) and its LeNet/CIFAR tables were not readable from this machine; Turbo-VBI's abstract "
                     "(arXiv 2302.10483) gives no numbers. SBP's are in the table above. The last column checks the export: "
                     "on the test set, the shipped ONNX model's predictions against the wrapped (or fine-tuned) net's in "
                     "PyTorch evaluation mode (recorded by `paper_table.py` since 2026-11-22, and added by `--stage verify` "
                     "to older runs whose work folder was kept; the GPU-trained ones were not). Per net, the rows in bold come first: "
                     "each method's recipe in `benchmarks/paper_table.py` (`RUNS`), what the script trains when no flag "
                     "changes it; the variants follow.\n")
        parts.append(methods_table(paper))
        parts.append(methods_zoo_section(sorted(RESULTS.glob("methods-zoo*/result.json"))))
        parts.append("\nHow each row was trained and measured:\n")
        parts.append("\n".join(f"- {_schedule_note(run, r)}" for run, r in paper) + "\n")
        cuda = next((r["machine_cuda"] for _, r in paper if r.get("machine_cuda")), None)
        parts.append("CUDA latencies: " + (machine_line(cuda).removeprefix("Measured on: ") if cuda else "not measured") + ".\n")
        parts.append("\n![error vs MACs](benchmarks/results/paper_error_vs_macs.png)\n")
    for path in sorted(RESULTS.glob("*/result.json")):
        r = json.loads(path.read_text())
        if r.get("benchmark") in ("paper-table", "methods-zoo"):
            continue
        render = SECTIONS.get(r.get("benchmark", ""))
        if render is None:
            print(f"skipping {path}: no renderer for benchmark {r.get('benchmark')!r}")
            continue
        parts.append(render(path.parent.name, r))
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
