"""The embedded default job: a reference model with dead channels, pruned and measured."""

from __future__ import annotations

from pathlib import Path

from onnxprune.errors import InputError


def run_demo(model: str = "resnet20", fraction: float = 0.4, out_dir: str = "out/demo", seed: int = 0) -> int:
    """Build ``model`` from models/, kill ``fraction`` of each group's channels, prune, print the table."""
    try:
        import torch

        import models
    except ImportError as e:  # pragma: no cover - torch is a declared extra
        raise InputError(f"the demo needs PyTorch ({e}); install with: pip install -e '.[torch]'") from None
    from onnxprune.api import prune_model
    from onnxprune.kill import kill_channels
    from onnxprune.modelio import save_model
    from onnxprune.table import before_after_table
    from onnxprune.torch_export import export_onnx

    if model not in models.REGISTRY:
        raise InputError(f"unknown model '{model}'; known: {', '.join(models.names())}")
    if not 0.0 <= fraction < 1.0:
        raise InputError("--fraction must be in [0, 1)")
    spec = models.REGISTRY[model]
    torch.manual_seed(seed)
    net = models.build(model)
    example = torch.rand(1, *spec.input_shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/3] exporting {model} ({spec.description}) to ONNX")
    dense = export_onnx(net, example)
    print(f"[2/3] killing {fraction:.0%} of the channels of every prunable group (zero weights)")
    dead, killed = kill_channels(dense, fraction, seed=seed)
    save_model(dead, out / "dense.onnx")
    print(f"[3/3] onnxprune prune {out / 'dense.onnx'} -o {out / 'pruned.onnx'}\n")
    result = prune_model(out / "dense.onnx", output=out / "pruned.onnx")
    report = result.report
    print(before_after_table(report.before, report.after))
    worst = max(report.verification.max_relative_error.values())
    print(f"\n{report.plan.removed_channels} channels removed from {sum(1 for g in report.plan.groups if g.removed)} groups; "
          f"outputs match the input model on ONNX Runtime (max relative error {worst:.1e}).")
    print(f"wrote {out / 'dense.onnx'} and {out / 'pruned.onnx'}")
    return 0
