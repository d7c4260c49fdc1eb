"""Pruning at scale: ``onnxprune prune`` against ``onnx.load`` + ``onnx.save`` on synthetic models with external data.

The model: N residual MLP blocks (MatMul + Add(bias) -> Relu -> MatMul + Add(bias) -> Add(residual)), hidden H,
FFN F = 4H, input [batch, seq, H] with a symbolic batch, every weight in one external data file; a share of each
block's FFN neurons is dead (its first-layer column and bias exactly zero), so ``--target none`` deletes those
neurons: their W1 column, b1 entry and W2 row. H is chosen so the weights come near each ``--sizes`` target
(12 blocks: 100M -> H 512, 400M -> H 1024, 1.6G -> H 2048, the issue's model).

For each size, each in a fresh interpreter (wall time; peak RSS from VmHWM, benchmarks/peak_rss.py):
  * the baseline: ``onnx.load`` of the file (external data included) and ``onnx.save`` of it with its weights in
    one external data file;
  * ``onnxprune prune IN -o OUT --target none``, and again with ``--no-verify``: wall, peak RSS, the phases its
    ``--report`` times (startup: interpreter start and imports; load, analysis+rewrite, save, check: the ONNX
    checker on the result, verify; other: what no phase covers inside the command), the seconds of each pass, and
    the time no reported phase covers (wall minus their sum: starting the process, printing and writing the
    report, freeing memory at exit);
  * a fresh interpreter doing only the imports of each (its wall and RSS: the floor under both).
At one size (``--profile``, default the smallest) the prune also runs under cProfile, with a thread that records
where the main thread was each time RSS rose: ``RUN.profile.txt`` beside the result (top 25 functions by
cumulative and by own time, then the RSS rises).

    python -m benchmarks.prune_at_scale --sizes 100M 400M 1.6G     # the issue's sizes: about 9 GB RAM at 1.6G
    python -m benchmarks.prune_at_scale --quick                     # 20M and 60M, a smoke test (under a minute)
    python -m benchmarks.prune_at_scale --sizes 150M --profile 60M  # one size; the profile at another

Writes benchmarks/results/prune-at-scale/prune-at-scale.json (``--quick``: prune-at-scale-quick.json; ``--tag T``:
prune-at-scale-T.json) and RUN.profile.txt beside it.

``--model llama``: instead of the MLPs, a Llama-shaped decoder (benchmarks/llama_decoder.py: hidden 4096, FFN 11008,
32 query and 8 K/V heads of 128, fp16 weights, one dead K/V head, one lone dead query head and 15 % dead FFN
neurons per layer), one model per ``--layers`` count. Per size: the baseline; ``onnxprune prune --verify blocks``
(the CLI's block-wise check, onnxprune/verify_blocks.py, inside the measured wall time and peak RSS; the output
kept, what it deleted read from the projections' shapes); ``onnxprune prune --no-verify``; and up to
``--cli-verify-max-layers`` the prune with ``--verify whole`` (both whole models on ONNX Runtime, one after the
other). No profile. Writes prune-at-scale-llama[-TAG].json. ``--assume-finite`` prunes with that option: the lone query
heads and the down-row-zero neurons (read only by zero weights) are deleted too, so every dead unit can be.

    python -m benchmarks.prune_at_scale --model llama --layers 1 4 8               # 354 MB to 2.8 GB
    python -m benchmarks.prune_at_scale --model llama --layers 32 --tag 32L --cli-verify-max-layers 0   # 11.3 GB
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import ExternalDataWriter, machine_info, median, python_floor, run_measured
from benchmarks.store import add_results_argument, write_result

EXPERIMENT = "prune-at-scale"
QUICK_SIZES = ("20M", "60M")
ONNX_IMPORTS = "import onnx"
ONNXPRUNE_IMPORTS = "import onnxprune.cli, onnxprune.api, passes, onnx, onnxruntime, onnx_graphsurgeon, numpy"
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30}


# -- the synthetic model ---------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes of "150M", "1.6G", "512MiB" or "1000000" (K/M/G decimal, Ki/Mi/Gi binary; a trailing B is allowed)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?)?B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100M, 1.6G)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


@dataclass
class MlpShape:
    """The synthetic model's dimensions."""

    blocks: int
    hidden: int
    ffn: int
    dtype: str  # "float32" or "float16"
    seq: int
    dead: int  # dead FFN neurons per block

    @property
    def params(self) -> int:
        return self.blocks * (2 * self.hidden * self.ffn + self.ffn + self.hidden)

    @property
    def weight_bytes(self) -> int:
        return self.params * np.dtype(self.dtype).itemsize

    @property
    def removable_params(self) -> int:
        """What deleting the dead neurons removes: per dead neuron a W1 column, a b1 entry and a W2 row."""
        return self.blocks * self.dead * (2 * self.hidden + 1)


