"""int8-movement: a QDQ model's activations kept int8 through ops that only move or compare values, checked on
real ORT sessions (outputs bit-identical to the QDQ model the quantizer wrote)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.graphio import to_graph, to_model
from onnxprune.quantization import quantize_static_int8, random_feeds
from onnxprune.runtime import input_specs, make_session
from passes import PASSES
from passes.int8_movement import Int8MovementPass
from passes.pool_phases import PoolPhasesPass
from tests.graphs import GraphBuilder, nodes_of
from tests.test_pool_phases import PRUNED_LENET5, conv_pool


def moved(model: onnx.ModelProto):
    """The pass's output model and result."""
    graph = to_graph(model)
    result = Int8MovementPass()(graph)
    return to_model(graph, model), result


def outputs(model: onnx.ModelProto, batch: int = 3, seed: int = 0) -> list[np.ndarray]:
    session = make_session(model)
    rng = np.random.default_rng(seed)
    feed = {name: rng.random(shape).astype(dtype) for name, shape, dtype in input_specs(session, symbolic_dim=batch)}
    return session.run(None, feed)


def in_phases_quantized(model: onnx.ModelProto, keep_int8: bool) -> onnx.ModelProto:
    graph = to_graph(model)
    assert PoolPhasesPass(int8_kernels=True)(graph).modified
    phased = to_model(graph, model)
    return quantize_static_int8(phased, random_feeds(phased, 8, 2), keep_int8=keep_int8)


def float_readers(model: onnx.ModelProto, op: str) -> int:
    """How many inputs of ``op`` nodes a DequantizeLinear writes (data the op reads as float32)."""
    dequantized = {t for n in model.graph.node if n.op_type == "DequantizeLinear" for t in n.output}
    return sum(t in dequantized for n in nodes_of(model, op) for t in n.input)


def test_pass_is_registered():
    assert PASSES["int8-movement"] is Int8MovementPass


