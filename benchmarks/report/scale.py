"""The "Pruning at scale" section: `onnxprune prune` against `onnx.load` + `onnx.save` of the same external-data
model, wall time and peak RSS per size (benchmarks/prune_at_scale.py)."""

from __future__ import annotations

from benchmarks.report.markdown import machine_line, md_table


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def _row(s: dict) -> list[str]:
    """One size: the model, the baseline, the prune (with and without verification) and their ratios."""
    base, prune, quiet, r = s["baseline"], s["prune"], s["prune_no_verify"], s["ratios"]
    phases = "/".join(f"{prune['phases_s'].get(k, 0):.2f}" for k in ("load", "analysis+rewrite", "save", "verify"))
    return [s["size"], _mb(s["model_bytes"]), f"{base['wall_s']:.2f} s", _mb(base["peak_rss"]),
            f"{prune['wall_s']:.2f} s", _mb(prune["peak_rss"]), f"{r['prune_wall_over_baseline']:.2f}x",
            f"{r['prune_rss_over_baseline']:.2f}x", phases, f"{prune['uncovered_beyond_imports_s']:+.2f} s",
            f"{quiet['wall_s']:.2f} s / {_mb(quiet['peak_rss'])}",
            "yes" if prune["removed_every_dead_neuron"] else "**no**"]


def prune_at_scale(run: str, r: dict) -> dict:
    """The values of one run: its models and the table."""
    c = r["config"]
    head = ["size", "model", "load+save wall", "load+save peak RSS", "prune wall", "prune peak RSS", "wall ratio",
            "RSS ratio", "phases: load/analysis+rewrite/save/verify (s)", "outside the phases (beyond imports)",
            "prune --no-verify wall / RSS", "every dead neuron deleted"]
    return {"run": run, "machine": machine_line(r["machine"]), "blocks": c["blocks"], "ffn_ratio": c["ffn_ratio"],
            "dead": f"{c['dead_share']:.0%}", "dtype": c["dtype"], "table": md_table(head, [_row(s) for s in r["sizes"]])}
