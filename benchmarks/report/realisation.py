"""The "Where LeNet5's MAC reduction goes at 1 thread" section: per-layer kernel times, the first layer's widths,
exact alternatives (benchmarks/layer_realisation.py)."""

from __future__ import annotations

from benchmarks.report.markdown import machine_line, md_table

SWEEP_SHOWN = ("1", "2", "3", "4", "8", "12", "15", "16", "17", "20")
NO_MACS = ("pooling", "reorders", "other")
SLOW_PARTS = ("conv1", "reorders", "pooling")  # what LeNet5's pruning removes little of


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _us(m: dict) -> str:
    """A model's unprofiled median and quartiles, in us."""
    low, high = m["ms_quartiles"]
    return f"{1000 * m['ms']:.0f} [{1000 * low:.0f}-{1000 * high:.0f}]"


def _layer_row(net: dict, layer: str) -> list[str]:
    """One layer of a net: MACs dense -> pruned, kernel us, share of the pruned model's kernel time, speed-up, realisation."""
    d, p = net["dense"], net["pruned"]
    du, pu = d["layer_us"].get(layer, 0.0), p["layer_us"].get(layer, 0.0)
    share = f"{pu / sum(p['layer_us'].values()):.0%}"
    if layer in NO_MACS:
        return [layer, "-", "-", f"{du:.0f}", f"{pu:.0f}", share, _ratio(du, pu), "-"]
    dm, pm = d["macs"][layer], p["macs"][layer]
    return [layer, f"{dm:,} -> {pm:,}", f"{dm / pm:.1f}x", f"{du:.0f}", f"{pu:.0f}", share, _ratio(du, pu),
            f"{(du / pu) / (dm / pm):.2f}"]


def _net_rows(net: dict) -> list[list[str]]:
    """A net's layers, its kernels summed, and the whole model timed without the profiler."""
    d, p = net["dense"], net["pruned"]
    layers = [k for k in d["macs"]] + [k for k in NO_MACS if k in d["layer_us"] or k in p["layer_us"]]
    rows = [[net["label"], *_layer_row(net, k)] for k in layers]
    dm, pm = sum(d["macs"].values()), sum(p["macs"].values())
    du, pu = sum(d["layer_us"].values()), sum(p["layer_us"].values())
    rows.append([net["label"], "all kernels", f"{dm:,} -> {pm:,}", f"{dm / pm:.1f}x", f"{du:.0f}", f"{pu:.0f}", "100%",
                 _ratio(du, pu), f"{(du / pu) / (dm / pm):.2f}"])
    dw, pw = 1000 * d["ms"], 1000 * p["ms"]
    rows.append([net["label"], "**whole model, unprofiled** (median [quartiles])", "", f"{dm / pm:.1f}x", _us(d), _us(p), "",
                 f"**{dw / pw:.2f}x**", f"**{(dw / pw) / (dm / pm):.2f}**"])
    return rows


def _batch(batch: str, b: dict) -> dict:
    """One batch size: the per-layer table of both nets and the figures the prose quotes."""
    head = ["net", "layer", "MACs per image, dense -> pruned", "MAC reduction", "dense us", "pruned us",
            "share of pruned kernel time", "speed-up", "realisation"]
    rows = [row for net in b["nets"].values() for row in _net_rows(net)]
    lenet5 = b["nets"]["lenet5"]
    shares = {w: sum(lenet5[w]["layer_us"].get(k, 0.0) for k in SLOW_PARTS) / sum(lenet5[w]["layer_us"].values())
              for w in ("dense", "pruned")}
    d, p = lenet5["dense"], lenet5["pruned"]
    mac = sum(d["macs"].values()) / sum(p["macs"].values())
    kernels = sum(d["layer_us"].values()) / sum(p["layer_us"].values())
    again = b["alternatives"]["variants"]["dense"]["ms"] / b["alternatives"]["variants"]["pruned"]["ms"]
    return {"batch": batch, "table": md_table(head, rows), "realisation": f"{d['ms'] / p['ms'] / mac:.2f}",
            "speedup": f"{d['ms'] / p['ms']:.2f}", "mac_reduction": f"{mac:.1f}", "kernel_speedup": f"{kernels:.2f}",
            "kernel_realisation": f"{kernels / mac:.2f}", "again_speedup": f"{again:.2f}", "again_realisation": f"{again / mac:.2f}",
            "profiler_us": f"{1000 * (p['ms_profiled'] - p['ms']):.0f}",
            "slow_share": f"{shares['pruned']:.0%}", "slow_share_dense": f"{shares['dense']:.0%}",
            "conv1_speedup": _ratio(d["layer_us"]["conv1"], p["layer_us"]["conv1"]),
            "conv1_macs": f"{d['macs']['conv1'] / p['macs']['conv1']:.1f}x"}


