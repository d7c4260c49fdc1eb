"""Markdown tables and the number formats the report uses."""

from __future__ import annotations


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    """A Markdown table: a header row, the rule, one line per row."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    """"Measured on: CPU, N cores, GPU, versions, date" from a result's machine record."""
    parts = [m.get("cpu", "?"), f"{m.get('cpu_count', '?')} cores"]
    if m.get("avx512"):
        parts.append("AVX-512")
    if m.get("gpu"):
        parts.append(m["gpu"])
    parts += [f"onnxruntime {m.get('onnxruntime', '?')}", f"torch {m.get('torch', '?')}", m.get("date", "")]
    return "Measured on: " + ", ".join(p for p in parts if p)


def times(v: float | None, digits: int = 2) -> str:
    """A ratio as "1.23x" ("-" when not measured)."""
    return "-" if v is None else f"{v:.{digits}f}x"


def ms(v: float | None) -> str:
    """Milliseconds as "1.23 ms" ("not measured" when missing)."""
    return "not measured" if v is None else f"{v:.2f} ms"


def seconds(x: float) -> str:
    """Seconds as "1.23 s"."""
    return f"{x:.2f} s"


def widths(units: list[int]) -> str:
    """Layer widths as "3-10-115"."""
    return "-".join(str(u) for u in units)
