"""Exporting PyTorch models to ONNX the way onnxprune's tools and tests do (needs torch)."""

from __future__ import annotations

import io
import warnings

import onnx

DEFAULT_OPSET = 17


def export_onnx(model, example, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export ``model`` (eval mode) with one input "input" and one output "logits", batch axis dynamic.

    Uses the TorchScript-based exporter: it is fast, needs no onnxscript and
    keeps the graph close to the module structure.
    """
    import torch

    model = model.eval()
    buf = io.BytesIO()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes=axes,
            )
    return onnx.load_from_string(buf.getvalue())
