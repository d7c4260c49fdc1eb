"""``onnxprune.deploy.deploy``: a float32 ONNX model to an edge runtime, in a chosen precision, checked and timed.

The steps, each in its own module: read the data (sources), convert the precision (precisions,
keep_float), write the runtime's files into a staging folder (runtimes, writing), check them on
held-out data against the float32 input (checks), time every row side by side (measure), report
(report), and only then move the files into the output folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxprune.deploy import options
from onnxprune.deploy.checks import INPUT_LABEL, check_rows
from onnxprune.deploy.keep_float import KeepFloat, keep_float_for
from onnxprune.deploy.measure import time_rows, timing_feed
from onnxprune.deploy.precisions import Converted, choose_int8_mode, to_fp16, to_int8
from onnxprune.deploy.report import RowRecord, deploy_table, machine, timing_method, versions
from onnxprune.deploy.runtime_openvino import OpenVinoRuntime
from onnxprune.deploy.runtime_ort import OrtArtifact, OrtRuntime
from onnxprune.deploy.runtimes import Artifact, DeployRuntime
from onnxprune.deploy.sources import Samples, load_samples, model_inputs
from onnxprune.deploy.writing import Stage, check_out_dir, publish, staging
from onnxprune.errors import InputError
from onnxprune.modelio import LoadedModel, as_loaded, atomic_write_text, save_model
from onnxprune.quantization import Int8Settings, refuse_quantized

logger = logging.getLogger(__name__)

RUNTIMES: dict[str, type[DeployRuntime]] = {"ort": OrtRuntime, "openvino": OpenVinoRuntime}
KeepFloatChoice = KeepFloat | Callable[[onnx.ModelProto], list[str]] | Sequence[str] | None


@dataclass
class DeployResult:
    """What deploy wrote and measured: the files in the output folder and the report (also deploy.json)."""

    out_dir: Path
    files: list[Path]
    report: dict = field(default_factory=dict)

    def table(self) -> str:
        """Size, latency, agreement and error per row, as text."""
        return deploy_table(self.report)


# Metadata onnxprune writes that describes training and pruning; deployed artifacts leave it out (smaller files)
TRAINING_METADATA = ("onnxprune.gates", "onnxprune.removed")


def _check_options(runtime: str, precision: str, mode: str, min_agreement: float, threads: int,
                   calibration, calibration_samples: int, batch: int | None) -> None:
    """InputError for a setting deploy cannot use."""
    for value, name, choices in ((runtime, "runtime", options.RUNTIME_NAMES), (precision, "precision", options.PRECISIONS),
                                 (mode, "int8 mode", options.INT8_MODES)):
        if value not in choices:
            raise InputError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}")
    if precision == "int8" and calibration is None:
        raise InputError("int8 needs --calibration DATA (a dataset name or an .npz of inputs)")
    if not 0.0 <= min_agreement <= 1.0:
        raise InputError(f"--min-agreement {min_agreement} is not a fraction between 0 and 1")
    if threads < 1 or calibration_samples < 1:
        raise InputError("--threads and --calibration-samples must be positive integers")
    if batch is not None and batch < 1:
        raise InputError(f"--batch {batch} is not a positive integer")


def _timing_batch(requested: int | None, model: onnx.ModelProto) -> int:
    """The batch deploy is fast at: ``requested``, else the model's fixed batch size, else 1. InputError when the
    model's batch is fixed at another size (it cannot run at ``requested``)."""
    inputs = model_inputs(model)
    fixed = inputs[0].fixed_batch if inputs else None
    if requested is None:
        return fixed or 1
    if fixed is not None and requested != fixed:
        raise InputError(f"--batch {requested}: the model's batch is fixed at {fixed}; give --batch {fixed} or leave "
                         "it out")
    return requested


def _convert(loaded: LoadedModel, precision: str, samples: Samples, runtime: DeployRuntime, *, mode: str,
             keep: KeepFloat, settings: Int8Settings, progress: bool) -> Converted:
    """The input model in ``precision`` for ``runtime``."""
    if precision == "int8":
        return to_int8(loaded.model, samples, mode=mode, keep=keep, settings=settings, progress=progress)
    if precision == "fp16":
        return to_fp16(loaded.model, in_onnx=runtime.fp16_in_onnx)
    return Converted(loaded.model, "fp32", {"conversion": "none"})


def drop_training_metadata(model: onnx.ModelProto) -> list[str]:
    """Remove from ``model`` (in memory) the metadata that describes its training and pruning, not its inference
    (:data:`TRAINING_METADATA`: per-gate statistics, removed channel indices; the pruned model keeps them).
    Returns the keys removed."""
    kept = [p for p in model.metadata_props if p.key not in TRAINING_METADATA]
    dropped = [p.key for p in model.metadata_props if p.key in TRAINING_METADATA]
    if dropped:
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    return dropped


def _input_file(loaded: LoadedModel, scratch: Path) -> Path:
    """A file holding the input model as ONNX Runtime loads it (the input itself, unless changed in memory)."""
    if loaded.path is not None and loaded.ir_lowered_from is None:
        return loaded.path
    return save_model(loaded.model, scratch / "input.onnx")


