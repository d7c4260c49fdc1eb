"""Render BENCHMARKS.md from benchmarks/results/*/result.json (every figure there comes from a result file).

    python benchmarks/make_report.py
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, ROOT  # noqa: E402
from onnxprune.table import human  # noqa: E402

SECTIONS: dict[str, Callable[[str, dict], str]] = {}


def section(kind: str):
    def register(fn):
        SECTIONS[kind] = fn
        return fn

    return register


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(m: dict) -> str:
    parts = [m.get("cpu", "?"), f"{m.get('cpu_count', '?')} cores"]
    if m.get("avx512"):
        parts.append("AVX-512")
    if m.get("gpu"):
        parts.append(m["gpu"])
    parts += [f"onnxruntime {m.get('onnxruntime', '?')}", f"torch {m.get('torch', '?')}", m.get("date", "")]
    return "Measured on: " + ", ".join(p for p in parts if p)


def _s(x: float) -> str:
    return f"{x:.2f} s"


@section("prune-resnet50")
def engine_section(run: str, r: dict) -> str:
    cfg = r["config"]
    size = cfg["model_file_bytes"]
    out = [f"### {run}: `onnxprune prune` on {cfg['model']} ({cfg['input'][2]}x{cfg['input'][3]}), half of every prunable group dead\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/prune_resnet50.py`. "
               f"{cfg['channels_killed']} channels dead in {cfg['groups_killed']} groups; model file {size / 1e6:.0f} MB; "
               f"medians of {cfg['repeats']} runs, each tool in its own process.\n")
    rows = []
    for tool, label in (("onnxprune", "onnxprune prune (ONNX)"), ("torch_pruning", "Torch-Pruning 1.6 (PyTorch)")):
        m = r[tool]["median"]
        over = m["peak_rss"] - r[tool]["baseline_rss"]
        rows.append([
            label, _s(m["load"]), _s(m["analysis+rewrite"]), _s(m["verify"]), _s(m["save"]), _s(m["wall"]),
            f"{m['peak_rss'] / 1e6:.0f} MB ({over / 1e6:.0f} MB = {over / size:.2f}x model above imports)",
        ])
    out.append(md_table(["tool", "load", "analysis+rewrite", "verify", "save / export", "whole command", "peak RSS"], rows))
    out.append("\nTorch-Pruning's columns: load = build the model and read its state dict; analysis+rewrite = "
               "dependency graph + pruning the same channel indices; verify = one forward pass compared with the "
               "dense output; save = `torch.onnx.export`. Its process also carries PyTorch itself.\n")
    rows = []
    mr = r["mac_reduction"]
    for key, label in (("dense", "dense (dead channels still in)"), ("onnxprune", "pruned by onnxprune"), ("torch_pruning", "pruned by Torch-Pruning")):
        lat = [r["latency"][b][key]["median_ms"] for b in ("batch1", "batch8")]
        base = [r["latency"][b]["dense"]["median_ms"] for b in ("batch1", "batch8")]
        rows.append([label, human(r["macs"][key]), human(r["params"][key]), f"{lat[0]:.1f} ms", f"{lat[1]:.1f} ms",
                     f"{base[0] / lat[0]:.2f}x / {base[1] / lat[1]:.2f}x", f"{r['macs']['dense'] / r['macs'][key]:.2f}x"])
    out.append(md_table(["model", "MACs", "params", "ORT CPU batch 1", "ORT CPU batch 8", "speed-up (b1 / b8)", "MAC reduction"], rows))
    sb = r["speedup_over_mac_reduction"]
    out.append(f"\nONNX Runtime CPU, one shared pool of {cfg['ort_threads']} threads, interleaved runs, medians. Speed-up / MAC reduction: "
               f"{sb['batch1']:.2f} (batch 1), {sb['batch8']:.2f} (batch 8); MAC reduction {mr:.2f}x.\n")
    out.append("Targets: " + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in r["targets"].items()) + ".\n")
    return "\n".join(out)


@section("latency-targets")
def latency_section(run: str, r: dict) -> str:
    cfg = r["config"]
    tgt = cfg["target"]
    out = [f"### {run}: is the pruned model faster on {tgt}? (`--target {tgt}` vs `--target none` vs `--round-to 16`)\n"]
    out.append(machine_line(r["machine"]) + f". Script: `python benchmarks/latency_targets.py"
               + (" --target ort-cuda" if tgt == "ort-cuda" else "") + "`. "
               f"{int(cfg['dead_fraction'] * 100)} % of the channels of every prunable group dead (zeroed weights); "
               f"{cfg['threads']} threads; medians of up to {cfg['rounds']} interleaved rounds, all variants of a model "
               "in one run. Noise floor: the input file timed in two sessions against each other. "
               "`--round-to 16` gives the widths Torch-Pruning's fixed `round_to=16` gives.\n")
    for batch in cfg["batch"]:
        rows = []
        ok_all = {"target <= input": 0, "target <= none": 0, "target <= round16": 0}
        for m in r["models"]:
            b = m.get(f"batch{batch}")
            if not b:
                continue
            lat = {k: v["median_ms"] for k, v in b["latency"].items()}
            checks = b["checks"]
            for k in ok_all:
                ok_all[k] += bool(checks[k])
            def cell(k):
                return f"{lat[k]:.3g} ms ({lat['input'] / lat[k]:.2f}x)"
            rows.append([
                m["model"], f"{lat['input']:.3g} ms", f"{b['noise_floor']:.1%}", cell("none"), cell("round16"),
                "**" + cell("target") + "**", b["attempts"] and next(a["attempt"] for a in b["attempts"] if a["accepted"]),
                f"{b['calibration_s']:.1f} s", "yes" if all(checks.values()) else
                "no: " + ", ".join(k for k, v in checks.items() if not v),
            ])
        n = len(rows)
        out.append(f"**Batch {batch}.** Latency (speed-up over the input):\n")
        out.append(md_table(["model", "input", "noise", "--target none", "--round-to 16", f"--target {tgt}", "plan kept",
                             "calibration (cold)", "target <= all (within noise)"], rows))
        out.append("\n" + "; ".join(f"{k}: {v}/{n}" for k, v in ok_all.items()) + " (within the noise floor, at least 1 %).\n")
    cli = r.get("cli_extra_time_resnet50")
    if cli:
        out.append(f"Wall time of `onnxprune prune` on ResNet-50 (224x224, 40 % dead), separate processes, warm cache: "
                   f"`--target none` {cli['prune_none_s']:.2f} s, `--target {tgt}` {cli['prune_target_s']:.2f} s: "
                   f"**+{cli['extra_s']:.2f} s** (target: under 2 s). Cold calibration of the same model "
                   f"(`onnxprune calibrate`): {cli['calibrate_cold_s']:.1f} s.\n")
    return "\n".join(out)


HEADER = """# Benchmarks

Every number here is generated by `python benchmarks/make_report.py` from the
`result.json` files under `benchmarks/results/`, each written by the script named
in its section. Timings on shared machines are noisy: latencies are medians of
interleaved runs measured side by side in one process.
"""


def main() -> None:
    parts = [HEADER]
    for path in sorted(RESULTS.glob("*/result.json")):
        r = json.loads(path.read_text())
        render = SECTIONS.get(r.get("benchmark", ""))
        if render is None:
            print(f"skipping {path}: no renderer for benchmark {r.get('benchmark')!r}")
            continue
        parts.append(render(path.parent.name, r))
    out = ROOT / "BENCHMARKS.md"
    out.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
