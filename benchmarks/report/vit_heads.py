"""The "Attention heads" section: a small ViT on CIFAR-10, SBP over heads and FFN neurons against Torch-Pruning's
head and neuron pruning (benchmarks/vit_heads.py)."""

from __future__ import annotations

from benchmarks.report.markdown import machine_line, md_table
from onnxprune.table import human

MODELS = ("dense", "sbp", "torch_pruning")


def _row(r: dict, row: dict, dense: dict) -> list[str]:
    """One model: error, MACs (reduction), parameters, heads and MLP neurons per block, latency with speed-ups."""
    def timed(value: float, base: float) -> str:
        return f"{value:.3g} ms" + ("" if row["model"] == "dense" else f" ({base / value:.2f}x)")

    macs = human(row["macs"]) + ("" if row["model"] == "dense" else f" ({dense['macs'] / row['macs']:.2f}x fewer)")
    cells = [row["label"], f"{row['error_pct']:.2f}", macs, human(row["params"]), "-".join(map(str, row["heads"])),
             "-".join(map(str, row["mlp"])), timed(row["cpu_b1_ms"], dense["cpu_b1_ms"]),
             timed(row["cpu_b64_ms"], dense["cpu_b64_ms"])]
    if row.get("cuda_b1_ms") is not None:
        cells += [timed(row["cuda_b1_ms"], dense["cuda_b1_ms"]), timed(row["cuda_b256_ms"], dense["cuda_b256_ms"])]
    return cells


def _search_line(tp: dict, rule: str) -> str:
    """Where Torch-Pruning's uniform ratio lands around SBP's MACs (the nearest reachable counts each side), and
    which one the search's rule took."""
    target, taken = tp["target_macs"], tp["macs"]
    reached = sorted({t["macs"] for t in tp["tried"]})
    below = max((m for m in reached if m <= target), default=None)
    above = min((m for m in reached if m > target), default=None)
    parts = [f"SBP's model has {human(target)} MACs"]
    if below is not None:
        parts.append(f"the nearest count Torch-Pruning's ratio reached at or below it is {human(below)} "
                     f"({100 * (below / target - 1):+.1f} %)")
    if above is not None:
        parts.append(f"the nearest above it {human(above)} ({100 * (above / target - 1):+.1f} %)")
    line = "; ".join(parts) + (f". The `{rule}` rule took {human(taken)} ({100 * (taken / target - 1):+.1f} %): whole heads "
                               "move the count in steps of a sixth of the attention when one ratio prunes every block")
    if abs(taken / target - 1) > 0.05:
        line += ", so the two are not at equal MACs"
    return line


def _match_line(tp: dict, rows: dict) -> str:
    """The ``match`` rule: Torch-Pruning's heads (SBP's count, even over the blocks) and how close its MACs came."""
    target, taken = tp["target_macs"], tp["macs"]
    sbp_heads, tp_heads = sum(rows["sbp"]["heads"]), sum(rows["torch_pruning"]["heads"])
    return (f"SBP kept {sbp_heads} heads in all, so Torch-Pruning removed {tp['heads_removed_per_block']} of every "
            f"block's heads ({tp_heads} kept: the nearest even spread) and its MLP ratio, bisected, came to "
            f"{tp['ratio']:.4f}: {human(taken)} MACs against SBP's {human(target)} "
            f"({100 * (taken / target - 1):+.2f} %), the same MACs within a few neurons")


def vit_heads(run: str, r: dict) -> dict:
    """The values of one run: setting, recipes and the table."""
    c, times = r["config"], r["stage_times_s"]
    rows = {row["model"]: row for row in r["rows"]}
    head = ["model", "test error % (ORT)", "MACs", "params", "heads per block", "MLP neurons per block",
            "ORT CPU b1, 1 thread", "ORT CPU b64, 1 thread"]
    cuda = r.get("latency_cuda") or {}
    if cuda and "skipped" not in cuda:
        head += ["ORT CUDA b1", "ORT CUDA b256"]
    table = md_table(head, [_row(r, rows[m], rows["dense"]) for m in MODELS if m in rows])
    agreement = r["sbp"].get("agreement_pruned_onnx_with_torch")
    m = c["model"]
    return {"run": run, "machine": machine_line(r["machine"]), "device": c["device"], "dim": m["dim"],
            "depth": m["depth"], "heads": m["heads"], "mlp": m["mlp"], "dense_recipe": c["dense_recipe"],
            "sbp_recipe": c["sbp_recipe"], "tp_recipe": c["tp_recipe"], "target": c["target"],
            "search": (_match_line(r["torch_pruning"], rows) if c["tp_rule"] == "match"
                       else _search_line(r["torch_pruning"], c["tp_rule"])), "rounds": c["rounds"],
            "agreement": "not measured" if agreement is None else f"{agreement:.2%}",
            "minutes": f"{times['total'] / 60:.1f}", "exporter": c["exporter"], "table": table}
