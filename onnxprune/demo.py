"""The embedded default job: a reference model with dead channels, pruned and measured."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxprune.errors import InputError

logger = logging.getLogger(__name__)


def run_demo(model: str = "resnet20", fraction: float = 0.4, out_dir: str = "out/demo", seed: int = 0) -> int:
    """Build ``model`` from models/, kill ``fraction`` of each group's channels, prune, log the table.

    Progress and the before/after table go to this module's logger at INFO level (the CLI shows them on stdout).
    """
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
    logger.info("[1/3] exporting %s (%s) to ONNX", model, spec.description)
    dense = export_onnx(net, example)
    logger.info("[2/3] killing %.0f%% of the channels of every prunable group (zero weights)", fraction * 100)
    dead, killed = kill_channels(dense, fraction, seed=seed)
    save_model(dead, out / "dense.onnx")
    logger.info("[3/3] onnxprune prune %s -o %s\n", out / "dense.onnx", out / "pruned.onnx")
    result = prune_model(out / "dense.onnx", output=out / "pruned.onnx")
    report = result.report
    logger.info("%s", before_after_table(report.before, report.after))
    worst = max(report.verification.max_relative_error.values())
    groups = sum(1 for g in report.plan.groups if g.removed)
    logger.info("\n%d channels removed from %d groups; outputs match the input model on ONNX Runtime "
                "(max relative error %.1e).", report.plan.removed_channels, groups, worst)
    logger.info("wrote %s and %s", out / "dense.onnx", out / "pruned.onnx")
    return 0
