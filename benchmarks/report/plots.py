"""The report's figures: error against MACs per net, and SBP against Torch-Pruning seed by seed."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report.runs import METHOD_NAMES, Run, net_name
from benchmarks.report.seeds import reduction_range, seed_comparisons

METHOD_STYLE = {"sbp": ("*", "#2e86de"), "rbp": ("D", "#10ac84"), "turbo-vbi": ("^", "#ff9f43")}
Point = tuple[float, float, str, str]  # MACs, error %, marker ("*o", "oo": hollow), colour


def _pyplot():
    """matplotlib.pyplot, drawing to files (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _net_points(rs: list[dict], variant: Run | None) -> dict[str, Point]:
    """The points of one net's panel by legend label: its dense nets, each method's run, Torch-Pruning, a variant."""
    points: dict[str, Point] = {}
    dense: dict[tuple[int, float], list[str]] = {}  # runs of one net trained in different leases start from different dense nets
    for r in rs:
        dense.setdefault((r["macs"]["dense"], round(r["error_pct"]["dense"], 2)), []).append(METHOD_NAMES[r["method"]])
    for i, ((m, e), methods) in enumerate(dense.items()):
        label = "dense" if len(dense) == 1 else f"dense net of the {', '.join(methods)} run{'s' if len(methods) > 1 else ''}"
        points[label] = (m, e, "o" if i == 0 else "oo", "#8395a7")  # the second dense net hollow
    for r in rs:
        marker, color = METHOD_STYLE[r["method"]]
        points[f"{METHOD_NAMES[r['method']]} + onnxprune"] = (r["macs"]["pruned"], r["error_pct"]["pruned"], marker, color)
        if "torch_pruning" in r["macs"]:
            points["Torch-Pruning (same MACs as SBP)"] = (r["macs"]["torch_pruning"], r["error_pct"]["torch_pruning"], "s", "#ee5253")
    if variant is not None and variant[1] not in rs:
        run, r = variant
        points[f"SBP variant {r['config'].get('tag')} (best within the paper's error)"] = (
            r["macs"]["pruned"], r["error_pct"]["pruned"], "*o", "#2e86de")
    return points


def _draw_panel(ax, net: str, points: dict[str, Point]) -> None:
    """One net's scatter of test error against MACs (log scale where they span more than 20x)."""
    from matplotlib.ticker import FuncFormatter

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
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_title(net, fontsize=9)
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel("test error %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_error_vs_macs(results: list[Run], path: Path, extra: dict[str, Run] | None = None) -> None:
    """One panel per net: test error against MACs for dense, every Bayesian method and Torch-Pruning; ``extra``
    adds, per net, one more SBP run (a variant), drawn as a hollow star."""
    plt = _pyplot()
    by_net: dict[str, list[dict]] = {}
    for _, r in results:
        by_net.setdefault(net_name(r["config"]), []).append(r)
    n = len(by_net)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    for ax, (net, rs) in zip(axes.flat, by_net.items()):
        _draw_panel(ax, net, _net_points(rs, (extra or {}).get(net)))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_seeds(results: list[Run], path: Path) -> bool:
    """One panel per net and SBP model with several seeds: each seed's SBP and Torch-Pruning errors joined by a
    line, the means dashed. False (and no file) when no net has several seeds."""
    panels = seed_comparisons(results)
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
    for ax, (net, model, ours_key, theirs_key, seeds) in zip(axes.flat, panels):
        x = [r["config"]["seed"] for _, r in seeds]
        ours = [r["error_pct"][ours_key] for _, r in seeds]
        tp = [r["error_pct"][theirs_key] for _, r in seeds]
        for xi, a, b in zip(x, ours, tp):
            ax.plot([xi, xi], [a, b], color="#c8d6e5", linewidth=2, zorder=1)
        ours_x, tp_x = (reduction_range([r["macs"]["dense"] / r["macs"][k] for _, r in seeds]) for k in (ours_key, theirs_key))
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
