"""The ``onnxprune`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError
from onnxprune.heap import reuse_freed_memory

EXIT_USAGE = 2


def _explain(plan) -> str:
    from onnxprune.channels.analysis import ZERO_READ_REASON
    from onnxprune.table import format_table

    rows = []
    for d in plan.groups:
        why = [f"{d.live - d.zero_read} live"] if d.live > d.zero_read else []
        why += [f"{d.zero_read} {ZERO_READ_REASON}"] if d.zero_read else []
        why += [f"{n} dead kept: {reason}" for reason, n in sorted(d.kept_dead.items(), key=lambda kv: -kv[1])]
        rows.append([d.group.name, d.channels, d.removed, d.kept, "; ".join(why) or "-"])
    text = "Channel groups (a group is one set of channels deleted together across every tensor it reaches):\n"
    text += format_table(["group", "channels", "removed", "kept", "why kept"], rows, "lrrrl")
    barriers = plan.analysis.barriers
    if barriers:
        text += "\n\nBarriers (channels reaching these nodes are kept):\n"
        text += "\n".join(f"  {name}: {reason}" for name, reason in barriers.items())
    return text


def _write_report(path: str, report: dict) -> None:
    from onnxprune.modelio import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def _print_verification(result) -> None:
    if result is None:
        print("verification: skipped (--no-verify)")
        return
    worst = max(result.max_relative_error.values(), default=0.0)
    if result.method != "blocks":
        print(f"verification: outputs match on ONNX Runtime (whole model, {result.trials} random inputs, max relative "
              f"error {worst:.2g})")
        return
    name, err = result.worst() if result.max_relative_error else ("-", 0.0)
    print(f"verification: block by block on ONNX Runtime, every block matches ({result.blocks} block(s) on the input "
          f"model's activations, {result.trials} random inputs; worst: '{name}' in block "
          f"{result.block_of.get(name, '-')}, relative error {err:.2g})")


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def _verify_choice(args: argparse.Namespace) -> bool | str:
    """--no-verify, else the --verify method."""
    return False if args.no_verify else args.verify


class _PhaseBars:
    """A progress bar on stderr for each phase of a run that reports one (:mod:`onnxprune.progress`), cleared when
    the phase ends; none with ``quiet`` or when stderr is not a terminal (a log keeps its one-line messages)."""

    UNITS = {"save": ("B", True), "verify, block by block": ("block", False)}

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not _is_terminal(sys.stderr)
        self.bar, self.name = None, None

    def __call__(self, name: str, done: float, total: float) -> None:
        if self.quiet:
            return
        if self.bar is None or name != self.name:
            from tqdm import tqdm

            self.close()
            unit, scale = self.UNITS.get(name, ("step", False))
            self.name = name
            steps = "{desc} ({elapsed})" if total == 1 and unit == "step" else None  # a phase of one step: its time
            self.bar = tqdm(total=total, initial=done, desc=name, unit=unit, unit_scale=scale, file=sys.stderr,
                            leave=False, mininterval=0.2, bar_format=steps)
        elif done != self.bar.n or total != self.bar.total:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.name = None, None


class _MeasureBar:
    """A progress bar for measuring layer latencies, shown only when there is something to measure."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="measuring layer latencies", unit="layer", file=sys.stderr, leave=False)
        self.bar.total = max(self.bar.total, total)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _use_target_threads(args: argparse.Namespace) -> None:
    """Time on one process-wide pool (set before any session exists; see onnxprune.runtime).

    Only when this process is the ``onnxprune`` program: called with an explicit
    argv (embedded, tests) the CLI leaves process-wide runtime settings alone.
    """
    if getattr(args, "target", "none") == "ort-cpu" and getattr(args, "own_process", False):
        from onnxprune.runtime import use_global_thread_pool

        use_global_thread_pool(args.threads or os.cpu_count() or 1)


