"""Deploying after pruning: dense and pruned, float32 and int8, on ORT CPU (1 and 2 threads) and OpenVINO CPU.

For each net, its dense and its pruned float32 ONNX models are deployed to int8 with `onnxprune deploy` (calibrated
on the dataset's training split, checked on its test split: what a user gets; for ONNX Runtime with the layers
measured slower in int8 left in float32, for OpenVINO every layer in int8). Then all four variants of a net are timed
side by side (interleaved runs, medians) at batch 1 and 64 on each runtime setting, and their test error is taken
on the whole test set by the runtime that runs them. Per row: the speed-up over the dense float32 model and its
realisation, the speed-up over the MAC reduction.

    python -m benchmarks.deploy_table                        # the committed MNIST LeNets, and the CIFAR nets found
    python -m benchmarks.deploy_table --nets lenet5 --quick  # a check that it runs

The CIFAR nets are not committed (too large): `--cifar-dir DIR` holds `vgg.dense.onnx`, `vgg.pruned.onnx`,
`r56.dense.onnx`, `r56.pruned.onnx` as the GPU lease of docs/experiments.md ("deploy") writes them.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import ROOT, machine_info
from benchmarks.store import RESULTS, add_results_argument, write_result

PAPER = RESULTS / "paper-table"
CIFAR_DIR = ROOT / "benchmarks" / "work" / "deploy"
SETTINGS = (("ORT CPU", 1), ("ORT CPU", 2), ("OpenVINO CPU", 2))
BATCHES = (1, 64)
VARIANTS = ("dense fp32", "dense int8", "pruned fp32", "pruned int8", "pruned fp32, --target", "pruned int8, --target")
# The pruned float32 model after `onnxprune prune --target ort-cpu --threads 1 --batch 64 --assume-finite`: nothing
# is left to delete, so the target times the forms its lowerings give (conv+pool in phases, kept pixels read as rows)
TARGET = {"target": "ort-cpu", "threads": 1, "batch": 64, "assume_finite": True}
# The pruned float32 model after `onnxprune prune --target ort-cpu-int8 --threads 1 --batch 64 --assume-finite` (the
# forms timed quantized), then `onnxprune deploy --batch 64`: the layers measured slower in int8 at batch 64 stay float32
INT8_TARGET = {**TARGET, "target": "ort-cpu-int8"}
INT8_TARGET_BATCH = 64


@dataclass(frozen=True)
class Net:
    """A row group of the table: a net's dense and pruned float32 models and the dataset they were trained on."""

    label: str
    data: str
    dense: Path
    pruned: Path


def nets(cifar_dir: Path) -> dict[str, Net]:
    return {
        "lenet5": Net("LeNet5-Caffe / mnist", "mnist", PAPER / "mnist-lenet5-sbp.dense.onnx", PAPER / "mnist-lenet5-sbp.pruned.onnx"),
        "lenet500": Net("LeNet-500-300 / mnist", "mnist", PAPER / "mnist-lenet500-sbp.dense.onnx",
                        PAPER / "mnist-lenet500-sbp.pruned.onnx"),
        "vgg": Net("VGG-like x1 / cifar10", "cifar10", cifar_dir / "vgg.dense.onnx", cifar_dir / "vgg.pruned.onnx"),
        "resnet56": Net("ResNet-56 / cifar10", "cifar10", cifar_dir / "r56.dense.onnx", cifar_dir / "r56.pruned.onnx"),
    }


def deployed(source: Path, runtime: str, net: Net, data_dir: str | None, folder: Path, samples: int,
             batch: int | None = None) -> tuple[Path, dict]:
    """`onnxprune deploy --precision int8` of ``source`` for ``runtime`` into ``folder``, on ORT leaving in float32 the
    layers measured slower in int8 at ``batch``: (the model file, its report)."""
    from onnxprune.deploy import deploy

    result = deploy(source, folder, runtime=runtime, precision="int8", calibration=net.data, data_dir=data_dir,
                    threads=1, batch=batch, min_agreement=0.95, calibration_samples=samples, check_samples=1000,
                    timing_budget_s=0.5)
    name = "model.onnx" if runtime == "ort" else "model.xml"
    return folder / name, result.report


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from onnxprune.latency.target import Target

    session = Target("ort-cpu", threads).session(str(path))  # its own pool, spinning off (as onnxprune times)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda x: next(iter(request.infer({0: x}).values()))


