"""The single-purpose benchmarks' values for the report's template: one dict per run of each experiment.

Each function takes (run, result) and returns what the template's sentences and tables need; the
sentences themselves are in template.md.
"""

from __future__ import annotations

from benchmarks.report.architectures import user_architectures
from benchmarks.report.dataloader import resnet18_dataloader
from benchmarks.report.markdown import machine_line, md_table, ms, seconds
from benchmarks.report.realisation import layer_realisation
from benchmarks.report.scale import prune_at_scale
from benchmarks.report.vit_heads import vit_heads
from onnxprune.table import human

STEP_VARIANTS = {"eager": "SBP, eager gates", "gates": "SBP, gates compiled", "step": "SBP, whole step compiled"}


def _engine_tools_table(r: dict) -> str:
    """Each tool's time per phase and peak memory."""
    size = r["config"]["model_file_bytes"]
    rows = []
    for tool, label in (("onnxprune", "onnxprune prune (ONNX)"), ("torch_pruning", "Torch-Pruning 1.6 (PyTorch)")):
        m = r[tool]["median"]
        over = m["peak_rss"] - r[tool]["baseline_rss"]
        rows.append([label, seconds(m["load"]), seconds(m["analysis+rewrite"]), seconds(m["verify"]), seconds(m["save"]),
                     seconds(m["wall"]), f"{m['peak_rss'] / 1e6:.0f} MB ({over / 1e6:.0f} MB = {over / size:.2f}x model above imports)"])
    return md_table(["tool", "load", "analysis+rewrite", "verify", "save / export", "whole command", "peak RSS"], rows)


def _engine_models_table(r: dict) -> str:
    """The dense and both pruned models: costs and ORT CPU latency."""
    rows = []
    for key, label in (("dense", "dense (dead channels still in)"), ("onnxprune", "pruned by onnxprune"),
                       ("torch_pruning", "pruned by Torch-Pruning")):
        lat = [r["latency"][b][key]["median_ms"] for b in ("batch1", "batch8")]
        base = [r["latency"][b]["dense"]["median_ms"] for b in ("batch1", "batch8")]
        rows.append([label, human(r["macs"][key]), human(r["params"][key]), f"{lat[0]:.1f} ms", f"{lat[1]:.1f} ms",
                     f"{base[0] / lat[0]:.2f}x / {base[1] / lat[1]:.2f}x", f"{r['macs']['dense'] / r['macs'][key]:.2f}x"])
    return md_table(["model", "MACs", "params", "ORT CPU batch 1", "ORT CPU batch 8", "speed-up (b1 / b8)", "MAC reduction"], rows)


_PHASES = ("onnxprune's analysis+rewrite still includes reading\nthe weights out of the protobuf and building the "
               "output ModelProto, which Torch-Pruning's columns count under load\nand save; the issue's goal "
               "(analysis+rewrite at least as fast as Torch-Pruning's) is not met yet.")
_PHASES = ("onnxprune's columns: load = parse the file, import the graph and copy\nthe weights out of the protobuf; "
           "analysis+rewrite = shape inference, the passes (subnormals, channel analysis and rewrite), the\nMAC counts "
           "and building the output ModelProto, weights copied into it; save = write the staged file, fsynced, and "
           "move\nit into place (docs/engine.md, \"Large models\").")