def _print_latency(latency: dict | None) -> None:
    if not latency:
        return
    m = latency["measured_ms"]
    where = f"{latency['target']} ({latency['threads']} threads, batch {latency['batch']})"
    if m.get("input") is None:
        print(f"target {where}: {latency['attempts'][-1].get('why', 'nothing to compare')}")
        return
    line = f"target {where}: {m['input']:.3g} ms -> {m['output']:.3g} ms measured side by side"
    pred = latency.get("predicted_ms")
    if pred:
        line += f" (predicted {pred['input']:.3g} -> {pred['output']:.3g} ms; deleting every dead channel: {pred['max_pruned']:.3g} ms)"
    print(line)
    if len(latency["attempts"]) > 1:
        from onnxprune.latency.planner import FALL_BACKS

        tried = "; ".join(f"{a['attempt']}: {a.get('output_ms', 0):.3g} ms" for a in latency["attempts"])
        if latency["accepted"] in {rung.label for rung in FALL_BACKS}:
            print(f"fell back to '{latency['accepted']}' (tried {tried}; input {m['input']:.3g} ms)")
        else:
            print(f"kept the fastest, '{latency['accepted']}' (timed side by side: {tried}; input {m['input']:.3g} ms)")


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux: from /proc, 10 ms resolution), or None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _whole_command_timings(timings: dict[str, float], startup: float | None, elapsed: float) -> dict[str, float]:
    """The run's phases made to add up to the command's time: ``startup`` (interpreter start and imports, when
    this process is the command) first, ``other`` (whatever no phase covers inside the run) last."""
    out = {"startup": startup} if startup is not None else {}
    out.update(timings)
    out["other"] = max(0.0, elapsed - sum(timings.values()))
    return out


