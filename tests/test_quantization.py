"""onnxprune.quantization: the shared int8 settings, and a quantizer that keeps quiet."""

from __future__ import annotations

import onnx
import torch

import models
from onnxprune.quantization import Int8Settings, quantize_static_int8, quantized_ops, random_feeds
from onnxprune.torch_export import export_onnx


def transformer_block() -> onnx.ModelProto:
    torch.manual_seed(0)
    spec = models.REGISTRY["transformer_block"]
    return export_onnx(models.build("transformer_block").eval(), torch.rand(1, *spec.input_shape))


def test_static_int8_quantizes_the_layers_and_prints_nothing_about_layer_norm_weights(capfd):
    model = transformer_block()
    quantized = quantize_static_int8(model, random_feeds(model, 2, 2))
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(quantized_ops(quantized))
    out, err = capfd.readouterr()
    assert "out-of-range" not in err + out and "WARNING" not in err + out


def test_int8_settings_default_to_u8s8_with_reduced_range_and_say_so():
    recorded = Int8Settings().to_dict()
    assert recorded["activations"] == "uint8" and recorded["reduce_range"] and recorded["per_channel"]
