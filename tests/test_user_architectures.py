"""Architectures nobody here wrote (torchvision, timm, Hugging Face) through wrap, training steps and compress.

The cases live in benchmarks/user_architectures.py (whose run writes the table in BENCHMARKS.md):
random weights, small configurations. Each is wrapped (torch.fx or, where fx cannot trace it,
torch.export), trained for two steps, has 40 % of every gate's channels rejected, and is compressed
with each torch exporter: the pruned model must match the wrapped model in evaluation mode on
ONNX Runtime and hold fewer parameters.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import user_architectures as ua
from tests.vision import import_transformers

# (family, name, exporters in the default suite); the rest of the product runs under -m slow.
DEFAULT = {
    ("torchvision", "resnet18"): ("dynamo", "torchscript"),
    ("torchvision", "mobilenet_v3_small"): ("dynamo",),
    ("torchvision", "vit (2 layers)"): ("dynamo",),
    ("torchvision", "swin (2 stages)"): ("dynamo", "torchscript"),
    ("torchvision", "maxvit (1 stage)"): ("dynamo",),
    ("timm", "vit_tiny_patch16 (32 px, patch 8)"): ("dynamo",),
    ("timm", "convnext_atto"): ("dynamo",),
    ("timm", "coatnet_nano_rw (64 px)"): ("dynamo",),
    ("transformers", "bert (2 layers)"): ("dynamo",),
    ("transformers", "vit (2 layers)"): ("dynamo",),
    ("transformers", "gpt2 (2 layers)"): ("dynamo",),
}
# What the TorchScript exporter cannot export (BENCHMARKS.md's table has each error): torchvision's ViT
# (its fused attention op), timm's ViT (a tensor where its attention wants a bool), and models captured
# with torch.export (refused: the tracer would fix their sizes).
NO_TORCHSCRIPT = {("torchvision", "vit (2 layers)"), ("timm", "vit_tiny_patch16 (32 px, patch 8)"),
                  ("transformers", "bert (2 layers)"), ("transformers", "vit (2 layers)"),
                  ("transformers", "gpt2 (2 layers)")}


def _cases() -> list[ua.Case]:
    import_transformers()  # skips when the libraries are absent
    return ua.cases()


def _params():
    out = []
    for family, name in _cases_lazy():
        for exporter in ("dynamo",) if (family, name) in NO_TORCHSCRIPT else ("dynamo", "torchscript"):
            slow = exporter not in DEFAULT.get((family, name), ())
            marks = [pytest.mark.slow] if slow else []
            out.append(pytest.param(family, name, exporter, marks=marks, id=f"{family}-{name.split()[0]}-{exporter}"))
    return out


def _cases_lazy() -> list[tuple[str, str]]:
    """(family, name) of every case, without importing the libraries at collection time."""
    return [
        ("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small"), ("torchvision", "efficientnet_b0"),
        ("torchvision", "vit (2 layers)"), ("torchvision", "swin (2 stages)"), ("torchvision", "maxvit (1 stage)"),
        ("timm", "resnet10t"), ("timm", "convnext_atto"), ("timm", "vit_tiny_patch16 (32 px, patch 8)"),
        ("timm", "coatnet_nano_rw (64 px)"), ("transformers", "bert (2 layers)"), ("transformers", "vit (2 layers)"),
        ("transformers", "gpt2 (2 layers)"),
    ]


def test_torchscript_export_of_a_torch_export_capture_is_refused_with_one_line() -> None:
    from onnxprune.bayes.exporting import export
    from onnxprune.errors import InputError

    case = next(c for c in _cases() if (c.family, c.name) == ("transformers", "bert (2 layers)"))
    torch.manual_seed(0)
    wrapped = ua.wrap_case(case)
    with pytest.raises(InputError, match="exporter=.dynamo"):
        export(wrapped, (case.example(),), exporter="torchscript")


def test_case_list_matches_the_benchmark() -> None:
    assert [(c.family, c.name) for c in _cases()] == _cases_lazy()


def test_the_product_spans_ten_architectures_three_transformers_and_a_hybrid() -> None:
    kinds = [c.kind for c in _cases()]
    assert len(kinds) >= 10 and kinds.count("transformer") >= 3 and "hybrid" in kinds
    assert len(DEFAULT) >= 10  # ten of them in the default suite, the rest under -m slow
    assert {c.family for c in _cases()} == {"torchvision", "timm", "transformers"}


@pytest.mark.parametrize(("family", "name", "exporter"), _params())
def test_pruned_model_matches_the_wrapped_model_and_is_smaller(family: str, name: str, exporter: str, one_thread) -> None:
    case = next(c for c in _cases() if (c.family, c.name) == (family, name))
    row = ua.run_case(case, exporter)
    assert "error" not in row, row.get("traceback", row.get("error"))
    assert row["gates"] > 0
    assert row["max_abs_diff"] <= 1e-4 * max(1.0, row["scale"]), row
    assert row["params_pruned"] < row["params_gated"], row