def cmd_prune(args: argparse.Namespace) -> int:
    import time

    from onnxprune.api import prune_model
    from onnxprune.table import before_after_table

    startup = seconds_since_process_start() if args.own_process else None
    start = time.perf_counter()
    _use_target_threads(args)
    bar, phases = _MeasureBar(args.quiet), _PhaseBars(args.quiet)
    try:
        result = prune_model(
            args.input, output=args.output, target=args.target, threads=args.threads, batch=args.batch,
            round_to_n=args.round_to, verify=_verify_choice(args), measure_progress=bar, on_phase=phases,
            assume_finite=args.assume_finite,
        )
    finally:
        bar.close()
        phases.close()
    report = result.report
    report.timings = _whole_command_timings(report.timings, startup, time.perf_counter() - start)
    if not args.quiet:
        print(before_after_table(report.before, report.after))
        print()
        removed = report.plan.removed_channels if report.plan else 0
        print(f"removed {removed} channel(s); wrote {args.output}")
        _print_verification(report.verification)
        _print_latency(report.latency)
        for note in report.notes:
            print(f"note: {note}")
        t = report.timings
        print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    if args.explain:
        print()
        print(_explain(report.plan))
    if args.report:
        _write_report(args.report, report.to_dict())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from onnxprune.api import group_report, inspect_model
    from onnxprune.table import format_table, human

    analysis, plan, cost, loaded = inspect_model(args.input)
    if args.json:
        print(json.dumps({"cost": cost.to_dict(), "groups": group_report(plan), "barriers": analysis.barriers}, indent=2))
        return 0
    print(f"{args.input}: {human(cost.params)} parameters, {human(cost.macs)} MACs (batch 1)")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in loaded.model.opset_import)
    print(f"IR version {loaded.model.ir_version}; opsets: {opsets}\n")
    print("Layers:")
    rows = [[layer.name, layer.op, layer.in_channels, layer.out_channels, human(layer.params), human(layer.macs)] for layer in cost.layers]
    print(format_table(["layer", "op", "in ch", "out ch", "params", "MACs"], rows, "llrrrr"))
    print()
    print(_explain(plan))
    removable = sum(d.removed for d in plan.groups)
    dead = sum(d.dead for d in plan.groups)
    print(f"\n{dead} dead channel(s); `onnxprune prune` would remove {removable}.")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from onnxprune.table import format_table
    from passes import PASSES

    rows = [
        [name, p.summary, ", ".join(sorted(p.requires)) or "-", ", ".join(sorted(p.ensures)) or "-"]
        for name, p in PASSES.items()
    ]
    print(format_table(["pass", "what it does", "requires", "ensures"], rows, "llll"))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from onnxprune.api import run_passes
    from onnxprune.table import before_after_table
    from passes import make_passes

    names = [n.strip() for n in args.passes.split(",") if n.strip()]
    if not names:
        raise OnnxPruneError("--passes needs at least one pass name (see `onnxprune passes`)")
    phases = _PhaseBars(args.quiet)
    try:
        result = run_passes(args.input, make_passes(names), output=args.output, verify=_verify_choice(args),
                            on_phase=phases)
    finally:
        phases.close()
    report = result.report
    if not args.quiet:
        for r in report.passes:
            auto = " (run to satisfy a requirement)" if r.auto else ""
            print(f"{r.name}{auto}: {r.result.summary or ('changed' if r.result.modified else 'no change')}")
        print()
        print(before_after_table(report.before, report.after))
        print(f"\nwrote {args.output}")
        _print_verification(report.verification)
    if args.report:
        _write_report(args.report, report.to_dict())
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    from onnxprune.api import inspect_model
    from onnxprune.latency.cache import LatencyCache
    from onnxprune.latency.search import choose_widths
    from onnxprune.latency.target import make_target

    _use_target_threads(args)
    target = make_target(args.target, threads=args.threads, batch=args.batch)
    if target is None:
        raise OnnxPruneError("calibrate needs a runtime target (ort-cpu or ort-cuda)")
    cache = LatencyCache(target)
    before = len(cache.entries)
    start = time.perf_counter()
    for path in args.models:
        analysis, plan, _, _ = inspect_model(path)
        bar = _MeasureBar(False)
        try:
            choice = choose_widths(analysis, plan, target, cache, progress=bar)
        finally:
            bar.close()
        pred = choice.predicted_us
        print(f"{path}: {choice.measured_layers} layer configuration(s) measured; predicted "
              f"{pred['input'] / 1000:.3g} ms as is, {pred['max_pruned'] / 1000:.3g} ms with every dead channel deleted, "
              f"{pred['output'] / 1000:.3g} ms with the chosen widths")
    cache.save()
    print(f"{len(cache.entries) - before} new entries ({len(cache.entries)} in all) in {time.perf_counter() - start:.1f} s; "
          f"cache: {cache.path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:  # pragma: no cover - torch is a declared extra
        raise OnnxPruneError("`onnxprune train` needs PyTorch: pip install -e '.[torch]'") from None
    from onnxprune.pipeline import TrainConfig, deploy_folder, deploy_summary, results_table, run

    if not args.deploy:  # ORT's quantizer opens sessions of its own, which a process-wide pool refuses
        _use_target_threads(args)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(
        model=args.model, data=args.data, data_dir=args.data_dir, out=args.output or _default_train_folder(args),
        method=args.method, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, pretrained=args.pretrained,
        batch_size=args.batch_size, lr=args.lr, gate_lr=args.gate_lr, kl_warmup_epochs=args.kl_warmup, kl_scale=args.kl_scale,
        kl_weighting=args.kl_weighting, finetune_epochs=args.finetune_epochs, seed=args.seed,
        device=device, target=args.target, threads=args.threads, progress=not args.quiet, gate_inputs=args.gate_inputs,
        gate_options={"placement": args.placement, "noise": args.noise},
        train_limit=args.train_limit, compile=False if args.no_compile else None, deploy=args.deploy,
        input_size=args.input_size, exporter=args.exporter,
    )
    report = run(cfg)
    if "rank" in report:  # a torchrun worker: rank 0 reports and writes
        return _exit_after_distributed(0)
    print()
    print(f"{cfg.model} on {cfg.data}, {cfg.method}: {report['wrapped']['kept_fraction']:.1%} of the gated channels kept; "
          f"pruned model agrees with the wrapped model on {report['pruned']['agreement_with_wrapped']:.2%} of the test set")
    print(results_table(report))
    deployed = deploy_summary(report)
    if deployed:
        print(f"\n{deployed}")
    extra = f", {deploy_folder(cfg)}/" if cfg.deploy else ""
    print(f"\nwrote {cfg.out}/: dense.onnx, gated.onnx, pruned.onnx, report.json, channels.png{extra} "
          f"({report['timings_s']['total']:.0f} s)")
    return _exit_after_distributed(0) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _default_train_folder(args: argparse.Namespace) -> str:
    """out/MODEL-DATA-METHOD, with a torchvision:NAME or timm:NAME model written torchvision-NAME (no ":" in paths)."""
    model = args.model.replace(":", "-").replace("/", "-")
    return f"out/{model}-{args.data}-{args.method}"


def _exit_after_distributed(code: int) -> int:
    """End a torchrun process now, its output flushed: gloo's worker threads can still hold tensors at
    interpreter finalisation, which then aborts (pytorch/pytorch#179291) although the work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _keep_float_choice(spec: str):
    """--keep-float: 'auto' (the runtime's default), 'none' (quantize every layer) or comma-separated node names."""
    from onnxprune.deploy.keep_float import KeepFloat

    if spec == "auto":
        return None
    if spec == "none":
        return KeepFloat()
    return [name.strip() for name in spec.split(",") if name.strip()]


def cmd_deploy(args: argparse.Namespace) -> int:
    from onnxprune.deploy.api import deploy
    from onnxprune.deploy.report import deploy_notes

    result = deploy(
        args.input, args.output, runtime=args.runtime, precision=args.precision, calibration=args.calibration,
        data_dir=args.data_dir, min_agreement=args.min_agreement, threads=args.threads, int8_mode=args.int8_mode,
        keep_float=_keep_float_choice(args.keep_float), calibration_samples=args.calibration_samples,
        check_samples=args.check_samples, timing_budget_s=args.timing_budget, batch=args.batch, report_path=args.report,
        progress=not args.quiet,
    )
    if not args.quiet:
        report = result.report
        print(result.table())
        print()
        for note in deploy_notes(report):
            print(f"note: {note}")
        print(f"wrote {result.out_dir}/: {', '.join(f.name for f in result.files)}")
    return 0


def cmd_engine_demo(args: argparse.Namespace) -> int:
    from onnxprune.demo import run_demo

    return run_demo(model=args.model, fraction=args.fraction, out_dir=args.out, seed=args.seed)


def _target_args(p: argparse.ArgumentParser, default: str = "ort-cpu", choices: Sequence[str] | None = None) -> None:
    p.add_argument("--target", default=default, choices=_targets() if choices is None else choices,
                   help="runtime to be fast on: keep dead channels where the resulting width runs faster there, and "
                        "never write a model measured slower than the input ('none': delete every dead channel; "
                        f"default {default})")
    p.add_argument("--threads", type=int, metavar="N", help="threads the target runs with (default: all cores)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="batch size to be fast at (default 1)")


def _targets() -> tuple[str, ...]:
    from onnxprune.latency.target import TARGETS

    return TARGETS


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="delete dead channels from a model", description=(
        "Delete every channel that is provably zero (or constant and foldable) from every node it reaches, "
        "verify the result on ONNX Runtime against the input, and write it atomically."))
    p.add_argument("input", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    _target_args(p)
    p.add_argument("--round-to", type=int, metavar="N",
                   help="manual override of --target: keep dead channels so every pruned layer width is a multiple of N")
    p.add_argument("--assume-finite", action="store_true",
                   help="also delete channels read only by zero weights (a zero down_proj column, o_proj rows), and "
                        "with --target also time each candidate with Conv -> MaxPool computed in phases: exact "
                        "wherever the input model's activations are finite (where one is inf or NaN the output may "
                        "be NaN)")
    p.add_argument("--explain", action="store_true", help="list, per channel group, why channels were kept")
    p.add_argument("--report", metavar="R.json", help="write a JSON report (groups, costs, timings)")
    _verify_args(p)
    p.set_defaults(func=cmd_prune)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", choices=("auto", "whole", "blocks"), default="auto",
                   help="how the result is checked against the input on ONNX Runtime: whole (both models on the same "
                        "random inputs), blocks (cut where every path crosses; each block of both models on the input "
                        "model's activations, one block's weights in memory at a time), auto (default: blocks for "
                        "256 MiB of weights or more, or when the whole check would not fit in memory)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison with the input")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors (no progress bars)")


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure layer latencies on a target for the given models (fills the cache)",
                       description="Measure, on this machine, the latency of every Conv/Gemm/MatMul of the models at the "
                                   "channel widths `onnxprune prune --target` would consider, and cache it on disk "
                                   "($ONNXPRUNE_CACHE_DIR or ~/.cache/onnxprune). `prune` measures what is missing by "
                                   "itself; calibrating first makes it fast.")
    p.add_argument("models", nargs="+", help=".onnx files whose layers to measure")
    _target_args(p, default="ort-cpu", choices=[name for name in _targets() if name != "none"])
    p.set_defaults(func=cmd_calibrate)


def _add_inspect_passes_run(sub) -> None:
    p = sub.add_parser("inspect", help="show layers, channel groups, dead channels, parameters and MACs")
    p.add_argument("input", help="input .onnx file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the graph passes `onnxprune run` can apply")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("run", help="run any sequence of passes", description=(
        "Run passes by name, in order (requirements such as shape inference are satisfied automatically), "
        "verify on ONNX Runtime and write the result atomically."))
    p.add_argument("input", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--passes", required=True, help="comma-separated pass names, e.g. fold-batchnorm,remove-identity")
    p.add_argument("--report", metavar="R.json", help="write a JSON report")
    _verify_args(p)
    p.set_defaults(func=cmd_run)


TRAIN_DESCRIPTION = (
    "The whole pipeline: dense model (trained here or --pretrained) -> Bayesian gates (--method) -> ONNX with gates "
    "folded -> onnxprune prune -> test error, parameters, MACs and ONNX Runtime latency, dense vs pruned. Defaults: "
    "LeNet5 on scikit-learn's digits (offline).")


def _add_train(sub) -> None:
    for name, help_text in (("train", "train with Bayesian channel gates, export, prune, measure (needs torch)"),
                            ("demo", "the main job on the embedded default: `onnxprune train` with its defaults "
                                     "(LeNet5, SBP, digits; about a minute on 2 cores)")):
        p = sub.add_parser(name, help=help_text, description=TRAIN_DESCRIPTION)
        _train_data_args(p)
        _train_optimizer_args(p)
        _train_gate_args(p)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
        p.add_argument("--no-compile", action="store_true",
                       help="train eagerly: no torch.compile of the step (on CUDA it is on by default; compiling takes a "
                            "minute or two, which a short run does not win back)")
        p.add_argument("-o", "--output", metavar="DIR", help="output folder (default out/MODEL-DATA-METHOD)")
        p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                       help="PyTorch's ONNX exporter for dense.onnx and gated.onnx: dynamo (torch.export, default) or "
                            "torchscript (the deprecated tracer, for models torch.export cannot capture)")
        p.add_argument("--deploy", choices=("int8", "fp16", "fp32"), default="int8" if name == "demo" else None,
                       help="also deploy pruned.onnx for ONNX Runtime in this precision (`onnxprune deploy`, calibrated "
                            "and checked on the dataset) into OUT/deploy-PRECISION/"
                            + (" (default int8)" if name == "demo" else ""))
        _target_args(p)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_train)


