"""Users' architectures through wrap -> a few training steps -> compress, with each torch exporter.

Architectures nobody here wrote, from torchvision, timm and Hugging Face transformers, built with
random weights (no downloads; small configurations where the library allows, so the run is quick):
each is wrapped with SBP gates (torch.fx where it traces, torch.export where it does not), trained
for a few Adam steps on random data, then 40 % of every gate's channels are rejected (as a trained
posterior would) and ``onnxprune.compress`` exports and prunes it. The pruned model must match the
wrapped model in evaluation mode on ONNX Runtime and be smaller. Failures are recorded, not hidden.

    python -m benchmarks.user_architectures [--exporter dynamo torchscript] [--only NAME ...]

writes benchmarks/results/user-architectures/architectures.json (the table in BENCHMARKS.md).
tests/test_user_architectures.py runs the same cases.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "user-architectures" / "architectures.json"
REJECTED_SHARE = 0.4


class Logits(nn.Module):
    """A Hugging Face model's ``.logits`` (its forward returns a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


@dataclass(frozen=True)
class Case:
    """One architecture: its name, family, kind, a builder and an example input."""

    name: str
    family: str  # torchvision, timm, transformers
    kind: str  # cnn, transformer, hybrid
    build: Callable[[], nn.Module]
    example: Callable[[], torch.Tensor]


def _libraries():
    """torchvision, timm and transformers, imported through the test helper's shim (see tests/vision.py)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.vision import import_timm, import_torchvision, import_transformers

    return import_torchvision(), import_timm(), import_transformers()


def _image(size: int = 32) -> Callable[[], torch.Tensor]:
    return lambda: torch.rand(1, 3, size, size)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 100, (1, 8))


def cases() -> list[Case]:
    """The architectures tried, in the order of the table."""
    tv, timm, tr = _libraries()
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    def hf(config_cls, model_cls, **config):
        return lambda: Logits(model_cls(config_cls(**config)))

    return [
        Case("resnet18", "torchvision", "cnn", lambda: tv.models.resnet18(num_classes=10), _image()),
        Case("mobilenet_v3_small", "torchvision", "cnn", lambda: tv.models.mobilenet_v3_small(num_classes=10), _image()),
        Case("efficientnet_b0", "torchvision", "cnn", lambda: tv.models.efficientnet_b0(num_classes=10), _image()),
        Case("vit (2 layers)", "torchvision", "transformer",
             lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                       num_classes=10), _image()),
        Case("swin (2 stages)", "torchvision", "transformer",
             lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                                     num_classes=10), _image()),
        Case("maxvit (1 stage)", "torchvision", "hybrid",
             lambda: MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[16], block_layers=[1],
                            head_dim=8, stochastic_depth_prob=0.0, num_classes=10), _image()),
        Case("resnet10t", "timm", "cnn", lambda: timm.create_model("resnet10t", num_classes=10), _image()),
        Case("convnext_atto", "timm", "cnn", lambda: timm.create_model("convnext_atto", num_classes=10), _image()),
        Case("vit_tiny_patch16 (32 px, patch 8)", "timm", "transformer",
             lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2), _image()),
        Case("coatnet_nano_rw (64 px)", "timm", "hybrid",
             lambda: timm.create_model("coatnet_nano_rw_224", num_classes=10, img_size=64), _image(64)),
        Case("bert (2 layers)", "transformers", "transformer",
             hf(tr.BertConfig, tr.BertForSequenceClassification, vocab_size=100, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, num_labels=3), _tokens),
        Case("vit (2 layers)", "transformers", "transformer",
             hf(tr.ViTConfig, tr.ViTForImageClassification, image_size=32, patch_size=8, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=10), _image()),
        Case("gpt2 (2 layers)", "transformers", "transformer",
             hf(tr.GPT2Config, tr.GPT2LMHeadModel, vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                bos_token_id=0, eos_token_id=0), _tokens),
    ]


def wrap_case(case: Case) -> nn.Module:
    """``case``'s model wrapped with SBP gates on its example input."""
    from onnxprune.bayes import wrap

    return wrap(case.build(), (case.example(),), method="sbp")


def _train_a_little(wrapped: nn.Module, example: torch.Tensor, steps: int = 2) -> None:
    """A few Adam steps on a random batch of four (shape of ``example``), loss = mean output + KL."""
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-3)
    batch = example.repeat(4, *[1] * (example.dim() - 1))
    wrapped.train()
    for _ in range(steps):
        loss = wrapped(batch).float().mean() + wrapped.kl() / 1000
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        wrapped.clip_()


@torch.no_grad()
def reject_share(wrapped: nn.Module, share: float = REJECTED_SHARE) -> None:
    """Make each SBP gate reject the first ``share`` of its channels (mean 0, wide: low signal-to-noise)."""
    for gate in wrapped.gates.values():
        k = int(share * gate.num_channels)
        gate.mu[:k] = 0.0
        gate.log_sigma[:k] = 3.0


def parameters(model) -> int:
    """Float parameters of an ONNX model (initializers)."""
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def run_case(case: Case, exporter: str) -> dict:
    """Wrap, train, reject, compress ``case`` with ``exporter``: a table row (``error`` set on failure)."""
    import onnxruntime as ort

    from onnxprune.api import prune
    from onnxprune.bayes import wrap
    from onnxprune.bayes.exporting import export

    row: dict = {"name": case.name, "family": case.family, "kind": case.kind, "exporter": exporter}
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, example = case.build(), case.example()
        wrapped = wrap(model, (example,), method="sbp")
        timings = {"wrap": time.perf_counter() - t0}
        row.update(capture=wrapped.captured_by, gates=len(wrapped.gates), channels=sum(g.num_channels for g in wrapped.gates.values()))
        _train_a_little(wrapped, example)
        reject_share(wrapped)
        wrapped.eval()
        expected = wrapped(example).detach().float().numpy()
        dense = export(wrapped, (example,), exporter=exporter)  # compress = export, then prune
        timings["export"] = time.perf_counter() - t0 - sum(timings.values())
        pruned = prune(dense, target="none")
        timings["prune"] = time.perf_counter() - t0 - sum(timings.values())
        session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: example.numpy()})[0]
        row.update(kept=round(wrapped.kept_fraction(), 3), params_gated=parameters(dense), params_pruned=parameters(pruned),
                   max_abs_diff=float(np.abs(got - expected).max()), scale=float(np.abs(expected).max()),
                   phase_seconds={k: round(v, 1) for k, v in timings.items()})
    except Exception as exc:  # noqa: BLE001 - a failure is a row of the table
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        row["traceback"] = traceback.format_exc(limit=-3)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exporter", nargs="+", default=["dynamo", "torchscript"])
    parser.add_argument("--only", nargs="*", help="case names (substring match)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for case in cases():
        if args.only and not any(s in f"{case.family}:{case.name}" for s in args.only):
            continue
        for exporter in args.exporter:
            row = run_case(case, exporter)
            rows.append(row)
            status = row.get("error") or f"params {row['params_gated']} -> {row['params_pruned']}, diff {row['max_abs_diff']:.1e}"
            print(f"{case.family}:{case.name} [{exporter}] {row.get('capture', '-')}: {status} ({row['seconds']} s)", flush=True)
    from benchmarks.common import machine_info

    record = {"machine": machine_info(), "torch": torch.__version__,
              "rejected_share": REJECTED_SHARE, "rows": [{k: v for k, v in row.items() if k != "traceback"} for row in rows]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
