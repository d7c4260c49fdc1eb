"""Plain-text tables and human-readable numbers for the command line."""

from __future__ import annotations

from collections.abc import Sequence

from onnxprune.cost import CostSummary


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """Columns padded to width; ``align`` has one 'l' or 'r' per column (numbers right by default)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for k, row in enumerate(cells):
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _arrow(a: int, b: int, fmt=str) -> str:
    return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"


def before_after_table(before: CostSummary, after: CostSummary, *, max_rows: int = 60) -> str:
    """Per layer: channels, parameters and MACs before -> after, then totals with ratios."""
    after_by_name = after.by_name()
    rows = []
    changed = [layer for layer in before.layers if layer.name in after_by_name]
    shown = changed if len(changed) <= max_rows else [
        layer for layer in changed if _differs(layer, after_by_name[layer.name])
    ][:max_rows]
    for b in shown:
        a = after_by_name[b.name]
        rows.append(
            [
                b.name,
                b.op,
                _arrow(b.in_channels, a.in_channels),
                _arrow(b.out_channels, a.out_channels),
                _arrow(b.params, a.params, human),
                _arrow(b.macs, a.macs, human),
            ]
        )
    hidden = len(changed) - len(shown)
    table = format_table(["layer", "op", "in ch", "out ch", "params", "MACs"], rows, "llrrrr")
    if hidden:
        table += f"\n({hidden} unchanged layer(s) not shown)"
    table += "\n\n" + totals_table(before, after)
    return table


def _differs(b, a) -> bool:
    return (b.in_channels, b.out_channels, b.params, b.macs) != (a.in_channels, a.out_channels, a.params, a.macs)


def totals_table(before: CostSummary, after: CostSummary) -> str:
    def ratio(x: int, y: int) -> str:
        return f"{x / y:.2f}x" if y else "-"

    rows = [
        ["parameters", human(before.params), human(after.params), ratio(before.params, after.params)],
        ["MACs", human(before.macs), human(after.macs), ratio(before.macs, after.macs)],
    ]
    return format_table(["total", "before", "after", "reduction"], rows)