def _rows(loaded: LoadedModel, runtime: DeployRuntime, converted: Converted, stage: Stage) -> list[Artifact]:
    """The float32 input on ONNX Runtime, the runtime's reference rows, then the written rows."""
    source = _input_file(loaded, stage.scratch)
    files = [source] + ([] if source != loaded.path else list(loaded.external_data_files))
    first = OrtArtifact(INPUT_LABEL, source, files, written=False)
    return [first, *runtime.reference_rows(source), *runtime.write(converted, stage.out)]


def _report(loaded: LoadedModel, out_dir: Path, runtime: DeployRuntime, converted: Converted, samples: Samples,
            records: list[RowRecord], check, stage: Stage, settings: dict, batch: int) -> dict:
    """deploy.json's content."""
    return {
        "input": str(loaded.path or "model"),
        "output": str(out_dir),
        "files": sorted([*os.listdir(stage.out), "deploy.json"]),
        "settings": settings,
        "conversion": converted.details,
        "data": samples.describe(),
        "check": {"samples": check.samples, "min_agreement": settings["min_agreement"], "passed": True},
        "rows": [record.to_dict(check) for record in records],
        "timing": {"batch": batch, "threads": settings["threads"], "method": timing_method(batch)},
        "runtime_details": runtime.details(stage.out),
        "versions": versions(runtime.versions()),
    }


def _measure(rows: list[Artifact], samples: Samples, converted: Converted, *, min_agreement: float,
             thread_counts: list[int], batch: int, budget_s: float, progress: bool):
    """Check every row on held-out data (AgreementError if too rare), then time them side by side."""
    check = check_rows(rows, samples, min_agreement=min_agreement, progress=progress)
    logger.info("timing %d models at batch %d with %s thread(s), side by side", len(rows), batch,
                " and ".join(map(str, thread_counts)))
    timings = time_rows(rows, timing_feed(samples, batch), thread_counts, budget_s=budget_s)
    records = [RowRecord(row, "fp32" if not row.written else converted.precision, timings[row.label], row.describe())
               for row in rows]
    return check, records


def deploy(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    runtime: str = "ort",
    precision: str = "int8",
    calibration: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    min_agreement: float = options.MIN_AGREEMENT,
    threads: int = options.THREADS,
    int8_mode: str = "auto",
    keep_float: KeepFloatChoice = None,
    int8_settings: Int8Settings | None = None,
    calibration_samples: int = options.CALIBRATION_SAMPLES,
    check_samples: int | None = None,
    timing_budget_s: float = options.TIMING_BUDGET_S,
    batch: int | None = None,
    report_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> DeployResult:
    """Convert a float32 model to ``precision`` for ``runtime``, check it on held-out data against the input,
    time it, and write it with deploy.json into ``out_dir`` (nothing is written if any step fails).

    ``calibration``: a dataset name or an .npz of inputs (needed for int8; otherwise random inputs check).
    ``keep_float``: a KeepFloat, a function of the model, or node names that int8 leaves in float32;
    None: on ORT the layers measured slower in int8 (where onnxprune.latency.int8 exists), elsewhere none.
    ``batch``: the batch size to be fast at: the default keep_float measures layers at it, and every row is timed
    at it (held-out samples repeated where fewer). None: 1, or the model's batch size where that is fixed; a model
    whose batch is fixed at another size is refused (InputError).
    ``progress``: progress bars on stderr while calibrating and checking (where stderr is a terminal).
    """
    machine_before = machine()  # the load average before this process adds its own
    _check_options(runtime, precision, int8_mode, min_agreement, threads, calibration, calibration_samples, batch)
    if (check_samples is not None and check_samples < 1) or timing_budget_s <= 0:
        raise InputError("--check-samples and --timing-budget must be positive")
    loaded = as_loaded(model_or_path)
    refuse_quantized(loaded.model, str(loaded.path or "the model"))
    batch = _timing_batch(batch, loaded.model)
    out, report_file = Path(out_dir), None if report_path is None else Path(report_path)
    check_out_dir(out, loaded, report_file)
    deploy_runtime = RUNTIMES[runtime]()
    mode = choose_int8_mode(loaded.model, int8_mode, runtime) if precision == "int8" else None
    samples = load_samples(calibration, loaded.model, data_dir=data_dir, check_samples=check_samples,
                           calibration_samples=calibration_samples if mode == "static" else 0)
    keep = keep_float_for(keep_float, runtime=runtime, threads=threads, batch=batch)
    converted = _convert(loaded, precision, samples, deploy_runtime, mode=mode or "", keep=keep,
                         settings=int8_settings or Int8Settings(), progress=progress)
    if converted.model is not loaded.model:  # the float32 input is written as it came
        converted.details["metadata_dropped"] = drop_training_metadata(converted.model)
    thread_counts = sorted({1, threads})
    settings = {"runtime": runtime, "precision": precision, "int8_mode": int8_mode, "min_agreement": min_agreement,
                "calibration": None if calibration is None else str(calibration), "threads": thread_counts}
    with staging(out) as stage:
        rows = _rows(loaded, deploy_runtime, converted, stage)
        check, records = _measure(rows, samples, converted, min_agreement=min_agreement, thread_counts=thread_counts,
                                  batch=batch, budget_s=timing_budget_s, progress=progress)
        report = _report(loaded, out, deploy_runtime, converted, samples, records, check, stage, settings, batch)
        report["machine"] = machine_before
        text = json.dumps(report, indent=2) + "\n"
        atomic_write_text(stage.out / "deploy.json", text)
        files = publish(stage, out)
    if report_file is not None:
        atomic_write_text(report_file, text)
    return DeployResult(out, files, report)
