"""deploy's report (deploy.json) and its table: per row, size, latency at the timed batch, agreement and error."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from onnxprune.deploy.checks import INPUT_LABEL, CheckResult
from onnxprune.deploy.runtimes import Artifact
from onnxprune.latency.timing import Timing


def timing_method(batch: int) -> str:
    """How deploy timed the rows (the report's "timing" "method")."""
    return (f"medians of interleaved runs at batch {batch}, every row timed side by side within one thread count; "
            "ONNX Runtime sessions with their own pool (spinning off), OpenVINO with INFERENCE_NUM_THREADS, "
            "NUM_STREAMS 1, PERFORMANCE_HINT LATENCY, compiled for the timed batch size (a static shape)")


@dataclass
class RowRecord:
    """A row's measurements, ready for the report."""

    artifact: Artifact
    precision: str
    timings: dict[int, Timing]
    details: dict

    def to_dict(self, check: CheckResult) -> dict:
        label = self.artifact.label
        row = {"label": label, "runtime": self.artifact.runtime, "precision": self.precision,
               "written": self.artifact.written, "files": [f.name for f in self.artifact.files],
               "size_bytes": self.artifact.size_bytes,
               "latency_ms": {str(t): timing.to_dict() for t, timing in self.timings.items()},
               "agreement_with_input": check.agreement[label], "error": check.error[label]}
        if self.artifact.reference:
            row["agreement_with"] = {self.artifact.reference: check.reference_agreement[label]}
        if self.details:
            row["runtime_details"] = self.details
        return row


def machine() -> dict:
    """Where the timings were taken, and how busy the machine was."""
    from onnxprune.latency.target import Target

    info = Target("ort-cpu", 1).fingerprint
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": info["cpu"], "cpus": info["cpus"], "platform": platform.platform(),
            "load_average_1_5_15_min_before": list(load) if load else None}


def versions(runtime_versions: dict[str, str]) -> dict[str, str]:
    """onnxprune's, onnx's, numpy's and the runtimes' versions."""
    import numpy
    import onnx

    from onnxprune import __version__

    return {"onnxprune": __version__, "onnx": onnx.__version__, "numpy": numpy.__version__, **runtime_versions}


