"""The "Users' architectures" section: torchvision, timm and Hugging Face models through wrap, training steps
and compress with each torch exporter (benchmarks/user_architectures.py)."""

from __future__ import annotations

from benchmarks.report.markdown import machine_line, md_table
from onnxprune.table import human


def _result(row: dict) -> str:
    """"exact, N.NNx fewer parameters", or the error (first line, shortened)."""
    if "error" in row:
        return "**failed**: " + row["error"].replace("|", "/")[:160]
    ratio = row["params_gated"] / row["params_pruned"] if row["params_pruned"] else float("inf")
    exact = row["max_abs_diff"] <= 1e-4 * max(1.0, row["scale"])
    return f"{'exact' if exact else '**not exact**'} (max diff {row['max_abs_diff']:.1e}), {ratio:.2f}x fewer parameters"


def user_architectures(run: str, r: dict) -> dict:
    """One row per architecture and exporter."""
    head = ["family", "architecture", "kind", "capture", "exporter", "gates (channels)", "parameters: gated -> pruned",
            "result"]
    rows = []
    for row in r["rows"]:
        gates = f"{row['gates']} ({row['channels']})" if "gates" in row else "-"
        params = f"{human(row['params_gated'])} -> {human(row['params_pruned'])}" if "params_pruned" in row else "-"
        rows.append([row["family"], row["name"], row["kind"], row.get("capture", "-"), row["exporter"], gates, params,
                     _result(row)])
    passed = [x for x in r["rows"] if "error" not in x and x["params_pruned"] < x["params_gated"]]
    names = {(x["family"], x["name"]) for x in passed}
    return {"run": run, "machine": machine_line(r["machine"]), "table": md_table(head, rows), "share": f"{r['rejected_share']:.0%}",
            "passed": len(names), "tried": len({(x["family"], x["name"]) for x in r["rows"]})}