def _sweep_cell(cell: dict) -> str:
    """The first layer's median ms, and its kernels (conv / reorders / pooling, us)."""
    us = cell["layer_us"]
    return f"{cell['ms']:.3f} ({us.get('conv1', 0):.0f} / {us.get('reorders', 0):.0f} / {us.get('pooling', 0):.0f})"


def _sweep_table(batches: dict) -> str:
    head = ["conv1 width"] + [f"b{b}, {layout}: ms (conv / reorders / pooling us)" for b in batches
                              for layout in ("NCHWc", "no NCHWc")]
    rows = [[w] + [_sweep_cell(b["conv1_sweep_ms"][layout][w]) for b in batches.values() for layout in ("nchwc", "plain")]
            for w in SWEEP_SHOWN]
    return md_table(head, rows)


def _label(k: str, batches: dict) -> str:
    """A variant's name and MACs per image (the widths --target chose and their MACs, per batch)."""
    if k != "onnxprune --target":
        return f"{k} ({sum(next(iter(batches.values()))['alternatives']['variants'][k]['macs'].values()):,} MACs)"
    chosen = {b: x["alternatives"]["target_choice"] for b, x in batches.items()}
    return k + " (" + "; ".join(f"b{b}: {_accepted(c)}{'-'.join(map(str, c['widths'].values()))}, {c['macs']:,} MACs"
                                for b, c in chosen.items()) + ")"


def _accepted(choice: dict) -> str:
    """The attempt --target kept, where the run says (runs before the phase form do not)."""
    return f"'{choice['accepted']}', " if "accepted" in choice else ""


def _alternatives_table(batches: dict) -> str:
    """Each variant per batch: median ms, speed-up over dense, realisation of the pruned model's MAC reduction."""
    head = ["variant"] + [f"b{b}: us (x dense), realisation" for b in batches] + ["largest output difference from pruned"]
    first = next(iter(batches.values()))["alternatives"]["variants"]
    mac_reduction = sum(first["dense"]["macs"].values()) / sum(first["pruned"]["macs"].values())
    rows = []
    for k in first:
        cells = [_label(k, batches)]
        for b in batches.values():
            v = b["alternatives"]["variants"]
            speedup = v["dense"]["ms"] / v[k]["ms"]
            cells.append(f"{1000 * v[k]['ms']:.0f} ({speedup:.2f}x)" + ("" if k == "dense" else f", {speedup / mac_reduction:.2f}"))
        diff, against = first[k]["max_abs_diff"], first[k].get("compared_with", "pruned")
        shown = "- (trained apart)" if diff is None else f"{diff:.1e}" + ("" if against == "pruned" else f" (from {against})")
        rows.append(cells + [shown])
    return md_table(head, rows)


def _fastest_alternative(b: dict) -> str:
    """The fastest exact variant other than the pruned model: its time over the pruned model's, against the noise."""
    v = b["alternatives"]["variants"]
    exact = [k for k in v if k not in ("dense", "pruned") and v[k].get("compared_with", "pruned") == "pruned"]
    best = min(exact, key=lambda k: v[k]["ms"])
    low, high = v["pruned"]["ms_quartiles"]
    inside = "inside" if low <= v[best]["ms"] <= high else "outside"
    return f"{best} at {v[best]['ms'] / v['pruned']['ms']:.2f}x ({inside} the pruned model's interquartile range)"


def layer_realisation(run: str, r: dict) -> dict:
    """The per-batch layer tables, the first layer's width sweep and the alternatives."""
    batches = r["batches"]
    b64 = batches["64"]["conv1_sweep_ms"]["nchwc"]
    plain = batches["64"]["conv1_sweep_ms"]["plain"]
    conv = [b64[str(w)]["layer_us"]["conv1"] for w in range(1, 17)]
    shown = {b: {**_batch(b, x), "fastest_alternative": _fastest_alternative(x)} for b, x in batches.items()}
    return {"run": run, "machine": machine_line(r["machine"]), "rounds": r["config"]["rounds"],
            "batches": list(shown.values()), **{f"b{b}": x for b, x in shown.items()}, "sweep_table": _sweep_table(batches),
            "alternatives_table": _alternatives_table(batches), "conv_low": f"{min(conv):.0f}", "conv_high": f"{max(conv):.0f}",
            "conv_17": f"{b64['17']['layer_us']['conv1']:.0f}",
            **{f"plain_{w}": f"{plain[w]['layer_us']['conv1']:.0f}" for w in ("1", "3", "16")}}