def prune_resnet50(run: str, r: dict) -> dict:
    """`onnxprune prune` against Torch-Pruning on ResNet-50 with half of every group dead."""
    cfg, sb = r["config"], r["speedup_over_mac_reduction"]
    return {"run": run, "machine": machine_line(r["machine"]), "model": cfg["model"], "height": cfg["input"][2],
            "width": cfg["input"][3], "channels": cfg["channels_killed"], "groups": cfg["groups_killed"],
            "size_mb": f"{cfg['model_file_bytes'] / 1e6:.0f}", "repeats": cfg["repeats"], "threads": cfg["ort_threads"],
            "tools_table": _engine_tools_table(r), "models_table": _engine_models_table(r),
            "onnxprune_phases": _PHASES,
            "b1": f"{sb['batch1']:.2f}", "b8": f"{sb['batch8']:.2f}", "mac_reduction": f"{r['mac_reduction']:.2f}",
            "targets": "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in r["targets"].items())}


def _latency_row(m: dict, b: dict) -> list:
    """One model's latencies at one batch size, and whether --target won."""
    lat = {k: v["median_ms"] for k, v in b["latency"].items()}

    def cell(k: str) -> str:
        return f"{lat[k]:.3g} ms ({lat['input'] / lat[k]:.2f}x)"

    notes = (["re-timed"] if b.get("first_timing") else []) + \
        ([f"re-measured {b['remeasured_on']['date'][:10]}"] if b.get("remeasured_on") else [])
    checks = b["checks"]
    f32 = lat.get("input_float32")
    reference = [] if f32 is None else [f"{f32:.3g} ms ({f32 / lat['input']:.2f}x)"]
    return [m["model"] + (f" ({', '.join(notes)})" if notes else ""), *reference, f"{lat['input']:.3g} ms",
            f"{b['noise_floor']:.1%}", cell("none"), cell("round16"), "**" + cell("target") + "**",
            b["attempts"] and next(a["attempt"] for a in b["attempts"] if a["accepted"]), f"{b['calibration_s']:.1f} s",
            "yes" if all(checks.values()) else "no: " + ", ".join(k for k, v in checks.items() if not v) + _same_widths(b)]


def _same_widths(b: dict) -> str:
    """For a failing row whose --target model has --round-to 16's MACs (the same widths): how far apart the two
    were timed, which is this run's noise on one model, not a difference between models."""
    macs, lat = b.get("macs", {}), b["latency"]
    if not macs or macs.get("target") != macs.get("round16"):
        return ""
    apart = abs(lat["target"]["median_ms"] / lat["round16"]["median_ms"] - 1.0)
    return f" (its widths are --round-to 16's, same MACs, and the two were timed {apart:.0%} apart)"


def _latency_batch(r: dict, batch: int) -> dict:
    """One batch size of a latency-targets run: its table and how many models passed each check."""
    rows, passed = [], {"target <= input": 0, "target <= none": 0, "target <= round16": 0}
    for m in r["models"]:
        b = m.get(f"batch{batch}")
        if not b:
            continue
        for k in passed:
            passed[k] += bool(b["checks"][k])
        rows.append(_latency_row(m, b))
    tgt, int8 = r["config"]["target"], _is_int8(r["config"])
    timed = ["float32 input (int8 input's speed-up over it)"] if int8 else []
    table = md_table(["model", *timed, "input" + (" (int8)" if int8 else ""), "noise", "--target none", "--round-to 16",
                      f"--target {tgt}", "plan kept", "calibration (cold)", "target <= all (within noise)"], rows)
    return {"batch": batch, "table": table, "passed": "; ".join(f"{k}: {v}/{len(rows)}" for k, v in passed.items())}


def _is_int8(cfg: dict) -> bool:
    return cfg.get("precision") == "int8"


def _script_args(cfg: dict) -> str:
    """The options that rerun a latency-targets run (besides its models)."""
    if cfg["target"] == "ort-cuda":
        return " --target ort-cuda"
    if _is_int8(cfg):
        return f" --target {cfg['target']} --threads {cfg['threads']}"
    return ""


def _quantization_line(cfg: dict) -> str:
    """How an int8 run quantized the models it timed (empty for a float32 run)."""
    q = cfg.get("quantization")
    if not _is_int8(cfg) or not q:
        return ""
    per_channel = "per-channel" if q["per_channel"] else "per-tensor"
    return f"{q['format']}, {q['weights']} {per_channel} weights, {q['activations']} activations, {q['calibration']} ranges"


def latency_targets(run: str, r: dict) -> dict:
    """Is the pruned model faster on the runtime: --target against --target none and --round-to 16."""
    cfg, cli = r["config"], r.get("cli_extra_time_resnet50")
    return {"run": run, "target": cfg["target"], "machine": machine_line(r["machine"]), "script_args": _script_args(cfg),
            "int8": _quantization_line(cfg),
            "cuda": cfg["target"] == "ort-cuda", "dead_pct": int(cfg["dead_fraction"] * 100), "threads": cfg["threads"],
            "rounds": cfg["rounds"], "incomplete": r.get("complete") is False, "source": r.get("source", ""),
            "batches": [_latency_batch(r, batch) for batch in cfg["batch"]],
            "cli": {} if not cli else {"none": f"{cli['prune_none_s']:.2f}", "with_target": f"{cli['prune_target_s']:.2f}",
                                       "extra": f"{cli['extra_s']:.2f}", "cold": f"{cli['calibrate_cold_s']:.1f}"}}


def rbp_compile(run: str, r: dict) -> dict:
    """RBP's compiled step: one graph for every stage against one per stage."""
    c = r["config"]
    rows = [[x["label"], x["stages"], x["graphs_compiled"], " / ".join(f"{s:.1f}" for s in x["epoch_seconds"]),
             f"{sum(x['epoch_seconds']):.1f} s"] for x in r["rows"]]
    return {"run": run, "machine": machine_line(r["machine"]), "model": c["model"], "epochs": c["epochs"],
            "train_limit": c["train_limit"], "device": c["device"],
            "table": md_table(["gates", "stages", "graphs compiled", "seconds per epoch", "total"], rows)}


def _compile_cell(m: dict) -> str:
    """The compile times of the gates alone and of the whole step."""
    compile_s = [m.get(f"{v}_compile_s") for v in ("gates", "step")]
    return " / ".join("—" if c is None else f"{c:.0f} s" if c >= 10 else f"{c:.2g} s" for c in compile_s)


def _step_row(m: dict) -> list[str]:
    """A model's dense and SBP steps; in brackets the speed-up over eager gates, the fastest SBP step in bold."""
    sbp = {v: m.get(f"sbp_{v}_ms") for v in STEP_VARIANTS}
    measured = {v: t for v, t in sbp.items() if t is not None}
    best = min(measured, key=measured.get) if measured else None
    cells = [m["model"], ms(m.get("dense_ms")), ms(m.get("dense_step_compiled_ms"))]
    for v, t in sbp.items():
        cell = ms(t)
        if t is not None and v != "eager" and sbp["eager"] is not None:
            cell += f" ({sbp['eager'] / t:.1f}x)"
        cells.append(f"**{cell}**" if v == best and len(measured) > 1 else cell)
    return cells + [_compile_cell(m)]


def sbp_step_time(run: str, r: dict) -> dict:
    """One SBP training step: eager gates, gates compiled, whole step compiled (a variant not run: "not measured")."""
    cfg = r["config"]
    table = md_table(["model", "dense step (eager)", "dense step (compiled)", *STEP_VARIANTS.values(),
                      "compile time (gates / step)"], [_step_row(m) for m in r["models"]])
    return {"run": run, "machine": machine_line(r["machine"]), "device": cfg["device"], "steps": cfg["steps"],
            "batch": cfg["batch"], "step": cfg["step"], "note": cfg.get("note", ""), "table": table}


def subnormals(run: str, r: dict) -> dict:
    """What subnormal weights cost on ORT CPU, committed against flushed."""
    rows = []
    for m in r["models"]:
        cells = [m["model"], f"{m['subnormal_weights']} of {m['float_weights']}"]
        for b in ("batch1", "batch64"):
            c, f = m[b]["committed"]["median_ms"], m[b]["flushed"]["median_ms"]
            cells.append(f"{c:.4g} -> {f:.4g} ms ({c / f:.2f}x)")
        rows.append(cells)
    return {"run": run, "machine": machine_line(r["machine"]), "threads": r["config"]["threads"], "rounds": r["config"]["rounds"],
            "table": md_table(["pruned model", "subnormal weights", "batch 1: committed -> flushed", "batch 64"], rows)}


def _small_cifar(cfg: dict) -> dict:
    """The setting the small CIFAR benchmarks share: the net, its width and the images."""
    return {"model": cfg["model"], "width": cfg["width"], "train_images": cfg["train_images"], "test_images": cfg["test_images"],
            "dense": cfg["dense"]}


def bn_recalibration(run: str, r: dict) -> dict:
    """BatchNorm statistics after Bayesian training, as trained and re-estimated."""
    cfg, res = r["config"], r["result"]
    table = md_table(["dense", "SBP, training's statistics", "SBP, statistics re-estimated", "channels kept", "BatchNorms"],
                     [[f"{res['dense_accuracy']:.1%}", f"{res['sbp_accuracy_training_statistics']:.1%}",
                       f"**{res['sbp_accuracy_recalibrated']:.1%}**", f"{res['kept_fraction']:.1%}",
                       res["batchnorms_recalibrated"]]])
    return {"run": run, "machine": machine_line(r["machine"]), **_small_cifar(cfg), "sbp": cfg["sbp"],
            "kl_scale": f"{cfg['kl_scale']:g}", "device": cfg.get("device", "cpu"), "table": table}


def sbp_weight_lr(run: str, r: dict) -> dict:
    """SBP's weight learning rate against Torch-Pruning at the same MACs."""
    cfg = r["config"]
    rows = [[f"{row['sbp_weight_lr']:g}", str(row.get("finetune_epochs", 0)), f"{row['kept_fraction']:.1%}",
             f"{row['macs_reduction']:.2f}x", f"**{row['sbp_accuracy']:.1%}**",
             f"{row['torch_pruning_accuracy']:.1%} ({row['torch_pruning_macs_reduction']:.2f}x)"] for row in r["rows"]]
    table = md_table(["SBP weights' lr", "of which fine-tuned (K)", "channels kept", "MACs reduction", "SBP test accuracy",
                      "Torch-Pruning (its MACs reduction)"], rows)
    return {"run": run, "machine": machine_line(r["machine"]), **_small_cifar(cfg), "sbp": cfg["sbp"],
            "dense_accuracy": f"{r['dense_accuracy']:.1%}", "kl_scale": f"{cfg['kl_scale']:g}",
            "finetune": cfg.get("finetune", ""), "torch_pruning": cfg["torch_pruning"], "table": table}


def tvbi_batchnorm(run: str, r: dict) -> dict:
    """Turbo-VBI's prior on a layer followed by BatchNorm: raw weights against BatchNorm-folded ones."""
    rows = []
    for row in r["rows"]:
        if row["variant"] == "dense":
            rows.append(["dense", "-", "-", "-", f"{row['test_accuracy']:.1%}"])
            continue
        rows.append([row["variant"], f"{row['train_accuracy_last_epoch']:.1%}", f"{row['kept_fraction']:.1%}",
                     f"{row['smallest_row_norm_ratio']:.3g}", f"**{row['test_accuracy']:.1%}**"])
    table = md_table(["Turbo-VBI", "training accuracy, last epoch", "channels kept", "row norm after / before",
                      "test accuracy"], rows)
    return {"run": run, "machine": machine_line(r["machine"]), **_small_cifar(r["config"]),
            "turbo_vbi": r["config"]["turbo_vbi"], "table": table}


DEPLOY_VARIANTS = ("dense fp32", "dense int8", "pruned fp32", "pruned int8", "pruned fp32, --target",
                   "pruned int8, --target")


def _deploy_row(label: str, variant: str, net: dict) -> list[str]:
    """One variant of a net: size, latency per setting and batch (speed-up over dense fp32), errors, realisation."""
    cells = [label, variant, f"{net['sizes'][variant] / 1e3:.0f} kB"]
    for timings in net["latency_ms"].values():
        for batch in ("1", "64"):
            t = timings[batch]
            ms_here, dense = t[variant]["median_ms"], t["dense fp32"]["median_ms"]
            cells.append(f"{ms_here:.3g} ({dense / ms_here:.2f}x)")
    cells += [f"{100 * net['errors']['ort'][variant]:.2f}", f"{100 * net['errors']['openvino'][variant]:.2f}"]
    first = next(iter(net["latency_ms"].values()))["64"]
    macs = net["macs"]["pruned" if variant.startswith("pruned") else "dense"]
    speedup = first["dense fp32"]["median_ms"] / first[variant]["median_ms"]
    cells.append(f"{speedup / (net['macs']['dense'] / macs):.2f}")
    return cells


def _against(timing: dict, *others: dict) -> str:
    """'yes' when ``timing``'s median is below every other's first quartile, 'no' when above one's third quartile,
    else 'within noise' (inside an interquartile range)."""
    if all(timing["median_ms"] < o["p25_ms"] for o in others):
        return "yes"
    if any(timing["median_ms"] > o["p75_ms"] for o in others):
        return "no"
    return "within noise (inside the other's interquartile range)"


def _deploy_checks(label: str, net: dict) -> str:
    """The issue's goals for one net, each with its numbers."""
    err, size = net["errors"]["ort"], net["sizes"]
    first = next(iter(net["latency_ms"].values()))
    b64, b1 = first["64"], first["1"]
    gap = 100 * (err["pruned int8"] - err["pruned fp32"])
    faster = {b: _against(t["pruned int8"], t["pruned fp32"], t["dense int8"]) for b, t in (("64", b64), ("1", b1))}
    kept = net["deploy"]["pruned int8 ort"]["layers_kept_float"]
    when = f" (measured {net['measured']})" if "measured" in net else ""
    target = f"; `--target` kept '{net['target']['accepted']}'" if "target" in net else ""
    return (f"{label}{when}: pruned int8 minus pruned fp32 error {gap:+.2f} points; file {size['dense int8'] / size['pruned int8']:.2f}x "
            f"smaller than dense int8 (parameters, fp32 files: {size['dense fp32'] / size['pruned fp32']:.2f}x); "
            f"pruned int8 faster than both pruned fp32 and dense int8 at 1 thread: batch 64 "
            f"{faster['64']}, batch 1 {faster['1']}; layers ORT keeps in float32 (measured slower in int8 at 1 thread): "
            + _layer_names(kept) + target + _int8_target_checks(net, b64, b1))


def _layer_names(names: list[str]) -> str:
    """Layer names in code quotes, or 'none'."""
    return ", ".join(f"`{k}`" for k in names) if names else "none"


def _int8_target_checks(net: dict, b64: dict, b1: dict) -> str:
    """The int8 row after `--target ort-cpu-int8`: against pruned fp32 and dense int8, and against the fastest
    float32 form (`--target ort-cpu`)."""
    variant = "pruned int8, --target"
    if variant not in b64:
        return ""
    gap = 100 * (net["errors"]["ort"][variant] - net["errors"]["ort"]["pruned fp32"])
    kept = net["deploy"][f"{variant} ort"]["layers_kept_float"]
    return (f"; after `--target ort-cpu-int8` ('{net['int8_target']['accepted']}', layers kept float32 at batch 64: "
            + _layer_names(kept)
            + f"): error {gap:+.2f} points against pruned fp32; faster than both pruned fp32 and dense int8: batch 64 "
            f"{_against(b64[variant], b64['pruned fp32'], b64['dense int8'])}, batch 1 "
            f"{_against(b1[variant], b1['pruned fp32'], b1['dense int8'])}; faster than pruned fp32 after `--target "
            f"ort-cpu`: batch 64 {_against(b64[variant], b64['pruned fp32, --target'])}, batch 1 "
            f"{_against(b1[variant], b1['pruned fp32, --target'])}")


def deploy(run: str, r: dict) -> dict:
    """Dense and pruned, float32 and int8, on ORT CPU and OpenVINO CPU, side by side per net."""
    settings = next(iter(r["nets"].values()))["latency_ms"]
    head = ["net", "model", "file"] + [f"{s}, b{b}: ms (x dense fp32)" for s in settings for b in (1, 64)]
    head += ["error % (ORT)", "error % (OpenVINO)", "realisation (ORT 1 thread b64)"]
    rows = [_deploy_row(n["label"], v, n) for n in r["nets"].values() for v in DEPLOY_VARIANTS if v in n["sizes"]]
    checks = [_deploy_checks(n["label"], n) for n in r["nets"].values()]
    return {"run": run, "machine": machine_line(r["machine"]), "table": md_table(head, rows),
            "checks": "\n".join(f"- {c}" for c in checks), "min_agreement": f"{r['config']['min_agreement']:g}",
            "rounds": r["config"]["rounds"], "calibration_samples": r["config"]["calibration_samples"]}


def gather_forms(run: str, r: dict) -> dict:
    """The pruned LeNet-500-300's read of its kept pixels in each exact form, against dense, at 1 thread."""
    batches = [str(b) for b in r["config"]["batches"]]
    forms = list(r["batches"][batches[0]])
    rows = []
    for form in forms:
        cells = [form]
        for b in batches:
            at, dense = r["batches"][b][form], r["batches"][b]["dense"]
            lo, hi = at["us_quartiles"]
            read = at["kernel_us"].get("other", 0.0)
            cells.append(f"{at['us']:.1f} [{lo:.1f}-{hi:.1f}] ({dense['us'] / at['us']:.2f}x), {read:.0f} / {at['kernel_us']['fc1']:.0f}")
        rows.append(cells)
    head = ["form"] + [f"batch {b}: us [quartiles] (x dense), read / fc1 kernel us" for b in batches]
    reads = r["reads"]
    return {"run": run, "machine": machine_line(r["machine"]), "rounds": r["config"]["rounds"],
            "kept": reads["kept"], "pixels": reads["pixels"], "covering_range": reads["covering_range"],
            "bounding_box": reads["bounding_box"], "table": md_table(head, rows)}


# The experiments' folders in the store and the function giving each run's values
SECTIONS = {"prune-resnet50": prune_resnet50, "latency-targets": latency_targets, "rbp-compile": rbp_compile,
            "sbp-step-time": sbp_step_time, "subnormals": subnormals, "bn-recalibration": bn_recalibration,
            "sbp-weight-lr": sbp_weight_lr, "tvbi-batchnorm": tvbi_batchnorm, "deploy": deploy,
            "layer-realisation": layer_realisation, "gather-forms": gather_forms,
            "resnet18-dataloader": resnet18_dataloader, "user-architectures": user_architectures,
            "vit-heads": vit_heads, "prune-at-scale": prune_at_scale}
