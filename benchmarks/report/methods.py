"""SBP, RBP and Turbo-VBI side by side on the nets trained with more than one of them, and how each row was trained."""

from __future__ import annotations

import re

from benchmarks.report.markdown import md_table, widths
from benchmarks.report.runs import METHOD_NAMES, Run, is_variant, kl_label, net_name, setting, speedup_cells


def _changed(r: dict) -> bool:
    """A run with changed gate constants, a tempered ELBO or fine-tuning epochs."""
    cfg = r["config"]
    return bool(setting(cfg, "gate_options")) or kl_label(cfg) is not None or bool(setting(cfg, "finetune_epochs"))


def same_budget(rs: list[dict]) -> list[dict]:
    """One row per method, at the epochs most methods of this net were trained for; then the changed runs there."""
    epochs = [r["config"]["epochs"] for r in rs]
    common = max(set(epochs), key=lambda e: (len({r["method"] for r in rs if r["config"]["epochs"] == e}), e))
    picked: dict[str, dict] = {}
    for r in rs:
        if _changed(r):
            continue  # a method with changed constants: listed beside its default run, below
        if r["method"] not in picked or (r["config"]["epochs"] == common) > (picked[r["method"]]["config"]["epochs"] == common):
            picked[r["method"]] = r
    extra = [r for r in rs if _changed(r) and r["config"]["epochs"] == common]
    return list(picked.values()) + extra


def agreement_cell(r: dict) -> str:
    """Share of test images on which the shipped ONNX model predicts what the wrapped net predicts in evaluation
    mode, with the wrapped net's error ('not recorded' for runs trained before the check)."""
    agree = r.get("agreement_with_wrapped", {}).get("pruned")
    if agree is None:
        return "not recorded"
    return f"{100 * agree:.2f} % (wrapped {r['error_pct']['wrapped_torch']:.2f} % error)"


def method_label(r: dict) -> str:
    """The method and what its run changed from the method's defaults; in bold, the script's recipe."""
    cfg = r["config"]
    settings = [f"{k} {v}" for k, v in setting(cfg, "gate_options").items()]
    lr = re.search(r"Adam lr ([0-9.e+-]+)", cfg.get("optimizer", ""))
    settings += [f"weights at lr {float(lr.group(1)):g}"] if lr and float(lr.group(1)) != 1e-3 else []
    settings += [kl_label(cfg)] if kl_label(cfg) else []
    settings += [f"last {cfg['finetune_epochs']} fine-tuning"] if setting(cfg, "finetune_epochs") else []
    settings += ["schedule restarted per stage"] if setting(cfg, "lr_restarts") == "stage" else []
    name = METHOD_NAMES[r["method"]] + (" (" + ", ".join(settings) + ")" if settings else "")
    return name if is_variant(r) else f"**{name}**, the script's recipe"  # not a variant: the run in paper_table.RUNS


def methods_table(results: list[Run]) -> str:
    """SBP, RBP and Turbo-VBI side by side on every net trained with more than one of them, same epochs where
    a run exists at the same budget."""
    by_net: dict[str, list[dict]] = {}
    for _, r in results:
        by_net.setdefault(net_name(r["config"]), []).append(r)
    rows = []
    for net, rs in by_net.items():
        rs = same_budget(rs)
        if len({r["method"] for r in rs}) < 2:  # a net trained with SBP alone belongs to the tables above
            continue
        for r in sorted(rs, key=lambda r: (is_variant(r), list(METHOD_NAMES).index(r["method"]))):
            err, macs = r["error_pct"], r["macs"]
            cpu_s, gpu_s = speedup_cells(r, "pruned")
            seconds = r.get("stage_times_s", {}).get(f"{r['method']}_training_s")
            rows.append([net, method_label(r), f"{err['dense']:.2f} -> **{err['pruned']:.2f}**",
                         widths(r["units"]["pruned"]), f"{macs['dense'] / macs['pruned']:.2f}x",
                         f"{r['params']['dense'] / r['params']['pruned']:.2f}x", cpu_s, gpu_s,
                         f"{r['config']['epochs']} ({seconds:.0f} s)" if seconds else str(r["config"]["epochs"]),
                         agreement_cell(r)])
    head = ["net / data", "method", "test error % dense -> pruned", "units kept", "MAC reduction", "parameter reduction",
            "ORT CPU speed-up b1 / b64", "ORT CUDA speed-up b1 / b256", "Bayesian epochs (time)",
            "pruned ONNX predicts as the wrapped net"]
    return md_table(head, rows)


def _script_default(run: str, r: dict) -> int | None:
    """The Bayesian epochs paper_table.py trains the run's recipe for (None for a run RUNS no longer names)."""
    from benchmarks.paper_table import RUNS

    cfg = r["config"]
    suffix = "-" + r["method"].replace("-", "") + (f"-{cfg['tag']}" if cfg.get("tag") else "")
    name = run.removesuffix(suffix)
    return RUNS[name].recipe_for(r["method"]).get("epochs", RUNS[name].epochs) if name in RUNS else None


def _dense_phrase(cfg: dict) -> str:
    """Where the run's dense net came from."""
    if cfg.get("dense"):
        return f"dense net {cfg['dense']}"
    return "pretrained checkpoint" if cfg.get("pretrained") else f"{cfg.get('pretrain_epochs', '?')} dense epochs"


def schedule_note(run: str, r: dict) -> dict:
    """Where a row was trained and for how long, for the template's list; flags schedules cut below the script's
    default."""
    cfg, where, b64 = r["config"], r["config"].get("trained_on") or {}, r.get("shipped_batch64")
    default = _script_default(run, r)
    return {
        "run": run, "dense": _dense_phrase(cfg), "epochs": cfg["epochs"], "kl": kl_label(cfg) or "",
        "finetune": setting(cfg, "finetune_epochs"), "default": default if default and cfg["epochs"] < default else "",
        "where": where.get("gpu") or where.get("device", "?"),
        "times": ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s" for k, v in r.get("stage_times_s", {}).items()),
        "cpu": r["machine"].get("cpu", "?"), "cores": r["machine"].get("cpu_count", "?"),
        "note": cfg.get("note") or "", "cuda_note": cfg.get("cuda_note") or "",
        "b64": {} if not b64 else {"units": widths(b64["units"]), "macs": f"{r['macs']['dense'] / b64['macs']:.2f}x",
                                   "error": f"{b64['error_pct']:.2f}"}}