def human_bytes(n: int) -> str:
    """96210 -> '96.2 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _ms(row: dict, threads: int) -> str:
    timing = row["latency_ms"].get(str(threads))
    return "-" if timing is None else f"{timing['median_ms']:.3g}"


def _name(row: dict, input_name: str) -> str:
    if row["label"] == INPUT_LABEL:
        return f"{input_name} (fp32)"
    return f"{row['label']} ({row['precision']})"


def deploy_table(report: dict) -> str:
    """The rows as a plain-text table (the command prints it)."""
    from onnxprune.table import format_table

    threads = report["settings"]["threads"]
    input_name = Path(report["input"]).name
    rows = []
    for row in report["rows"]:
        error = "-" if row["error"] is None else f"{row['error']:.2%}"
        rows.append([_name(row, input_name), row["runtime"], human_bytes(row["size_bytes"]),
                     *(_ms(row, t) for t in threads), f"{row['agreement_with_input']:.2%}", error])
    headers = ["model", "runtime", "size", *(f"ms, {t} thread{'s' * (t > 1)}" for t in threads),
               "agreement", "error"]
    return format_table(headers, rows, "llr" + "r" * len(threads) + "rr")


def _conversion_note(report: dict) -> str | None:
    """One line on how the model was converted (int8: the mode, calibration and layers kept in float32)."""
    conversion, data = report["conversion"], report["data"]
    if report["settings"]["precision"] != "int8":
        return None
    kept = conversion["layers_kept_float"]
    if conversion["mode"] == "static":
        weights = "per-channel" if conversion["settings"]["per_channel"] else "per-tensor"
        how = (f"static, {conversion['settings']['format']}, {weights} weights, {data['calibration_samples']} "
               f"calibration samples from {data['source']}")
    else:
        how = "dynamic (activation ranges at run time)"
    return (f"int8: {how}; {len(kept)} of {conversion['layers']} Conv/Gemm/MatMul layer(s) kept in float32 "
            f"({conversion['keep_float']})")


def _row_notes(row: dict) -> list[str]:
    """Lines on one row: agreement with its reference row, what OpenVINO ran it in."""
    notes = [f"{row['label']} agrees with {ref} on {value:.2%}" for ref, value in row.get("agreement_with", {}).items()]
    details = row.get("runtime_details")
    if details:
        layers = "; ".join(f"{kind}: " + ", ".join(f"{n} with {types}" for types, n in counts.items())
                           for kind, counts in details["layer_precisions"].items())
        notes.append(f"{row['label']}: OpenVINO's inference precision {details['inference_precision']}; {layers}")
    return notes


def _slower_notes(report: dict) -> list[str]:
    """A line for each artifact measured slower than the float32 input on its runtime at some thread count."""
    rows = report["rows"]
    inputs = {row["runtime"]: row for row in rows if row["label"].startswith(INPUT_LABEL)}  # "input", "input on OpenVINO"
    notes = []
    for row in rows:
        reference = inputs.get(row["runtime"]) or next((r for r in rows if r["label"] == INPUT_LABEL), None)
        if reference is None or row["label"].startswith(INPUT_LABEL):
            continue
        slower = [(t, row["latency_ms"][t]["median_ms"], reference["latency_ms"][t]["median_ms"])
                  for t in row["latency_ms"] if t in reference["latency_ms"]
                  and row["latency_ms"][t]["median_ms"] > reference["latency_ms"][t]["median_ms"]]
        for threads, ms, ref_ms in slower:
            notes.append(f"{row['label']} ({row['precision']}) is slower than the float32 input at {threads} thread(s): "
                         f"{ms:.3g} against {ref_ms:.3g} ms (it is {report['settings']['precision']} for its size, "
                         "not its speed, on this machine)")
    return notes


def _int8_target_hint(report: dict) -> str:
    """Where int8 is slower than the float32 input on ORT: the command that times other widths and forms quantized."""
    return (f"`onnxprune prune {report['input']} -o OUT.onnx --target ort-cpu-int8 --threads 1 --batch "
            f"{report['timing']['batch']}` (with --assume-finite, also conv+pool in phases) times other widths and "
            "forms int8-quantized and keeps the fastest; deploying OUT.onnx may give a faster int8 model")


def deploy_notes(report: dict) -> list[str]:
    """What the table does not show: data, conversion, runtime precisions, the machine."""
    notes = []
    if report["data"]["kind"] == "random":
        notes.append(f"agreement measured on {report['check']['samples']} random inputs (uniform in [0, 1)): give "
                     "--calibration DATA to check on real data")
    conversion = _conversion_note(report)
    if conversion:
        notes.append(conversion)
    for row in report["rows"]:
        notes.extend(_row_notes(row))
    slower = _slower_notes(report)
    notes.extend(slower)
    if slower and report["settings"]["precision"] == "int8" and report["settings"]["runtime"] == "ort":
        notes.append(_int8_target_hint(report))
    openvino = report["runtime_details"].get("openvino")
    if openvino and report["settings"]["precision"] == "fp16" and not openvino["f16_compute"]:
        notes.append("fp16 on OpenVINO: this CPU has no f16 compute (capabilities "
                     f"{', '.join(openvino['cpu_capabilities'])}): the IR holds float16 weights, computed in f32")
    m = report["machine"]
    load = m["load_average_1_5_15_min_before"]
    busy = f", load average {load[0]:.2f} before deploy" if load else ""
    notes.append(f"timed at batch {report['timing']['batch']} on {m['cpu']} ({m['cpus']} cores{busy})")
    return notes