def _train_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lenet5", metavar="MODEL",
                   help="the architecture: a name from models/ (default lenet5), torchvision:NAME (e.g. "
                        "torchvision:resnet18) or timm:NAME (e.g. timm:resnet10t); random weights, never downloaded "
                        "(torchvision and timm: pip install 'onnxprune[vision]')")
    p.add_argument("--input-size", type=int, metavar="N",
                   help="resize every image to N x N (bilinear) before training, evaluation and export, for "
                        "architectures that need larger images than the dataset's (e.g. 224 for a ViT)")
    p.add_argument("--data", default="digits", help="mnist, fashion-mnist, cifar10 or digits (default digits, offline)")
    p.add_argument("--data-dir", help="folder holding the datasets (default $ONNXPRUNE_DATA or ../shared/data)")
    p.add_argument("--method", default="sbp", choices=("sbp", "rbp", "turbo-vbi"), help="posterior over channels (default sbp)")
    p.add_argument("--epochs", type=int, help="epochs of Bayesian training (default by dataset)")
    p.add_argument("--pretrain-epochs", type=int, help="epochs of dense training first (default by dataset; 0 with --pretrained)")
    p.add_argument("--pretrained", metavar="CKPT",
                   help="start from this PyTorch state dict instead of training the dense model (torchvision/timm: "
                        "a classifier head for another number of classes is skipped and trained here)")
    p.add_argument("--train-limit", type=int, metavar="N",
                   help="train on N training images only (a fixed random subset; for a quick trial of a setting)")