def test_error(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    predictions = np.concatenate([run(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((predictions != y).mean())


def latencies(runners: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, rounds: int, budget_s: float) -> dict:
    """Median ms of every runner on ``x``, interleaved."""
    from onnxprune.latency.timing import interleaved

    timings = interleaved({k: (lambda r=r: r(x)) for k, r in runners.items()}, repeats=rounds, warmup=3, budget_s=budget_s)
    return {k: t.to_dict() for k, t in timings.items()}


def variant_files(net: Net, data_dir: str | None, scratch: Path, samples: int) -> tuple[dict, dict]:
    """Per runtime, the file of each variant; and each int8 variant's deploy report."""
    files: dict[str, dict[str, Path]] = {"ort": {}, "openvino": {}}
    reports: dict[str, dict] = {}
    for which, source in (("dense", net.dense), ("pruned", net.pruned)):
        for runtime in files:
            files[runtime][f"{which} fp32"] = source
            path, report = deployed(source, runtime, net, data_dir, scratch / f"{which}-{runtime}", samples)
            files[runtime][f"{which} int8"] = path
            reports[f"{which} int8 {runtime}"] = report
    targeted, reports["pruned fp32, --target"] = for_target(net.pruned, scratch / "pruned-target.onnx", TARGET)
    for_int8, reports["pruned int8, --target"] = for_target(net.pruned, scratch / "pruned-int8-target.onnx", INT8_TARGET)
    for runtime in files:
        files[runtime]["pruned fp32, --target"] = targeted
        files[runtime]["pruned int8, --target"], reports[f"pruned int8, --target {runtime}"] = deployed(
            for_int8, runtime, net, data_dir, scratch / f"int8-target-{runtime}", samples, batch=INT8_TARGET_BATCH)
    return files, reports


def for_target(source: Path, output: Path, options: dict) -> tuple[Path, dict]:
    """``source`` through `onnxprune prune` with ``options``: (the file, the attempt the target kept)."""
    from onnxprune.api import prune_model

    result = prune_model(source, output=output, **options)
    latency = result.report.latency
    return output, {"target": options, "accepted": latency["accepted"], "attempts": latency["attempts"]}


def measure_net(net: Net, data_dir: str | None, rounds: int, budget_s: float, samples: int) -> dict:
    """Every variant of ``net``: sizes, test errors per runtime, latencies per setting and batch."""
    from onnxprune.api import inspect_model
    from onnxprune.data import load_dataset

    x, y = load_dataset(net.data, data_dir, "test")
    x = x.astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="deploy-table-") as tmp:
        files, reports = variant_files(net, data_dir, Path(tmp), samples)
        out = {"sizes": {k: _size(p) for k, p in files["ort"].items()},
               "openvino_sizes": {k: _size(p) for k, p in files["openvino"].items()},
               "macs": {k: inspect_model(getattr(net, k))[2].macs for k in ("dense", "pruned")},  # the target's: as pruned
               "errors": {}, "latency_ms": {},
               "deploy": {k: _deploy_summary(r) for k, r in reports.items() if k.endswith((" ort", " openvino"))},
               "target": reports["pruned fp32, --target"], "int8_target": reports["pruned int8, --target"]}
        for runtime_label, threads in SETTINGS:
            runtime = "ort" if runtime_label.startswith("ORT") else "openvino"
            make = ort_runner if runtime == "ort" else openvino_runner
            runners = {k: make(p, threads) for k, p in files[runtime].items()}
            setting = f"{runtime_label}, {threads} thread{'s' * (threads > 1)}"
            if runtime not in out["errors"]:
                out["errors"][runtime] = {k: test_error(r, x, y) for k, r in runners.items()}
            out["latency_ms"][setting] = {str(b): latencies(runners, x[:b], rounds, budget_s) for b in BATCHES}
    return out


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.exists())


def _deploy_summary(report: dict) -> dict:
    conversion = report["conversion"]
    return {"layers_kept_float": conversion.get("layers_kept_float", []), "layers": conversion.get("layers"),
            "settings": conversion.get("settings"), "agreement": report["rows"][-1]["agreement_with_input"]}


def _previous_nets(path: Path, measuring: list[str]) -> dict:
    """The nets of the result at ``path`` that are not being measured now, each stamped with when it was."""
    import json

    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    when = previous["machine"]["date"]
    return {name: {"measured": when, **net} for name, net in previous["nets"].items() if name not in measuring}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", choices=("lenet5", "lenet500", "vgg", "resnet56"))
    ap.add_argument("--cifar-dir", type=Path, default=CIFAR_DIR, help="where the CIFAR nets' ONNX files are")
    ap.add_argument("--data-dir")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds per setting and batch")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per setting and batch at most")
    ap.add_argument("--calibration-samples", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="5 rounds, 64 calibration samples: a check that it runs")
    ap.add_argument("--keep-other-nets", action="store_true",
                    help="keep the nets of the previous result that this run does not measure (each says when it was)")
    add_results_argument(ap, "deploy")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.budget, args.calibration_samples = 5, 2.0, 64
    chosen = nets(args.cifar_dir)
    names = args.nets or [k for k, n in chosen.items() if n.dense.exists() and n.pruned.exists()]
    rows = _previous_nets(args.results / "deploy-table.json", names) if args.keep_other_nets else {}
    machine = machine_info()
    for name in names:
        print(f"{name}: deploying and timing", flush=True)
        rows[name] = {"label": chosen[name].label, "measured": machine["date"],
                      **measure_net(chosen[name], args.data_dir, args.rounds, args.budget, args.calibration_samples)}
    rows = {name: rows[name] for name in ("lenet5", "lenet500", "vgg", "resnet56") if name in rows}
    result = {"benchmark": "deploy-table", "machine": machine, "nets": rows,
              "config": {"rounds": args.rounds, "budget_s": args.budget, "calibration_samples": args.calibration_samples,
                         "settings": [list(s) for s in SETTINGS], "batches": list(BATCHES), "quick": args.quick,
                         "min_agreement": 0.95}}
    path = write_result(args.results, "deploy-table" + ("-quick" if args.quick else ""), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
