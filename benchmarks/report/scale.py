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
    if c.get("model") == "llama":
        script = ("python -m benchmarks.prune_at_scale --model llama --layers " + " ".join(map(str, c["layers"]))
                  + (" --rotary" if c["rotary"] else "") + (" --assume-finite" if _assume_finite(c) else "")
                  + (f" --cli-verify-max-layers {c['cli_verify_max_layers']}" if c["cli_verify_max_layers"] != 8 else "")
                  + (f" --tag {tag}" if (tag := run.removeprefix("prune-at-scale-llama").lstrip("-")) else ""))
        return {"run": run, "machine": machine_line(r["machine"]), "mlp": False, "llama": True, "script": script,
                "table": llama_table(r)}
    head = ["size", "model", "load+save wall", "load+save peak RSS", "prune wall", "prune peak RSS", "wall ratio",
            "RSS ratio", "phases: load/analysis+rewrite/save/verify (s)", "outside the phases (beyond imports)",
            "prune --no-verify wall / RSS", "every dead neuron deleted"]
    return {"run": run, "machine": machine_line(r["machine"]), "mlp": True, "llama": False, "blocks": c["blocks"],
            "ffn_ratio": c["ffn_ratio"],
            "dead": f"{c['dead_share']:.0%}", "dtype": c["dtype"], "table": md_table(head, [_row(s) for s in r["sizes"]])}


def _assume_finite(config: dict) -> bool:
    """True if the run pruned with --assume-finite."""
    return "--assume-finite" in config.get("command", "")


def _time_split(prune: dict) -> str:
    """Where a prune's time went: analysis+rewrite (of it, subnormal flushing and channel pruning) and save."""
    phases, passes = prune.get("phases_s", {}), prune.get("passes_s", {})
    return (f"{phases.get('analysis+rewrite', 0):.1f} s ({passes.get('flush-subnormals', 0):.1f} s, "
            f"{passes.get('prune-channels', 0):.1f} s) / {phases.get('save', 0):.1f} s")


def llama_table(r: dict) -> str:
    """A --model llama run: what the decoder is, then a row per number of layers."""
    c = r["config"]
    note = (f"**Llama-shaped decoder** ({c['hidden']} hidden, FFN {c['ffn']}, {c['heads']} query heads and "
            f"{c['kv_heads']} K/V heads of {c['head_dim']}, sequence {c['seq']}, fp16 weights, rotary embedding "
            f"{'on' if c['rotary'] else 'off'}; {c['norms']}). Dead per layer: one K/V head (V columns zero), "
            f"{c['dead_query_heads']} lone query head(s) (o_proj rows zero), {c['dead_ffn']:.0%} of the FFN neurons "
            "(a third each: up column, gate column, down row zero). The prune is timed with the CLI's block-wise "
            "verification (`--verify blocks`), without verification, and with the whole-model check (`--verify whole`)"
            f"{'; every run with `--assume-finite`' if _assume_finite(c) else ''}.")
    return note + "\n\n" + md_table(BLOCKS_HEAD, [_llama_blocks_row(s) for s in r["sizes"]])


BLOCKS_HEAD = ["layers", "model", "load+save wall", "load+save peak RSS", "prune --verify blocks wall / peak RSS",
               "wall ratio", "RSS ratio", "of it: analysis+rewrite (subnormals, channels) / save", "of it: verify",
               "blocks", "exact (worst relative error)",
               "prune --no-verify wall / RSS", "prune --verify whole", "deleted: K/V heads, query heads, "
               "FFN neurons (of the dead)"]


def _cli_cell(run: dict) -> str:
    """A prune's wall and peak RSS, or why there are none."""
    if "wall_s" in run:
        return f"{run['wall_s']:.1f} s / {_mb(run['peak_rss'])}"
    return "failed" + (" (out of memory)" if run.get("out_of_memory") else "") if "failed" in run else "not run"


def _llama_blocks_row(s: dict) -> list[str]:
    """One decoder size of a run with the CLI's block-wise verification."""
    base, blocks, r = s["baseline"], s["prune_verify_blocks"], s["ratios"]
    deleted, dead = s.get("deleted_units", {}).get("deleted"), s["dead_units"]
    if "wall_s" in blocks:
        c = blocks["verification"]
        measured = [_cli_cell(blocks), f"{r['prune_verify_blocks_wall_over_baseline']:.2f}x",
                    f"{r['prune_verify_blocks_rss_over_baseline']:.2f}x", _time_split(blocks),
                    f"{blocks['phases_s'].get('verify', 0):.1f} s",
                    str(c["blocks"]), ("yes" if c["ok"] else "**no**") + f" ({c['worst']['relative_error']:.1g})"]
    else:
        measured = [_cli_cell(blocks), "-", "-", "-", "-", "-", "-"]
    units = (f"{deleted['kv_heads']}/{dead['kv_heads']}, {deleted['query_heads']}/{dead['query_heads']}, "
             f"{deleted['ffn_neurons']}/{dead['ffn_neurons']}" if deleted else "-")
    return [str(s["layers"]), _mb(s["model_bytes"]), f"{base['wall_s']:.1f} s", _mb(base["peak_rss"]), *measured,
            _cli_cell(s["prune_no_verify"]), _cli_cell(s["prune"]), units]
