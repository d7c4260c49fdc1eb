"""The SBP paper's table: our rows beside the paper's, the paper's bar per net, the variants, the CPU rebuilds."""

from __future__ import annotations

from benchmarks.report.markdown import md_table, times, widths
from benchmarks.report.runs import (
    Run,
    best_cpu,
    best_within_paper,
    epochs_cell,
    is_variant,
    kl_label,
    mac_cell,
    net_name,
    reduction,
    speedup,
    speedup_cells,
    units_cell,
    within_paper,
)


def paper_table(results: list[Run]) -> str:
    """The SBP rows: ours beside the paper's numbers, with the Torch-Pruning baseline at the same MACs."""
    rows = []
    for _, r in results:
        cfg, paper, err = r["config"], r.get("paper", {}), r["error_pct"]
        paper_err = f"{paper['error']}" if "error" in paper else "-"
        if "dense_error" in paper:
            paper_err += f" (dense {paper['dense_error']})"
        cpu_s, gpu_s = speedup_cells(r, "pruned")
        rows.append([
            net_name(cfg) + (f" ({kl_label(cfg)})" if kl_label(cfg) else ""), f"{err['dense']:.2f} -> **{err['pruned']:.2f}**",
            paper_err,
            f"{err['torch_pruning']:.2f}" if "torch_pruning" in err else "-",
            units_cell(r), paper.get("units", "-"), mac_cell(r), times(paper.get("flops_reduction")),
            cpu_s, times(paper.get("cpu_speedup")), gpu_s, times(paper.get("gpu_speedup")),
        ])
    head = ["net / data", "test error % dense -> SBP", "paper error %", "Torch-Pruning error % (same MACs)",
            "units kept (shipped)", "paper units", "MAC reduction (shipped)", "paper FLOPs red.", "ORT CPU speed-up b1 / b64",
            "paper CPU", "ORT CUDA speed-up b1 / b256", "paper GPU"]
    return md_table(head, rows)


def nearest_with_paper_speed(results: list[Run], net: str) -> str:
    """Of the net's SBP runs that reach the paper's CPU speed-up, the one with the lowest error ('-' if none)."""
    fast = [(run, r) for run, r in results if net_name(r["config"]) == net and r["method"] == "sbp"
            and "cpu_speedup" in r.get("paper", {}) and (best_cpu(r) or 0) >= r["paper"]["cpu_speedup"]]
    if not fast:
        return "-"
    run, r = min(fast, key=lambda item: item[1]["error_pct"]["pruned"])
    return f"`{run}`: {r['error_pct']['pruned']:.2f} %, {reduction(r):.2f}x, CPU {best_cpu(r):.2f}x"


def _scoreboard_row(results: list[Run], net: str, picked: Run) -> list[str]:
    """A net's best run within the paper's error against the paper's compression and CPU speed-up."""
    run, r = picked
    paper, cpu = r["paper"], r.get("latency_cpu", {})
    b1, b64 = speedup(cpu, "batch1", "pruned"), speedup(cpu, "batch64", "pruned")
    macs = reduction(r)
    misses = [what for what, short in (("FLOPs", "flops_reduction" in paper and macs < paper["flops_reduction"]),
                                       ("CPU speed-up", b1 is not None and max(b1, b64 or 0) < paper["cpu_speedup"])) if short]
    return [net, f"`{run}`", f"{r['error_pct']['pruned']:.2f} (<= {within_paper(r):.2f})",
            f"{macs:.2f}x", times(paper.get("flops_reduction")), f"{times(b1)} / {times(b64)}", times(paper["cpu_speedup"]),
            "meets the paper" if not misses else "short of the paper's " + " and ".join(misses),
            "-" if not misses else nearest_with_paper_speed(results, net)]


def scoreboard_table(results: list[Run]) -> str:
    """Per net of the paper, its best SBP run (any variant) whose error meets the paper's, against the paper's
    compression and CPU speed-up; where that run falls short, the most accurate run that has the paper's speed-up."""
    rows = []
    for net, picked in best_within_paper(results).items():
        if picked is not None:
            rows.append(_scoreboard_row(results, net, picked))
            continue
        rs = [r for _, r in results if net_name(r["config"]) == net and within_paper(r) is not None]
        rows.append([net, "-", f"<= {within_paper(rs[0]):.2f}", "no run meets the error", "", "", "", "",
                     nearest_with_paper_speed(results, net)])
    head = ["net / data", "best SBP run within the paper's error", "test error % (bound)", "MAC reduction", "paper FLOPs red.",
            "ORT CPU speed-up b1 / b64", "paper CPU", "verdict", "if short: most accurate run with the paper's CPU speed-up"]
    return md_table(head, rows)


def _planned_here_cell(r: dict) -> str:
    """The speed-ups of the widths `onnxprune prune` planned on the 2-core machine (their widths where not shipped)."""
    here = r.get("latency_cpu_planned_here")
    if not here:
        return "-"
    return " / ".join(f"{times(speedup(here, b, 'pruned'))}" + ("" if here[b]["units"] == r["units"]["pruned"]
                      else f" ({widths(here[b]['units'])})") for b in ("batch1", "batch64"))


def shapes_latency_table(results: list[Run]) -> str:
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
        own = r.get("latency_cpu", {})
        rows.append([f"`{run}`", f"{r['error_pct']['pruned']:.2f}", widths(r["units"]["pruned"]), *cells,
                     _planned_here_cell(r), f"{times(speedup(own, 'batch1', 'pruned'))} / {times(speedup(own, 'batch64', 'pruned'))}"])
    if not rows:
        return ""
    head = ["run", "test error %", "units kept (shipped)", "dense / pruned, batch 1", "dense / pruned, batch 64",
            "widths planned here: speed-up b1 / b64", "the run's own speed-up b1 / b64 (GPU host's CPU)"]
    return md_table(head, rows)


def shapes_machine(results: list[Run]) -> dict | None:
    """The machine the CIFAR models were rebuilt and timed on (None where no run was)."""
    return next((r["latency_cpu_shapes"]["machine"] for _, r in results if r.get("latency_cpu_shapes")), None)


def variants_table(results: list[Run]) -> str:
    """Every SBP run of each net that has tagged variants: how it was trained, and what it gave."""
    nets = {net_name(r["config"]) for _, r in results if is_variant(r) and r["method"] == "sbp"}
    rows = []
    for run, r in sorted(results, key=lambda x: (net_name(x[1]["config"]), x[1]["config"]["epochs"], x[0])):
        cfg = r["config"]
        if r["method"] != "sbp" or net_name(cfg) not in nets:
            continue
        err = r["error_pct"]
        cpu_s, gpu_s = speedup_cells(r, "pruned")
        rows.append([net_name(cfg), f"`{run}`", epochs_cell(cfg), cfg.get("optimizer", "-").replace("Adam lr 1e-3", "Adam"),
                     cfg.get("placement", "output"), cfg.get("noise", "example"),
                     "ELBO" + (f", **{kl_label(cfg)}**" if kl_label(cfg) else ""), f"{err['dense']:.2f} -> **{err['pruned']:.2f}**",
                     f"{err['torch_pruning']:.2f}" if "torch_pruning" in err else "-", units_cell(r), mac_cell(r), cpu_s, gpu_s])
    head = ["net / data", "run", "epochs", "optimizer", "gate placement", "noise draw", "loss", "test error % dense -> SBP",
            "Torch-Pruning error %", "units kept (shipped)", "MAC reduction (shipped)", "ORT CPU speed-up b1 / b64",
            "ORT CUDA speed-up b1 / b256"]
    return md_table(head, rows)