def shape_for(target_bytes: int, *, blocks: int, ffn_ratio: int, dtype: str, seq: int, dead_share: float,
              multiple: int = 32) -> MlpShape:
    """The shape whose weights come nearest ``target_bytes``: H a multiple of ``multiple``, F = ``ffn_ratio`` * H."""
    per_h2 = blocks * 2 * ffn_ratio * np.dtype(dtype).itemsize  # bytes ~ per_h2 * H^2 (biases are negligible)
    hidden = max(multiple, multiple * round(math.sqrt(target_bytes / per_h2) / multiple))
    ffn = ffn_ratio * hidden
    return MlpShape(blocks, hidden, ffn, dtype, seq, round(dead_share * ffn))


def _block_weights(shape: MlpShape, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One block's W1 [H, F], b1 [F], W2 [F, H], b2 [H] (random, scaled to keep the residual stream O(1)), and
    the indices of its dead FFN neurons (their W1 column and b1 entry zero)."""
    h, f = shape.hidden, shape.ffn
    w1 = rng.standard_normal((h, f), dtype=np.float32) * np.float32(1 / math.sqrt(h))
    b1 = rng.standard_normal(f, dtype=np.float32) * np.float32(0.1)
    dead = np.sort(rng.choice(f, shape.dead, replace=False))
    w1[:, dead] = 0
    b1[dead] = 0
    w2 = rng.standard_normal((f, h), dtype=np.float32) * np.float32(0.5 / math.sqrt(f))
    b2 = rng.standard_normal(h, dtype=np.float32) * np.float32(0.1)
    weights = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    return {k: v.astype(shape.dtype, copy=False) for k, v in weights.items()}, dead


def build_model(path: Path, shape: MlpShape, *, seed: int = 0) -> dict:
    """Write the model to ``path`` and its weights to ``path``.data, one tensor at a time (the builder holds one
    block's weights, never the model's). Returns the files' sizes and the dead neurons per block."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(shape.dtype))
    data = ExternalDataWriter(path.with_name(path.name + ".data"))
    nodes, inits, dead = [], [], []
    x = "input"
    try:
        for i in range(shape.blocks):
            weights, dead_i = _block_weights(shape, rng)
            dead.append(dead_i.tolist())
            p = f"block{i}"
            inits += [data.add(f"{p}.{k}", v) for k, v in weights.items()]
            del weights
            nodes += [
                helper.make_node("MatMul", [x, f"{p}.w1"], [f"{p}.fc1"], name=f"{p}.fc1"),
                helper.make_node("Add", [f"{p}.fc1", f"{p}.b1"], [f"{p}.fc1_bias"], name=f"{p}.fc1_bias"),
                helper.make_node("Relu", [f"{p}.fc1_bias"], [f"{p}.act"], name=f"{p}.act"),
                helper.make_node("MatMul", [f"{p}.act", f"{p}.w2"], [f"{p}.fc2"], name=f"{p}.fc2"),
                helper.make_node("Add", [f"{p}.fc2", f"{p}.b2"], [f"{p}.fc2_bias"], name=f"{p}.fc2_bias"),
                helper.make_node("Add", [x, f"{p}.fc2_bias"], [f"{p}.out"], name=f"{p}.residual"),
            ]
            x = f"{p}.out"
    finally:
        data.close()
    nodes.append(helper.make_node("Identity", [x], ["output"], name="output"))
    graph = helper.make_graph(
        nodes, "residual_mlp",
        [helper.make_tensor_value_info("input", elem, ["batch", shape.seq, shape.hidden])],
        [helper.make_tensor_value_info("output", elem, ["batch", shape.seq, shape.hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="prune_at_scale")
    model.ir_version = 8  # opset 17's IR version, which every onnxruntime of the last years loads
    path.write_bytes(model.SerializeToString())
    return {"model_bytes": path.stat().st_size + data.path.stat().st_size, "data_file_bytes": data.path.stat().st_size,
            "dead_per_block": [len(d) for d in dead]}


# -- the workers: each runs in its own interpreter, under benchmarks/peak_rss.py --------------------------------


def load_save_worker(src: str, out: str, result: str) -> None:
    """The baseline: onnx.load (external data included), then onnx.save with the weights in one external file."""
    import onnx

    t0 = time.perf_counter()
    model = onnx.load(src)
    t1 = time.perf_counter()
    onnx.save(model, out, save_as_external_data=True, all_tensors_to_one_file=True, location=Path(out).name + ".data")
    t2 = time.perf_counter()
    Path(result).write_text(json.dumps({"load": t1 - t0, "save": t2 - t1}))


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _stack(frame, depth: int = 8) -> list[str]:
    """The innermost ``depth`` frames of a stack, innermost first, as "module.function:line"."""
    out = []
    while frame is not None and len(out) < depth:
        module = frame.f_globals.get("__name__", "?")
        out.append(f"{module}.{frame.f_code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return out


def _watch_rss(step: int, rises: list, stop, main_id: int, start: float) -> None:
    """Until ``stop`` is set: each time RSS passes the highest seen by ``step``, record (s, bytes, main's stack).

    The sampler needs the GIL: while the main thread holds it in C code (protobuf parsing, say), the rise is seen
    just after, with the stack the main thread has then."""
    high = _rss_bytes()
    while not stop.wait(0.005):
        rss = _rss_bytes()
        if rss >= high + step:
            high = rss
            frame = sys._current_frames().get(main_id)
            rises.append({"t_s": round(time.perf_counter() - start, 3), "rss": rss, "stack": _stack(frame)})
            del frame  # a frame kept here would keep the main thread's locals (the graph, its arrays) alive


def profile_worker(src: str, out: str, result: str, step: int) -> None:
    """``onnxprune prune SRC -o OUT --target none`` in this interpreter under cProfile, RSS rises recorded.

    The imports are done first, outside the profile (a fixed cost, measured alone by :func:`interpreter_floor`),
    so the profile shows the work that grows with the model. Writes RESULT (JSON: the report, the rises, the
    profile's top functions as text)."""
    import cProfile
    import importlib
    import io
    import pstats
    import threading

    t0 = time.perf_counter()
    for module in ONNXPRUNE_IMPORTS.removeprefix("import ").split(", ") + ["onnxprune.latency.target", "onnxprune.table"]:
        importlib.import_module(module)
    from onnxprune.cli import main as cli_main

    report = Path(result).with_suffix(".report.json")
    rises: list[dict] = []
    stop = threading.Event()
    start = time.perf_counter()
    watcher = threading.Thread(target=_watch_rss, args=(step, rises, stop, threading.get_ident(), start), daemon=True)
    watcher.start()
    profiler = cProfile.Profile()
    profiler.enable()
    code = cli_main(["prune", src, "-o", out, "--target", "none", "-q", "--report", str(report)])
    profiler.disable()
    wall = time.perf_counter() - start
    stop.set()
    watcher.join()
    if code != 0:
        raise SystemExit(code)
    text = io.StringIO()
    for key in ("cumulative", "tottime"):
        text.write(f"== top 25 by {key} time ==\n")
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(25)
    text.write("== who calls the top 12 by own time ==\n")
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_callers(12)
    Path(result).write_text(json.dumps({"imports_s": start - t0, "main_s": wall, "rss_after_main": _rss_bytes(),
                                        "report": json.loads(report.read_text()), "rss_rises": rises,
                                        "profile": text.getvalue()}))


# -- measuring ------------------------------------------------------------------------------------------------


def _worker(*args: str) -> list[str]:
    return ["-m", "benchmarks.prune_at_scale", "--worker", *args]


def measure_baseline(src: Path, work: Path, floor: dict) -> dict:
    """onnx.load + onnx.save of ``src`` in a fresh interpreter (``floor``: the wall and RSS of its imports alone)."""
    out, res = work / "baseline" / "model.onnx", work / "baseline.json"
    out.parent.mkdir(exist_ok=True)
    wall, peak, _ = run_measured(_worker("load-save", str(src), str(out), str(res)))
    phases = json.loads(res.read_text())
    shutil.rmtree(out.parent)
    return {"wall_s": wall, "peak_rss": peak, "phases_s": phases, "uncovered_s": wall - sum(phases.values()),
            "uncovered_beyond_imports_s": wall - sum(phases.values()) - floor["wall_s"]}


def measure_prune(src: Path, work: Path, *, verify: bool | str, floor: dict, keep: bool = False,
                  extra: tuple[str, ...] = ()) -> dict:
    """``onnxprune prune --target none`` (``--no-verify`` unless ``verify``; a string: ``--verify METHOD``; ``extra``
    options) in a fresh interpreter, from its report; ``floor``: the wall and RSS of its imports alone (the uncovered
    time beyond them is also given). ``keep``: the output stays in WORK/pruned (its path under "output")."""
    out, report = work / "pruned" / "model.onnx", work / "report.json"
    out.parent.mkdir(exist_ok=True)
    args = ["-m", "onnxprune", "prune", str(src), "-o", str(out), "--target", "none", "--report", str(report), "-q",
            *extra]
    checks = ["--verify", verify] if isinstance(verify, str) else [] if verify else ["--no-verify"]
    wall, peak, _ = run_measured(args + checks)
    rep = json.loads(report.read_text())
    phases = {k: v for k, v in rep["timings_s"].items() if k != "total"}
    output_bytes = sum(p.stat().st_size for p in out.parent.iterdir())
    if not keep:
        shutil.rmtree(out.parent)
    uncovered = wall - sum(phases.values())
    imports_covered = "startup" in phases  # the command times its own start-up (interpreter and imports)
    return {
        "wall_s": wall, "peak_rss": peak, "phases_s": phases, "uncovered_s": uncovered,
        "uncovered_beyond_imports_s": uncovered - (0.0 if imports_covered else floor["wall_s"]),
        "passes_s": _pass_seconds(rep["passes"]),
        "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
        "removed_params": rep["before"]["params"] - rep["after"]["params"], "output_bytes": output_bytes,
        "verification": rep.get("verification"), **({"output": str(out)} if keep else {}),
        "engine_kept": _engine_reasons(rep),
    }


def _engine_reasons(rep: dict) -> dict:
    """What the engine kept and why, from its report, layer names taken out: {reason: dead channels kept} and
    {barrier reason: nodes}."""
    def generic(text: str) -> str:
        return re.sub(r"layers\.\d+\.", "layers.N.", re.sub(r"block\d+\.", "blockN.", text))

    kept: dict[str, int] = {}
    for g in rep.get("groups", []):
        for why, n in g.get("kept_dead", {}).items():
            kept[generic(why)] = kept.get(generic(why), 0) + n
    barriers: dict[str, int] = {}
    for node, why in rep.get("barriers", {}).items():
        key = f"{generic(node)}: {why}"
        barriers[key] = barriers.get(key, 0) + 1
    return {"dead_kept": kept, "barriers": barriers}


def _pass_seconds(passes: list[dict]) -> dict[str, float]:
    """Seconds per pass name (a pass that runs twice, e.g. infer-shapes, summed)."""
    out: dict[str, float] = {}
    for p in passes:
        out[p["name"]] = out.get(p["name"], 0.0) + p["seconds"]
    return out


def interpreter_floor(code: str) -> dict:
    """Wall and peak RSS of a fresh interpreter running only ``code`` (the imports): what every run pays first."""
    wall, rss = python_floor(code)
    return {"wall_s": wall, "peak_rss": rss}


def _summary(runs: list[dict]) -> dict:
    """Medians over repeated runs (one run: itself), the runs kept beside."""
    if len(runs) == 1:
        return dict(runs[0])
    out = {k: median([r[k] for r in runs]) for k in ("wall_s", "peak_rss", "uncovered_s", "uncovered_beyond_imports_s")}
    out["phases_s"] = {k: median([r["phases_s"][k] for r in runs]) for k in runs[0]["phases_s"]}
    out.update({k: v for k, v in runs[0].items() if k not in out})
    out["runs"] = runs
    return out


@dataclass
class Variant:
    """One way of running the prune: with the ONNX Runtime check or without."""

    key: str
    verify: bool


VARIANTS = (Variant("prune", True), Variant("prune_no_verify", False))


def _build(folder: Path, builder, shape, seed: int) -> tuple[Path, Path, dict, float]:
    """Build a model of ``shape`` into FOLDER/model.onnx with ``builder``: (folder, model path, what the builder
    returns, seconds it took)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "model.onnx"
    t = time.perf_counter()
    built = builder(src, shape, seed=seed)
    return folder, src, built, time.perf_counter() - t


def measure_size(label: str, target: int, args: argparse.Namespace, work: Path, floors: dict) -> dict:
    """Build one model, then time the baseline and each prune variant on it (``floors``: :func:`interpreter_floor`
    of the baseline's imports and of onnxprune's)."""
    shape = shape_for(target, blocks=args.blocks, ffn_ratio=args.ffn_ratio, dtype=args.dtype, seq=args.seq,
                      dead_share=args.dead)
    folder, src, built, build_s = _build(work / label, build_model, shape, args.seed)
    print(f"[{label}] {shape.blocks} blocks, H {shape.hidden}, F {shape.ffn}, {shape.dtype}: "
          f"{built['model_bytes'] / 1e6:.0f} MB, {shape.params / 1e6:.1f} M parameters (built in {build_s:.1f} s)")
    entry = {"size": label, "target_bytes": target, "shape": asdict(shape), "model_bytes": built["model_bytes"],
             "params": shape.params, "dead_neurons": shape.blocks * shape.dead,
             "expected_removed_params": shape.removable_params, "build_s": build_s}
    entry["baseline"] = _summary([measure_baseline(src, folder, floors["onnx"]) for _ in range(args.repeats)])
    _print_run(label, "load+save", entry["baseline"])
    for variant in VARIANTS:
        runs = [measure_prune(src, folder, verify=variant.verify, floor=floors["onnxprune"]) for _ in range(args.repeats)]
        entry[variant.key] = _summary(runs)
        entry[variant.key]["removed_every_dead_neuron"] = entry[variant.key]["removed_params"] == shape.removable_params
        _print_run(label, variant.key, entry[variant.key])
        if not entry[variant.key]["removed_every_dead_neuron"]:
            print(f"[{label}] warning: {variant.key} removed {entry[variant.key]['removed_params']} parameters, "
                  f"not the {shape.removable_params} of the dead neurons")
    entry["ratios"] = _ratios(entry, floors)
    if not args.keep_work:
        shutil.rmtree(folder)
    return entry


def _ratios(entry: dict, floors: dict) -> dict:
    """Prune against the baseline, and peak RSS against the model's bytes (whole, and above the imports' RSS)."""
    base, size = entry["baseline"], entry["model_bytes"]
    out = {"baseline_rss_over_model": base["peak_rss"] / size,
           "baseline_rss_above_imports_over_model": (base["peak_rss"] - floors["onnx"]["peak_rss"]) / size}
    for variant in VARIANTS:
        run = entry[variant.key]
        out[f"{variant.key}_wall_over_baseline"] = run["wall_s"] / base["wall_s"]
        out[f"{variant.key}_rss_over_baseline"] = run["peak_rss"] / base["peak_rss"]
        out[f"{variant.key}_rss_over_model"] = run["peak_rss"] / size
        out[f"{variant.key}_rss_above_imports_over_model"] = (run["peak_rss"] - floors["onnxprune"]["peak_rss"]) / size
    return out


def _print_run(label: str, what: str, run: dict) -> None:
    phases = ", ".join(f"{k} {v:.2f}" for k, v in run["phases_s"].items())
    print(f"[{label}] {what}: {run['wall_s']:.2f} s, peak {run['peak_rss'] / 1e6:.0f} MB; {phases}; "
          f"uncovered {run['uncovered_s']:.2f} s ({run['uncovered_beyond_imports_s']:.2f} s beyond the imports)")


def profile_size(label: str, target: int, args: argparse.Namespace, work: Path, profile_path: Path) -> dict:
    """cProfile (and RSS rises) of one prune with verification; the text report to ``profile_path``."""
    shape = shape_for(target, blocks=args.blocks, ffn_ratio=args.ffn_ratio, dtype=args.dtype, seq=args.seq,
                      dead_share=args.dead)
    folder = work / f"profile-{label}"
    folder.mkdir(parents=True, exist_ok=True)
    src, res = folder / "model.onnx", folder / "profile.json"
    built = build_model(src, shape, seed=args.seed)
    step = max(8 << 20, built["model_bytes"] // 20)  # a rise of 5 % of the model (at least 8 MiB) is recorded
    wall, peak, _ = run_measured(_worker("profile", str(src), str(folder / "out.onnx"), str(res), str(step)))
    prof = json.loads(res.read_text())
    rises = [{**r, "rss_over_model": r["rss"] / built["model_bytes"]} for r in prof["rss_rises"]]
    # what the interpreter spent outside the imports and the command: start-up, this module, tear-down at exit
    prof["outside_s"] = wall - prof["imports_s"] - prof["main_s"]
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    profile_path.write_text(_profile_text(label, shape, built, wall, peak, prof, rises))
    if not args.keep_work:
        shutil.rmtree(folder)
    print(f"[profile {label}] {wall:.2f} s under cProfile, peak {peak / 1e6:.0f} MB; wrote {profile_path}")
    return {"size": label, "model_bytes": built["model_bytes"], "wall_s": wall, "peak_rss": peak,
            "imports_s": prof["imports_s"], "command_s": prof["main_s"], "outside_s": prof["outside_s"],
            "phases_s": prof["report"]["timings_s"], "rss_after_command": prof["rss_after_main"], "file": profile_path.name,
            "rss_rises": rises}


def _profile_text(label: str, shape: MlpShape, built: dict, wall: float, peak: int, prof: dict, rises: list) -> str:
    head = (f"onnxprune prune --target none under cProfile: {label} ({shape.blocks} blocks, H {shape.hidden}, "
            f"F {shape.ffn}, {shape.dtype}, {built['model_bytes'] / 1e6:.0f} MB)\n"
            f"wall {wall:.2f} s (cProfile slows Python code): imports {prof['imports_s']:.2f} s (not profiled), "
            f"the command {prof['main_s']:.2f} s, interpreter start-up and exit {prof['outside_s']:.2f} s; "
            f"peak RSS {peak / 1e6:.0f} MB\nphases the report times: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in prof["report"]["timings_s"].items())
            + f" (the command's time outside them: {prof['main_s'] - sum(prof['report']['timings_s'].values()):.2f} s)\n\n")
    lines = [f"{r['t_s']:8.2f} s {r['rss'] / 1e6:8.0f} MB ({r['rss_over_model']:.2f}x model)  "
             + " < ".join(r["stack"][:5]) for r in rises]
    return head + prof["profile"] + "== RSS rises (time, RSS, main thread's innermost frames) ==\n" + "\n".join(lines) + "\n"


# -- the Llama-shaped decoder (--model llama) ------------------------------------------------------------------


def llama_shape(layers: int, args: argparse.Namespace):
    from benchmarks.llama_decoder import LlamaShape

    return LlamaShape(layers=layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads, kv_heads=args.kv_heads,
                      head_dim=args.head_dim, seq=args.seq, dead_ffn=args.dead_ffn,
                      dead_query_heads=args.dead_query_heads, rotary=args.rotary)


def llama_config(args: argparse.Namespace) -> dict:
    return {"model": "llama", "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "seq": args.seq, "rotary": args.rotary,
            "dtype": "float16", "dead_ffn": args.dead_ffn, "dead_query_heads": args.dead_query_heads,
            "cli_verify_max_layers": args.cli_verify_max_layers, "repeats": args.repeats, "seed": args.seed,
            "command": "onnxprune prune IN -o OUT --target none [--no-verify]" + _finite(args),
            "norms": "RMSNorm in float32 (Cast up, Pow, ReduceMean, Add eps, Sqrt, Div, Cast down, Mul by the fp16 "
                     "weight); softmax in float32; everything else float16"}


def _finite(args: argparse.Namespace) -> str:
    """The command's --assume-finite, where the run passes it."""
    return " --assume-finite" if args.assume_finite else ""


def _failed_prune(exc: Exception) -> dict:
    text = str(exc)
    return {"failed": text[-1500:], "out_of_memory": "Killed" in text or "(-9)" in text or "MemoryError" in text}


def measure_llama(layers: int, args: argparse.Namespace, work: Path, floors: dict) -> dict:
    """Build the decoder with ``layers`` layers; time the baseline, ``onnxprune prune --verify blocks`` (its output
    read for what was deleted) and ``--no-verify``; and, up to --cli-verify-max-layers, ``--verify whole``."""
    from benchmarks.llama_decoder import build_llama

    shape = llama_shape(layers, args)
    label = f"{layers}L"
    folder, src, built, build_s = _build(work / label, build_llama, shape, args.seed)
    print(f"[{label}] decoder, {layers} layers, H {shape.hidden}, F {shape.ffn}, {shape.heads}/{shape.kv_heads} "
          f"heads of {shape.head_dim}, rotary {'on' if shape.rotary else 'off'}: {built['model_bytes'] / 1e6:.0f} MB, "
          f"{shape.params / 1e6:.1f} M parameters (built in {build_s:.1f} s)")
    entry = {"size": label, "layers": layers, "shape": asdict(shape), "model_bytes": built["model_bytes"],
             "params": shape.params, "dead_per_layer": built["dead_per_layer"][0] | {"layer": 0},
             "dead_units": _dead_units(shape), "dead_params_by_kind": shape.expected_removed(), "build_s": build_s}
    entry["baseline"] = _summary([measure_baseline(src, folder, floors["onnx"]) for _ in range(args.repeats)])
    _print_run(label, "load+save", entry["baseline"])
    _measure_blocks_prune(entry, src, folder, args, floors)
    entry["prune_no_verify"] = _summary([measure_prune(src, folder, verify=False, floor=floors["onnxprune"],
                                                       extra=_extra(args))
                                         for _ in range(args.repeats)])
    _print_run(label, "prune_no_verify", entry["prune_no_verify"])
    if layers <= args.cli_verify_max_layers:
        entry["prune"] = _try_prune(src, folder, args, floors, "whole")
        if "wall_s" in entry["prune"]:
            _print_run(label, "prune --verify whole", entry["prune"])
    else:
        entry["prune"] = {"skipped": f"more than --cli-verify-max-layers {args.cli_verify_max_layers} layers"}
    entry["ratios"] = _llama_ratios(entry)
    if not args.keep_work:
        shutil.rmtree(folder)
    return entry


def _extra(args: argparse.Namespace) -> tuple[str, ...]:
    """Options the llama runs pass to every prune."""
    return ("--assume-finite",) if args.assume_finite else ()


def _try_prune(src: Path, folder: Path, args: argparse.Namespace, floors: dict, verify: str, *, keep: bool = False) -> dict:
    """``onnxprune prune --verify VERIFY`` measured (median of --repeats), or what failed (out of memory, say)."""
    try:
        return _summary([measure_prune(src, folder, verify=verify, floor=floors["onnxprune"], keep=keep,
                                       extra=_extra(args)) for _ in range(args.repeats)])
    except RuntimeError as exc:
        shutil.rmtree(folder / "pruned", ignore_errors=True)
        failed = _failed_prune(exc)
        print(f"[{folder.name}] prune --verify {verify} failed: {failed['failed'][-300:]}")
        return failed


def _measure_blocks_prune(entry: dict, src: Path, folder: Path, args: argparse.Namespace, floors: dict) -> None:
    """``onnxprune prune --verify blocks`` into ``entry``: the run, its verification, what it deleted."""
    from benchmarks.llama_decoder import deleted_units, weight_widths

    label, shape = entry["size"], llama_shape(entry["layers"], args)
    run = entry["prune_verify_blocks"] = _try_prune(src, folder, args, floors, "blocks", keep=True)
    if "wall_s" not in run:
        return
    _print_run(label, "prune --verify blocks", run)
    out = Path(run.get("runs", [run])[-1]["output"])
    units = deleted_units(shape, weight_widths(out))
    entry["deleted_units"] = units
    entry["every_dead_unit_deleted"] = every_dead_unit_deleted(units["deleted"], entry["dead_units"])
    check = run["verification"]
    print(f"[{label}] deleted {units['deleted']} of the dead {entry['dead_units']}; removed {run['removed_params']} "
          f"parameters; block-wise check: {'exact' if check['ok'] else 'NOT EXACT'} ({check['blocks']} blocks, worst "
          f"{check['worst']['tensor']} {check['worst']['relative_error']:.2g} in block {check['worst']['block']})")
    shutil.rmtree(out.parent)


def every_dead_unit_deleted(deleted: dict, dead: dict) -> bool:
    """Each kind of dead unit (query heads, K/V heads, FFN neurons) deleted as often as it is dead (``deleted``
    also counts o_proj's input heads and down_proj's rows, which ``dead`` has no entry for)."""
    return all(deleted.get(kind) == count for kind, count in dead.items())


def _dead_units(shape) -> dict:
    """Dead units over the model, as deleted_units counts them: query heads (the dead K/V head's and the lone
    ones), K/V heads, FFN neurons (every kind)."""
    n = shape.layers
    return {"query_heads": n * (shape.rep + shape.dead_query_heads), "kv_heads": n,
            "ffn_neurons": n * sum(shape.dead_neurons())}


def _llama_ratios(entry: dict) -> dict:
    """Each prune variant against the baseline (wall, peak RSS), and peak RSS against the model's bytes."""
    base = entry["baseline"]
    out = {"baseline_rss_over_model": base["peak_rss"] / entry["model_bytes"]}
    for key in ("prune_verify_blocks", "prune_no_verify", "prune"):
        run = entry.get(key, {})
        if "wall_s" in run:
            out[f"{key}_wall_over_baseline"] = run["wall_s"] / base["wall_s"]
            out[f"{key}_rss_over_baseline"] = run["peak_rss"] / base["peak_rss"]
            out[f"{key}_rss_over_model"] = run["peak_rss"] / entry["model_bytes"]
    return out


def llama_table(sizes: list[dict]) -> str:
    """The printed table of a --model llama run."""
    head = ("| layers | MB | load+save s | RSS MB | prune --verify blocks s | RSS MB | x wall | x RSS | blocks | exact "
            "(worst) | --no-verify s | RSS MB | --verify whole s | RSS MB | deleted q/kv heads, neurons |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in sizes:
        b, q, r, p, v = e["baseline"], e["prune_no_verify"], e["ratios"], e["prune"], e["prune_verify_blocks"]
        d = e.get("deleted_units", {}).get("deleted", {})
        whole = (f"{p['wall_s']:.1f} | {p['peak_rss'] / 1e6:.0f}" if "wall_s" in p
                 else f"{'failed' if 'failed' in p else 'skipped'} | -")
        if "wall_s" in v:
            c = v["verification"]
            blocks = (f"{v['wall_s']:.1f} | {v['peak_rss'] / 1e6:.0f} | {r['prune_verify_blocks_wall_over_baseline']:.2f}"
                      f" | {r['prune_verify_blocks_rss_over_baseline']:.2f} | {c['blocks']} | "
                      f"{'yes' if c['ok'] else 'NO'} ({c['worst']['relative_error']:.1g})")
        else:
            blocks = "failed | - | - | - | - | -"
        rows.append(f"| {e['layers']} | {e['model_bytes'] / 1e6:.0f} | {b['wall_s']:.1f} | {b['peak_rss'] / 1e6:.0f} | "
                    f"{blocks} | {q['wall_s']:.1f} | {q['peak_rss'] / 1e6:.0f} | {whole} | "
                    f"{d.get('query_heads', '-')}/{d.get('kv_heads', '-')}, {d.get('ffn_neurons', '-')} |")
    return "\n".join(rows)


# -- the command line -----------------------------------------------------------------------------------------


def summary_table(sizes: list[dict]) -> str:
    """The printed table: per size, the baseline against each prune variant."""
    head = ("| size | MB | load+save s | RSS MB | prune s | RSS MB | x wall | x RSS "
            "| phases s (startup/load/analysis/save/check/verify/other) | uncovered s (beyond imports) "
            "| no-verify s | RSS MB | x wall | x RSS |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = ("startup", "load", "analysis+rewrite", "save", "check", "verify", "other")
    for e in sizes:
        b, p, n, r = e["baseline"], e["prune"], e["prune_no_verify"], e["ratios"]
        phases = "/".join(f"{p['phases_s'].get(k, 0):.2f}" for k in keys)
        rows.append(f"| {e['size']} | {e['model_bytes'] / 1e6:.0f} | {b['wall_s']:.2f} | {b['peak_rss'] / 1e6:.0f} | "
                    f"{p['wall_s']:.2f} | {p['peak_rss'] / 1e6:.0f} | {r['prune_wall_over_baseline']:.2f} | "
                    f"{r['prune_rss_over_baseline']:.2f} | {phases} | "
                    f"{p['uncovered_s']:.2f} ({p['uncovered_beyond_imports_s']:.2f}) | {n['wall_s']:.2f} | "
                    f"{n['peak_rss'] / 1e6:.0f} | {r['prune_no_verify_wall_over_baseline']:.2f} | "
                    f"{r['prune_no_verify_rss_over_baseline']:.2f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["100M", "400M"], help="weight bytes per model, e.g. 100M 400M 1.6G "
                    "(default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"sizes {' and '.join(QUICK_SIZES)} only (a smoke test)")
    ap.add_argument("--blocks", type=int, default=12, help="residual MLP blocks (default %(default)s)")
    ap.add_argument("--ffn-ratio", type=int, default=4, help="F = ratio * H (default %(default)s)")
    ap.add_argument("--dead", type=float, default=0.25, help="share of each block's FFN neurons dead (default %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--seq", type=int, default=16, help="the input's fixed sequence length (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each measurement (medians reported)")
    ap.add_argument("--profile", default=None, metavar="SIZE",
                    help="the size to run under cProfile (default: the smallest of --sizes; 'none': no profile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", help="the run is named prune-at-scale-TAG")
    ap.add_argument("--work", type=Path, help="folder for the models (default: a temporary one, removed after)")
    ap.add_argument("--keep-work", action="store_true", help="keep the models written (in --work)")
    llama = ap.add_argument_group("--model llama: a Llama-shaped decoder (benchmarks/llama_decoder.py)")
    ap.add_argument("--model", choices=("mlp", "llama"), default="mlp",
                    help="mlp: the residual MLPs of --sizes; llama: the decoder at each of --layers (default %(default)s)")
    llama.add_argument("--layers", type=int, nargs="+", default=[1, 4, 8], help="decoder layers per model, one "
                       "model each (default: %(default)s; 32: Llama-7B's)")
    llama.add_argument("--hidden", type=int, default=4096)
    llama.add_argument("--ffn", type=int, default=11008)
    llama.add_argument("--heads", type=int, default=32, help="query heads (default %(default)s)")
    llama.add_argument("--kv-heads", type=int, default=8, help="K/V heads (default %(default)s)")
    llama.add_argument("--head-dim", type=int, default=128)
    llama.add_argument("--rotary", action="store_true", help="rotary embedding on q and k (HF's rotate_half and "
                       "cos/sin tables; off by default)")
    llama.add_argument("--dead-ffn", type=float, default=0.15, help="share of each layer's FFN neurons dead, in three "
                       "equal kinds: up column, gate column, down row zero (default %(default)s)")
    llama.add_argument("--dead-query-heads", type=int, default=1, help="query heads per layer dead by their o_proj "
                       "rows alone, beside the dead K/V head's (default %(default)s)")
    llama.add_argument("--assume-finite", action="store_true", help="prune with --assume-finite: the lone query "
                       "heads and the down-row-zero neurons (read only by zero weights) are deleted too")
    llama.add_argument("--cli-verify-max-layers", type=int, default=8, help="also run `onnxprune prune --verify "
                       "whole` (both whole models on ONNX Runtime) up to this many layers; `--verify blocks` runs at "
                       "every size (default %(default)s)")
    add_results_argument(ap, EXPERIMENT)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = list(QUICK_SIZES)
    if not 0 <= args.dead < 1:
        ap.error("--dead must be in [0, 1)")
    if args.model == "llama" and (args.heads % args.kv_heads or args.hidden != args.heads * args.head_dim):
        ap.error("--model llama needs heads a multiple of kv-heads and hidden = heads * head-dim")
    return args


def run_name(args: argparse.Namespace) -> str:
    model = ["llama"] if args.model == "llama" else []
    return "-".join([EXPERIMENT] + model + (["quick"] if args.quick else []) + ([args.tag] if args.tag else []))


def main(argv: list[str] | None = None) -> None:
    """Build each size, measure it, profile one, write the result and print the table."""
    args = parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "load-save":
            load_save_worker(*rest)
        else:
            profile_worker(*rest[:3], int(rest[3]))
        return
    targets = {label: parse_size(label) for label in args.sizes}
    profile = args.profile or min(targets, key=targets.get)
    work = args.work or Path(tempfile.mkdtemp(prefix="onnxprune-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    name = run_name(args)
    try:
        floors = {"onnx": interpreter_floor(ONNX_IMPORTS), "onnxprune": interpreter_floor(ONNXPRUNE_IMPORTS)}
        print("interpreter and imports alone: " + ", ".join(f"{k} {v['wall_s']:.2f} s, {v['peak_rss'] / 1e6:.0f} MB"
                                                             for k, v in floors.items()))
        if args.model == "llama":
            sizes = [measure_llama(n, args, work, floors) for n in args.layers]
            prof = None
        else:
            sizes = [measure_size(label, target, args, work, floors) for label, target in targets.items()]
            prof = None
        if args.model == "mlp" and profile.lower() != "none":
            prof = profile_size(profile, parse_size(profile), args, work, args.results / f"{name}.profile.txt")
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    if args.model == "llama":
        result = {"benchmark": EXPERIMENT, "machine": machine_info(), "config": llama_config(args),
                  "interpreter_floor": floors, "sizes": sizes, "profile": None}
        path = write_result(args.results, name, result)
        print()
        print(llama_table(sizes))
        print(f"wrote {path}")
        return
    result = {
        "benchmark": EXPERIMENT,
        "machine": machine_info(),
        "config": {"quick": args.quick, "sizes": args.sizes, "blocks": args.blocks, "ffn_ratio": args.ffn_ratio,
                   "dead_share": args.dead, "dtype": args.dtype, "seq": args.seq, "repeats": args.repeats,
                   "seed": args.seed, "command": "onnxprune prune IN -o OUT --target none [--no-verify]"},
        "interpreter_floor": floors,
        "sizes": sizes,
        "profile": prof,
    }
    path = write_result(args.results, name, result)
    print()
    print(summary_table(sizes))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