def test_lenet5_in_phases_runs_space_to_depth_split_and_max_on_int8_with_identical_outputs():
    quantized = in_phases_quantized(onnx.load(PRUNED_LENET5), keep_int8=False)
    assert float_readers(quantized, "Max") == 8
    out, result = moved(quantized)
    assert result.modified and result.details["order_in_int8"] == 2
    assert float_readers(out, "Max") == float_readers(out, "SpaceToDepth") == float_readers(out, "Split") == 0
    # what is quantized is the input and the layers' outputs (which ORT fuses into them), nothing dequantized
    producers = {t: n.op_type for n in out.graph.node for t in n.output}
    assert {producers.get(n.input[0], "input") for n in nodes_of(out, "QuantizeLinear")} == {"input", "Conv", "Gemm"}
    for a, b in zip(outputs(quantized, 16), outputs(out, 16), strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantize_static_int8_keeps_int8_through_moves_by_default():
    quantized = in_phases_quantized(conv_pool(cout=3), keep_int8=True)
    assert float_readers(quantized, "Max") == 0
    np.testing.assert_array_equal(outputs(quantized)[0], outputs(in_phases_quantized(conv_pool(cout=3), False))[0])


def qdq_max(scales: tuple[float, float], zero_points: tuple[int, int] = (0, 0)) -> onnx.ModelProto:
    """x -> Q -> DQ (scale a) and x -> Q -> DQ (scale b) -> Max -> y."""
    b = GraphBuilder(opset=17)
    x = b.input("x", ["n", 4])
    parts = []
    for k, (scale, zero) in enumerate(zip(scales, zero_points, strict=True)):
        s, z = b.const(f"s{k}", np.float32(scale)), b.const(f"z{k}", np.uint8(zero))
        q = b.node("QuantizeLinear", [x, s, z], name=f"q{k}")
        parts.append(b.node("DequantizeLinear", [q, s, z], name=f"dq{k}"))
    b.node("Max", parts, name="max", outputs=["y"])
    b.output("y")
    return b.build()


def test_max_of_inputs_with_one_scale_runs_on_int8():
    model = qdq_max((0.05, 0.05))
    out, result = moved(model)
    assert result.details["order_in_int8"] == 1 and float_readers(out, "Max") == 0
    np.testing.assert_array_equal(outputs(model)[0], outputs(out)[0])


@pytest.mark.parametrize("scales, zero_points", [((0.05, 0.1), (0, 0)), ((0.05, 0.05), (0, 3))])
def test_max_of_differently_quantized_inputs_stays_float(scales, zero_points):
    out, result = moved(qdq_max(scales, zero_points))
    assert not result.modified and float_readers(out, "Max") == 2


def test_a_per_axis_dequantize_is_not_moved():
    b = GraphBuilder(opset=17)
    q = b.const("q", np.arange(12, dtype=np.int8).reshape(3, 4))
    w = b.node("DequantizeLinear", [q, b.const("s", np.full(3, 0.1, np.float32)), b.const("z", np.zeros(3, np.int8))],
               name="dq", axis=0)
    b.node("Transpose", [w], name="t", perm=[1, 0], outputs=["y"])
    b.output("y")
    _, result = moved(b.build())
    assert not result.modified


def test_a_graph_output_written_by_a_move_keeps_its_name_and_values():
    b = GraphBuilder(opset=17)
    s, z = b.const("s", np.float32(0.02)), b.const("z", np.uint8(10))
    dq = b.node("DequantizeLinear", [b.node("QuantizeLinear", [b.input("x", ["n", 2, 3]), s, z], name="q"), s, z],
                name="dq")
    b.node("Flatten", [dq], name="flatten", outputs=["y"])
    b.output("y")
    model = b.build()
    out, result = moved(model)
    assert result.details["dequantize_later"] == 1
    assert [o.name for o in out.graph.output] == ["y"] and nodes_of(out, "DequantizeLinear")[0].output[0] == "y"
    np.testing.assert_array_equal(outputs(model)[0], outputs(out)[0])


def torchvision_vgg_in_phases(exporter: str) -> onnx.ModelProto:
    """torchvision's VGG layers (1/8 of VGG11's widths) then a classifier, every block's last conv in phases."""
    torch = pytest.importorskip("torch")
    from onnxprune.torch_export import export_onnx
    from tests.vision import import_torchvision

    vgg = import_torchvision().models.vgg
    torch.manual_seed(0)
    net = torch.nn.Sequential(vgg.make_layers([8, "M", 16, "M", 32, "M"]), torch.nn.Flatten(), torch.nn.Linear(512, 10))
    model = export_onnx(net.eval(), torch.rand(1, 3, 32, 32), exporter=exporter)
    graph = to_graph(model)
    assert PoolPhasesPass(int8_kernels=True)(graph).modified
    return to_model(graph, model)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torchvision_layers_in_phases_from_both_exporters_keep_int8_with_identical_outputs(exporter, one_thread):
    model = torchvision_vgg_in_phases(exporter)
    feeds = random_feeds(model, 4, 2)
    plain = quantize_static_int8(model, feeds, keep_int8=False)
    kept = quantize_static_int8(model, feeds)
    assert float_readers(plain, "Max") > 0 and float_readers(kept, "Max") == 0
    for a, b in zip(outputs(plain, 4), outputs(kept, 4), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_timm_vit_keeps_its_outputs_when_its_reshapes_and_transposes_run_on_int8(exporter, one_thread):
    """A ViT's attention reshapes, transposes and splits its activations: quantized statically, the moves leave
    every output bit-identical."""
    torch = pytest.importorskip("torch")
    from onnxprune.torch_export import export_onnx
    from tests.vision import import_timm

    torch.manual_seed(0)
    vit = import_timm().create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                                     num_classes=10).eval()
    model = export_onnx(vit, torch.rand(1, 3, 32, 32), exporter=exporter)
    feeds = random_feeds(model, 1, 2)
    plain = quantize_static_int8(model, feeds, keep_int8=False)
    graph = to_graph(plain)
    result = Int8MovementPass()(graph)
    kept = to_model(graph, plain)
    for a, b in zip(outputs(plain, 1), outputs(kept, 1), strict=True):
        np.testing.assert_array_equal(a, b)
    assert result.details["dequantize_later"] > 10 and result.details["pairs_removed"] > 10
