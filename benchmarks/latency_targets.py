"""Is the pruned model faster on the runtime? --target vs --target none vs --round-to 16, side by side.

For every architecture in models/ (40 % of the channels of every prunable group
dead, by zeroed weights): the input model, the model pruned with --target none
(every dead channel deleted), with --round-to 16 (the widths Torch-Pruning's
fixed round_to=16 gives) and with --target ort-cpu (or ort-cuda), all timed in
one process, interleaved, medians. The noise floor is the same input file timed
in two sessions against each other. A model whose checks fail is timed once more
with three times the rounds, and that larger sample decides (both are kept).

With --target ort-cpu-int8 every model is timed as that target runs it: int8-quantized
(onnxprune.quantization's QDQ settings, calibrated on random inputs: values do not change an
int8 kernel's speed), so the quantized input, quantized --target none, quantized --round-to 16
and the quantized --target ort-cpu-int8 choice are compared; the float32 input is timed beside
them for reference. Its default is one thread (the edge case int8 targets).

Also measured: cold calibration time per model, and the wall time --target adds
to `onnxprune prune` with a warm cache (ResNet-50, separate processes).

    python -m benchmarks.latency_targets                     # ORT CPU, 2 threads, batch 1
    python -m benchmarks.latency_targets --models mnasnet mobilenetv2
    python -m benchmarks.latency_targets --target ort-cpu-int8             # 1 thread, batch 1
    python -m benchmarks.latency_targets --target ort-cpu-int8 --quick     # 3 small models, a check that it runs
    python -m benchmarks.latency_targets --target ort-cuda --batch 1 64   # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved_latency, machine_info, median, run_measured, use_global_ort_threads
from benchmarks.store import add_results_argument, write_result

DEAD_FRACTION = 0.4
TARGET_CHOICES = ("ort-cpu", "ort-cpu-int8", "ort-cuda")
DEFAULT_THREADS = {"ort-cpu-int8": 1}  # else 2
QUICK_MODELS = ("lenet5", "resnet20", "mobilenetv2_cifar")
QUICK = {"rounds": 10, "budget": 10.0}
QUICK_SOURCE = "a quick check that the script runs (--quick: three small models, 10 rounds), not the benchmark"


def build(name: str, seed: int):
    import torch

    import models
    from onnxprune.kill import kill_channels
    from onnxprune.torch_export import export_onnx

    spec = models.REGISTRY[name]
    torch.manual_seed(seed)
    net = models.build(name).eval()
    models.randomize_batchnorm(net, seed)
    dense = export_onnx(net, torch.rand(1, *spec.input_shape))
    dead, killed = kill_channels(dense, DEAD_FRACTION, seed=seed)
    return dead, spec.input_shape, sum(len(v) for v in killed.values())


def macs_of(model) -> int:
    from onnxprune.api import inspect_model

    return inspect_model(model)[2].macs


def run_model(name: str, args, target_name: str, cache_dir: Path, out: dict, on_batch=lambda: None) -> None:
    """Measure one model at every batch size into ``out`` (``on_batch`` after each)."""
    from onnxprune.api import inspect_model, prune_model
    from onnxprune.latency.cache import LatencyCache
    from onnxprune.latency.search import choose_widths
    from onnxprune.latency.target import make_target

    dead, shape, killed = build(name, args.seed)
    out.update({"model": name, "channels_killed": killed})
    # Cold calibration for this model alone (a fresh cache file), then prune with the warm cache.
    batches = args.batch
    for batch in batches:
        target = make_target(target_name, threads=args.threads, batch=batch)
        fresh = LatencyCache(target, cache_dir / f"cold-{name}-{batch}.json")
        t = time.perf_counter()
        analysis, base, _, _ = inspect_model(dead)
        choice = choose_widths(analysis, base, target, fresh)
        calib_s = time.perf_counter() - t
        variants = {
            "none": prune_model(dead, target="none").model,
            "round16": prune_model(dead, round_to_n=16).model,
        }
        result = prune_model(dead, target=target_name, threads=args.threads, batch=batch)
        variants["target"] = result.model
        x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
        feed = {"input": x}

        def runner(model, target=target, feed=feed):
            session = target.session(model.SerializeToString())  # the shared pool, else its own without spinning
            return lambda: session.run(None, feed)

        timed_input = target.prepare(dead)  # as the target runs it: quantized for ort-cpu-int8
        runners = {"input": runner(timed_input), "input_again": runner(timed_input)}
        runners.update({k: runner(target.prepare(v)) for k, v in variants.items()})
        if target.precision != "float32":
            runners["input_float32"] = runner(dead)
        lat, noise, checks = timed_checks(runners, args.rounds, args.budget)
        first = None
        if not all(checks.values()):
            # One failing sample is not yet evidence: timings can be bimodal (a GPU at b1), and two
            # medians of 20 rounds then disagree by more than the noise floor they measure. The same
            # rule for every row: time it again with RETIME_FACTOR times the rounds; that sample decides.
            first = {"latency": lat, "noise_floor": noise, "checks": checks}
            lat, noise, checks = timed_checks(runners, args.rounds * RETIME_FACTOR, args.budget * RETIME_FACTOR)
        macs = {"input": macs_of(dead), **{k: macs_of(v) for k, v in variants.items()}}
        ms = {k: lat[k]["median_ms"] for k in ("input", "none", "round16", "target")}
        out[f"batch{batch}"] = {
            "latency": lat,
            "noise_floor": noise,
            "first_timing": first,
            "macs": macs,
            "calibration_s": calib_s,
            "layers_measured_cold": choice.measured_layers,
            "predicted_ms": {k: v / 1000.0 for k, v in choice.predicted_us.items()},
            "attempts": result.report.latency["attempts"],
            "kept_for_speed": sum(g["kept_for_speed"] for g in result.report.latency.get("groups", [])),
            "checks": checks,
        }
        print(f"[{name} b{batch}] input {ms['input']:.3g} ms | none {ms['none']:.3g} | round16 {ms['round16']:.3g} | "
              f"target {ms['target']:.3g} (noise {noise:.1%}){' re-timed' if first else ''}; calibration {calib_s:.1f} s; "
              f"attempt '{result.report.latency['accepted']}'", flush=True)
        on_batch()


RETIME_FACTOR = 3


def timed_checks(runners: dict, rounds: int, budget_s: float) -> tuple[dict, float, dict]:
    """Interleaved medians; the noise floor (the input timed twice); target <= input/none/round16 within it (>= 1 %)."""
    lat = interleaved_latency(runners, repeats=rounds, budget_s=budget_s)
    ms = {k: v["median_ms"] for k, v in lat.items()}
    noise = abs(ms["input_again"] / ms["input"] - 1.0)
    tol = 1.0 + max(noise, 0.01)
    checks = {f"target <= {k}": ms["target"] <= ms[k] * tol for k in ("input", "none", "round16")}
    return lat, noise, checks


def merge_rows(path: Path, rows: list[dict], machine: dict) -> None:
    """Replace the given models' batch entries in an earlier result (the old entry kept as ``replaced``)."""
    earlier = json.loads(path.read_text())
    by_model = {m["model"]: m for m in earlier["models"]}
    for row in rows:
        old = by_model.get(row["model"])
        if old is None:
            earlier["models"].append(row)
            continue
        for key, entry in row.items():
            if key.startswith("batch"):
                entry["replaced"] = old.get(key)
                entry["remeasured_on"] = machine
                old[key] = entry
    path.write_text(json.dumps(earlier, indent=2) + "\n")


