"""The ``onnxprune`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError

EXIT_USAGE = 2


def _explain(plan) -> str:
    from onnxprune.table import format_table

    rows = []
    for d in plan.groups:
        why = [f"{d.live} live"] if d.live else []
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
    print(f"verification: outputs match on ONNX Runtime ({result.trials} random inputs, max relative error {worst:.2g})")


def cmd_prune(args: argparse.Namespace) -> int:
    from onnxprune.api import prune_model
    from onnxprune.table import before_after_table

    result = prune_model(args.input, output=args.output, round_to_n=args.round_to, verify=not args.no_verify)
    report = result.report
    if not args.quiet:
        print(before_after_table(report.before, report.after))
        print()
        removed = report.plan.removed_channels if report.plan else 0
        print(f"removed {removed} channel(s); wrote {args.output}")
        _print_verification(report.verification)
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
    result = run_passes(args.input, make_passes(names), output=args.output, verify=not args.no_verify)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from onnxprune.demo import run_demo

    return run_demo(model=args.model, fraction=args.fraction, out_dir=args.out, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune",
        description="Delete provably dead channels from ONNX models: a smaller model computing the same function.",
    )
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="delete dead channels from a model", description=(
        "Delete every channel that is provably zero (or constant and foldable) from every node it reaches, "
        "verify the result on ONNX Runtime against the input, and write it atomically."))
    p.add_argument("input", help="input .onnx file (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--round-to", type=int, metavar="N", help="keep dead channels so every pruned width is a multiple of N")
    p.add_argument("--explain", action="store_true", help="list, per channel group, why channels were kept")
    p.add_argument("--report", metavar="R.json", help="write a JSON report (groups, costs, timings)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison with the input")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_prune)

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
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison with the input")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="build a reference model, kill some channels, prune it, print the table (needs torch)")
    p.add_argument("--model", default="resnet20", help="a name from models/ (default resnet20)")
    p.add_argument("--fraction", type=float, default=0.4, help="fraction of channels to kill per group (default 0.4)")
    p.add_argument("--out", default="out/demo", help="folder for dense.onnx and pruned.onnx (default out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
