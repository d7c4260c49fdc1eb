"""int8 and float16 versions of an ONNX model, with one set of settings for deployment and for timing.

int8 is ONNX Runtime's static post-training quantization in the QDQ format: per-channel int8
weights with a reduced (7-bit) range, uint8 activations (U8S8), ranges calibrated by min/max over
the batches given. Measured on a 2-core AMD EPYC with AVX2 and no VNNI (ORT CPU, 1 thread, batch 1):
U8S8 fuses whole Conv-ReLU-Add chains into int8 kernels where S8S8 leaves many Convs dequantizing
their weights on every run (pretrained CIFAR ResNet-20: 0.71 ms against 1.40 ms with S8S8 and
1.18 ms in float32); the reduced range keeps its u8 x s8 products from saturating on such CPUs
(top-1 agreement with float32 97.0 % instead of 90.3 % on 2000 CIFAR-10 test images). Dynamic quantization (weights int8, activations
quantized at run time) is the alternative for MatMul-heavy models, where activation ranges vary
too much to fix ahead of time. float16 converts weights and compute, keeping float32 inputs and
outputs. Quantization is lossy: callers check the result on data (onnxprune.deploy).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxprune.errors import InputError

logger = logging.getLogger(__name__)

#: Ops that only a quantized model holds: `onnxprune deploy` refuses a model with any of them (quantizing twice);
#: `onnxprune prune` takes them (QDQ weights and MatMulNBits are pruned in their stored form, onnxprune.channels.stored).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd",
    "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "QOrderedMatMul",
})
#: Layers whose weights are quantized (static: and whose activations are).
INT8_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Int8Settings:
    """How a model is quantized to int8 (recorded in reports)."""

    per_channel: bool = True
    activations: str = "uint8"  # "uint8" (U8S8) or "int8" (S8S8)
    calibration: str = "minmax"  # "minmax", "entropy" or "percentile"
    reduce_range: bool = True  # 7-bit weights: keeps u8 x s8 products from saturating on CPUs without VNNI

    def to_dict(self) -> dict:
        return {"format": "QDQ", "weights": "int8", "per_channel": self.per_channel, "activations": self.activations,
                "calibration": self.calibration, "reduce_range": self.reduce_range}


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantized op types ``model`` holds (empty for a float model), subgraphs included."""
    found: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in QUANTIZED_OPS:
                found.add(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    return sorted(found)


def refuse_quantized(model: onnx.ModelProto, what: str = "the model") -> None:
    """InputError when ``model`` is already quantized (quantizing twice is never what a user wants)."""
    ops = quantized_ops(model)
    if ops:
        raise InputError(f"{what} is already quantized (it holds {', '.join(ops)}); give the float32 model")


class _QuantizerRecords(logging.Filter):
    """Takes onnxruntime.quantization's records off the root logger (it logs there, e.g. "Axis 1 is out-of-range for
    weight 'norm.weight'") and passes them to this module's logger at DEBUG: a library keeps quiet by default."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"onnxruntime{os.sep}quantization" not in record.pathname:
            return True
        logger.debug("onnxruntime.quantization: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _quantizer_logs_to_debug() -> Iterator[None]:
    records = _QuantizerRecords()
    logging.root.addFilter(records)
    try:
        yield
    finally:
        logging.root.removeFilter(records)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of input feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # pragma: no cover - calibrators that read twice are not used here
        raise NotImplementedError


def _preprocessed(model: onnx.ModelProto, folder: Path) -> Path:
    """The model after onnxruntime's quantization pre-processing (shape inference, graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, prepared = folder / "float.onnx", folder / "prepared.onnx"
    onnx.save(model, source)
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception as e:  # the optimiser refuses some graphs; quantize the model as it is then
        logger.debug("quantization pre-processing skipped: %s", e)
        return source
    return prepared


def quantize_static_int8(
    model: onnx.ModelProto,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    settings: Int8Settings = Int8Settings(),
    exclude: Sequence[str] = (),
    keep_int8: bool = True,
) -> onnx.ModelProto:
    """``model`` with its Conv/Gemm/MatMul layers (but those named in ``exclude``) in int8, QDQ, calibrated on
    ``feeds`` (input name -> batch). ``keep_int8``: activations stay int8 through ops that only move or compare
    values (passes.int8_movement; exact, and what ONNX Runtime's QDQ fusions need to keep them int8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activation = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[settings.activations]
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibration]
    with tempfile.TemporaryDirectory(prefix="onnxprune-int8-") as tmp, _quantizer_logs_to_debug():
        folder = Path(tmp)
        prepared = _preprocessed(model, folder)
        out = folder / "int8.onnx"
        quantize_static(str(prepared), str(out), _Batches(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                        activation_type=activation, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude) or None, calibrate_method=method,
                        extra_options={"CalibTensorRangeSymmetric": False})
        quantized = onnx.load(str(out))
    return int8_through_moves(quantized) if keep_int8 else quantized


def int8_through_moves(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (QDQ) with its activations kept int8 through SpaceToDepth, Split, Max and the like (exact)."""
    from onnxprune.graphio import to_graph, to_model
    from passes.int8_movement import Int8MovementPass

    graph = to_graph(model)
    result = Int8MovementPass()(graph)
    if not result.modified:
        return model
    logger.debug("int8-movement: %s", result.summary)
    return to_model(graph, model)


def quantize_dynamic_int8(model: onnx.ModelProto, *, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """``model`` with int8 weights in its MatMul/Gemm layers and activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="onnxprune-int8-") as tmp, _quantizer_logs_to_debug():
        folder = Path(tmp)
        prepared = _preprocessed(model, folder)
        out = folder / "int8.onnx"
        quantize_dynamic(str(prepared), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=False,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude) or None)
        return onnx.load(str(out))


def dynamic_int8_settings() -> dict:
    """How :func:`quantize_dynamic_int8` quantizes (recorded in reports, as Int8Settings.to_dict is)."""
    return {"format": "dynamic", "weights": "int8", "per_channel": False, "activations": "uint8, ranges at run time",
            "ops": ["MatMul", "Gemm"]}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with float16 weights and compute; its inputs and outputs stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def random_feeds(model: onnx.ModelProto, batch: int, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of uniform [0, 1) float32 inputs at ``batch``: calibration for timing, where values do
    not change an int8 kernel's speed."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [batch if i == 0 and not d.dim_value else (d.dim_value or 1) for i, d in enumerate(dims)]
    return [{name: rng.random(shape, dtype=np.float32) for name, shape in shapes.items()} for _ in range(count)]