def _train_optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, as the SBP paper)")
    p.add_argument("--gate-lr", type=float, default=3e-2, help="learning rate of the gates' mu and log sigma (default 3e-2)")
    p.add_argument("--kl-warmup", type=float, default=0.0, metavar="EPOCHS", help="linear warm-up of the KL weight")
    p.add_argument("--kl-scale", type=float, default=1.0, metavar="BETA",
                   help="multiply the KL term by BETA (1: the ELBO; above 1 prunes more at some accuracy)")
    p.add_argument("--kl-weighting", choices=("none", "macs"), default="none",
                   help="macs: weight each channel's KL term by the MACs it costs, so the prior presses hardest where "
                        "the compute is (our option; docs/methods.md)")
    p.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                   help="spend the last N epochs training the gate-folded net without noise, rejected channels held "
                        "at zero (the same channels are deleted; usually recovers most of the accuracy)")


def _train_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gate-inputs", action="store_true",
                   help="also gate the input features of MLPs (as the SBP paper does for LeNet-500-300)")
    p.add_argument("--placement", choices=("output", "pre-bias"), default="output",
                   help="gate each layer's output (rejected channels are zero), or W x before its bias as the SBP "
                        "authors do (rejected channels are constants, folded into the next layer's bias)")
    p.add_argument("--noise", choices=("example", "batch"), default="example",
                   help="draw the gates once per example (default) or once per minibatch (the SBP authors')")


