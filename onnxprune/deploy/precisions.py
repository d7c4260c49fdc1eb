"""The precision step of deploy: int8 (static or dynamic), float16, or float32 as is.

int8 is static (QDQ, per-channel int8 weights, calibrated on data) unless the rule below picks
dynamic quantization: ``onnxprune.deploy.options.DYNAMIC_RULE`` says it in words for --help and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from onnxprune.deploy.keep_float import KeepFloat
from onnxprune.deploy.messages import first_line
from onnxprune.deploy.options import DYNAMIC_RULE
from onnxprune.deploy.sources import Samples
from onnxprune.errors import InputError
from onnxprune.quantization import INT8_OPS, Int8Settings, dynamic_int8_settings, quantize_dynamic_int8, quantize_static_int8, to_float16

logger = logging.getLogger(__name__)

CONV_OPS = frozenset({"Conv", "ConvTranspose"})
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
CALIBRATION_BATCH = 64


@dataclass
class Converted:
    """The model in its deployed precision, and how it got there (for the report)."""

    model: onnx.ModelProto
    precision: str
    details: dict = field(default_factory=dict)


def choose_int8_mode(model: onnx.ModelProto, requested: str, runtime: str) -> str:
    """'static' or 'dynamic': ``requested`` unless it is 'auto', then by ``DYNAMIC_RULE``."""
    if requested != "auto":
        return requested
    if runtime == "openvino":
        return "static"
    ops = {node.op_type for node in model.graph.node}
    return "dynamic" if not ops & CONV_OPS and ops & MATMUL_OPS else "static"


def calibration_feeds(samples: Samples, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """The calibration samples in batches of ``batch`` (a partial last batch only when the batch is free)."""
    count = samples.calibration_count
    for start in range(0, count, batch):
        feed = {name: x[start:start + batch] for name, x in samples.calibration.items()}
        if len(next(iter(feed.values()))) == batch or not samples.fixed_batch:
            yield feed


def _static(model: onnx.ModelProto, samples: Samples, settings: Int8Settings, kept: list[str], progress: bool):
    """Static int8 calibrated on ``samples`` (a progress bar over the calibration batches)."""
    from tqdm import tqdm

    batch = samples.fixed_batch or CALIBRATION_BATCH
    batches = -(-samples.calibration_count // batch)
    feeds = tqdm(calibration_feeds(samples, batch), total=batches, desc="calibrating int8", unit="batch",
                 disable=None if progress else True, leave=False)
    quantized = quantize_static_int8(model, feeds, settings=settings, exclude=kept)
    return quantized, {"settings": settings.to_dict(), "calibration_batches": batches, "calibration_batch_size": batch}


def _quantizer_failed(e: Exception) -> InputError:
    """A one-line InputError for a model onnxruntime's quantizer fails on."""
    import onnxruntime

    return InputError(f"onnxruntime {onnxruntime.__version__}'s quantizer fails on this model ({first_line(e)}); "
                      "try --precision fp16 or --int8-mode dynamic")


def _quantize(model: onnx.ModelProto, samples: Samples, mode: str, settings: Int8Settings, kept: list[str],
              progress: bool) -> tuple[onnx.ModelProto, dict]:
    """The int8 model and how it was made; static int8 that fails per channel is retried per tensor."""
    if mode == "dynamic":
        logger.info("int8: dynamic quantization (%d layer(s) kept in float32)", len(kept))
        return quantize_dynamic_int8(model, exclude=kept), {"settings": dynamic_int8_settings(), "calibration_batches": 0}
    try:
        return _static(model, samples, settings, kept, progress)
    except Exception as e:  # onnxruntime's quantizer raises assorted types
        if not settings.per_channel:
            raise
        logger.warning("per-channel int8 failed in onnxruntime's quantizer (%s); using per-tensor weights", first_line(e))
        quantized, how = _static(model, samples, replace(settings, per_channel=False), kept, progress)
        return quantized, {**how, "per_channel_failed": first_line(e)}


def to_int8(model: onnx.ModelProto, samples: Samples, *, mode: str, keep: KeepFloat, settings: Int8Settings,
            progress: bool = False) -> Converted:
    """``model`` quantized to int8 (``mode`` 'static' or 'dynamic'), the layers ``keep`` names left in float32.

    Where onnxruntime's quantizer fails with per-channel weights (it does on some graphs, e.g. a Conv whose bias is a
    separate Add), static int8 is retried with per-tensor weights and the report says so.
    """
    kept = keep.layers(model)
    details = {"mode": mode, "mode_rule": DYNAMIC_RULE, "layers": sum(node.op_type in INT8_OPS for node in model.graph.node),
               "layers_kept_float": kept, "keep_float": keep.describe()}
    try:
        quantized, how = _quantize(model, samples, mode, settings, kept, progress)
    except Exception as e:  # onnxruntime's quantizer raises assorted types
        raise _quantizer_failed(e) from None
    return Converted(quantized, "int8", {**details, **how})


def to_fp16(model: onnx.ModelProto, *, in_onnx: bool) -> Converted:
    """float16 weights and compute; ``in_onnx`` False leaves the graph float32 for a runtime that converts it itself."""
    if not in_onnx:
        return Converted(model, "fp16", {"conversion": "by the runtime (see its details)"})
    return Converted(to_float16(model), "fp16", {"conversion": "onnxprune.quantization.to_float16",
                                                 "weights": "float16", "compute": "float16",
                                                 "inputs_outputs": "float32"})