def extra_time(args, target_name: str, cache_dir: Path, work: Path) -> dict:
    """Wall time of `onnxprune prune` on ResNet-50 (40 % dead), --target none vs the target, warm cache."""
    import onnx

    dead, _, _ = build("resnet50", args.seed)
    src = work / "resnet50_dead.onnx"
    onnx.save(dead, src)
    env = dict(os.environ, ONNXPRUNE_CACHE_DIR=str(cache_dir / "cli"))
    threads = ["--threads", str(args.threads)]
    cold, _, _ = run_measured(["-m", "onnxprune", "calibrate", str(src), "--target", target_name, *threads], env=env)
    walls = {"none": [], "target": []}
    for _ in range(args.repeats):
        for key, extra in (("none", ["--target", "none"]), ("target", ["--target", target_name, *threads])):
            w, _, _ = run_measured(["-m", "onnxprune", "prune", str(src), "-o", str(work / f"o_{key}.onnx"), "-q", *extra], env=env)
            walls[key].append(w)
    res = {"calibrate_cold_s": cold, "prune_none_s": median(walls["none"]), "prune_target_s": median(walls["target"])}
    res["extra_s"] = res["prune_target_s"] - res["prune_none_s"]
    print(f"[resnet50 CLI] calibrate (cold) {cold:.1f} s; prune --target none {res['prune_none_s']:.2f} s, "
          f"--target {target_name} {res['prune_target_s']:.2f} s (+{res['extra_s']:.2f} s)", flush=True)
    return res