DEPLOY_DESCRIPTION = (
    "Convert a float32 model for an edge runtime and check it before writing anything: int8 (static post-training "
    "quantization, QDQ, per-channel int8 weights, calibrated on DATA), fp16 or fp32; for ONNX Runtime model.onnx, "
    "model.ort (ORT format for ORT Mobile) and required_operators.config (for a reduced-size build), for OpenVINO its "
    "IR (model.xml, model.bin). Every artifact is run on held-out data against the float32 input (top-1 agreement, "
    "test error with labels); below --min-agreement nothing is written and the exit code is 2. Then each is timed "
    "at --batch with 1 thread and with --threads, side by side, and DIR/deploy.json records it all.")


def _add_deploy(sub) -> None:
    from onnxprune.deploy import options

    p = sub.add_parser("deploy", help="quantize/convert for ONNX Runtime (ORT format) or OpenVINO, checked on data, timed",
                       description=DEPLOY_DESCRIPTION)
    p.add_argument("input", help="float32 .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (created, or its files replaced)")
    p.add_argument("--runtime", choices=options.RUNTIME_NAMES, default="ort", help="ort (default) or openvino")
    p.add_argument("--precision", choices=options.PRECISIONS, default="int8", help="default int8 (needs --calibration)")
    p.add_argument("--calibration", metavar="DATA",
                   help="mnist, fashion-mnist, cifar10 or digits (training split calibrates, test split checks), or an "
                        ".npz of inputs (key x or inputs; labels y or labels, optional; one fifth held out for the "
                        "check). Without it fp16/fp32 are checked on random inputs")
    p.add_argument("--data-dir", help="folder holding the datasets (default $ONNXPRUNE_DATA or ../shared/data)")
    p.add_argument("--min-agreement", type=float, default=options.MIN_AGREEMENT, metavar="F",
                   help=f"least top-1 agreement with the float32 input on held-out data (default {options.MIN_AGREEMENT})")
    p.add_argument("--threads", type=int, default=options.THREADS, metavar="N",
                   help=f"thread count of the second latency column, beside 1 thread (default {options.THREADS})")
    p.add_argument("--batch", type=int, metavar="N",
                   help="batch size to be fast at (default 1): int8 leaves in float32 the layers measured slower at "
                        "this batch, and rows are timed at it. A model whose batch is fixed at K: default K, any "
                        "other N refused")
    p.add_argument("--int8-mode", choices=options.INT8_MODES, default="auto", help=options.DYNAMIC_RULE)
    p.add_argument("--keep-float", default="auto", metavar="auto|none|NAMES",
                   help="layers int8 leaves in float32: auto (on ort: those measured slower in int8, where this onnxprune "
                        "measures it), none, or comma-separated node names")
    p.add_argument("--calibration-samples", type=int, default=options.CALIBRATION_SAMPLES, metavar="N",
                   help=f"samples that calibrate int8 (default {options.CALIBRATION_SAMPLES})")
    p.add_argument("--check-samples", type=int, metavar="N", help="held-out samples to check on (default: all)")
    p.add_argument("--timing-budget", type=float, default=options.TIMING_BUDGET_S, metavar="S",
                   help=f"seconds of timing per thread count (default {options.TIMING_BUDGET_S})")
    p.add_argument("--report", metavar="R.json", help="also write the JSON report here (it is always in DIR/deploy.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_deploy)


def _add_engine_demo(sub) -> None:
    p = sub.add_parser("engine-demo",
                       help="the pruning engine alone: a reference model with some channels zeroed, pruned (needs torch)")
    p.add_argument("--model", default="resnet20", help="a name from models/ (default resnet20)")
    p.add_argument("--fraction", type=float, default=0.4, help="fraction of channels to kill per group (default 0.4)")
    p.add_argument("--out", default="out/engine-demo", help="folder for dense.onnx and pruned.onnx (default out/engine-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_engine_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Delete provably dead channels from ONNX models: a smaller model computing the same function.",
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_prune, _add_calibrate, _add_inspect_passes_run, _add_train, _add_deploy, _add_engine_demo):
        add(sub)
    return parser


def format_warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for the user (e.g. an RBP stage too short to reject any channel), not a source trace."""
    return f"onnxprune: warning: {message}\n"


LIBRARY_LOGGERS = ("onnxprune", "passes")


@contextmanager
def user_logging(quiet: bool) -> Iterator[None]:
    """While open, the library's log records reach the terminal: INFO lines as plain text on stdout (e.g. training's
    epoch lines; none with ``quiet``), warnings as one line on stderr. Restored afterwards, so an embedding program
    keeps its own logging."""
    to_stdout = logging.StreamHandler(sys.stdout)
    to_stdout.setLevel(logging.INFO)
    to_stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    to_stdout.setFormatter(logging.Formatter("%(message)s"))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    to_stderr.setFormatter(logging.Formatter("onnxprune: warning: %(message)s"))
    handlers = [to_stderr] if quiet else [to_stdout, to_stderr]
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING if quiet else logging.INFO)
        lg.propagate = False
        for h in handlers:
            lg.addHandler(h)
    try:
        yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            for h in handlers:
                lg.removeHandler(h)
            lg.setLevel(level)
            lg.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.own_process = argv is None
    if args.own_process and args.func in (cmd_prune, cmd_run, cmd_inspect):
        reuse_freed_memory()  # a model rewrite in its own process: large arrays reuse freed memory (onnxprune/heap.py)
    try:
        with warnings.catch_warnings(), user_logging(getattr(args, "quiet", False)):
            warnings.formatwarning = format_warning_line
            return args.func(args)
    except OnnxPruneError as e:
        print(f"onnxprune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnxprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line for the user, the traceback on request
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        print(f"onnxprune: internal error: {type(e).__name__}: {e} (set ONNXPRUNE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