def resolve_defaults(args) -> None:
    """Per-target thread default; --quick's models, rounds and budget (explicit --models win)."""
    if args.threads is None:
        args.threads = DEFAULT_THREADS.get(args.target, 2)
    if args.quick:
        args.models = args.models or list(QUICK_MODELS)
        args.rounds, args.budget, args.skip_cli = QUICK["rounds"], QUICK["budget"], True


def timed_as(target_name: str, threads: int) -> dict:
    """How the target runs the models timed (precision, quantization settings), for the run's config."""
    from onnxprune.latency.target import make_target

    if target_name == "ort-cuda":
        return {"precision": "float32"}
    return make_target(target_name, threads=threads).precision_info()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="ort-cpu", choices=TARGET_CHOICES)
    ap.add_argument("--models", nargs="*", help="registry names (default: every architecture in models/)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a check that the script runs: {', '.join(QUICK_MODELS)} (unless --models), "
                         f"{QUICK['rounds']} rounds, no CLI timing")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, help="threads (default: 1 for ort-cpu-int8, else 2)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per model")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timing per model at most")
    ap.add_argument("--repeats", type=int, default=3, help="CLI runs for the extra-time measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-cli", action="store_true", help="skip the extra-time measurement")
    add_results_argument(ap, "latency-targets")
    ap.add_argument("--merge-into", type=Path, help="an earlier result file whose rows for these models and batches "
                    "this run replaces (the earlier entries are kept in it, under 'replaced')")
    args = ap.parse_args()
    resolve_defaults(args)
    if args.target == "ort-cpu":  # not for int8: onnxruntime.quantization's sessions cannot use a shared pool
        use_global_ort_threads(args.threads)
    import models

    names = args.models or models.names()
    config = {"target": args.target, "threads": args.threads, "batch": args.batch, "dead_fraction": DEAD_FRACTION,
              "rounds": args.rounds, "seed": args.seed, "quick": args.quick, **timed_as(args.target, args.threads)}
    run = f"latency-{args.target}" + ("" if args.models is None else "-" + "-".join(args.models))
    work = Path(tempfile.mkdtemp(prefix="onnxprune-latency-"))
    cache_dir = work / "cache"
    os.environ["ONNXPRUNE_CACHE_DIR"] = str(cache_dir / "api")
    rows, cli = [], None

    def save(complete: bool) -> Path:  # after every batch: a run cut short by a time limit keeps what it measured
        quick = {"source": QUICK_SOURCE} if args.quick else {}
        return write_result(args.results, run, {"benchmark": "latency-targets", "machine": machine_info(), "config": config,
                                                "complete": complete, **quick, "models": rows, "cli_extra_time_resnet50": cli})

    try:
        for name in names:
            rows.append({})
            run_model(name, args, args.target, cache_dir, rows[-1], on_batch=lambda: save(False))
        cli = None if args.skip_cli else extra_time(args, args.target, cache_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {save(True)}")
    if args.merge_into:
        merge_rows(args.merge_into, rows, machine_info())
        print(f"merged into {args.merge_into}")


if __name__ == "__main__":
    main()
