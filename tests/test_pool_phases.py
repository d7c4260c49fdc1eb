"""pool-phases: Conv [-> Relu] -> MaxPool(kernel = strides) computed in phases, checked on real ORT sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.api import prune_model, run_passes
from onnxprune.runtime import input_specs, make_session
from passes import PASSES, finishing, preparation
from passes.pool_phases import PoolPhasesPass
from tests.graphs import GraphBuilder, nodes_of

PRUNED_LENET5 = Path(__file__).resolve().parents[1] / "benchmarks/results/paper-table/mnist-lenet5-sbp.pruned.onnx"
PHASES = "conv+pool in phases"


def assert_same_function(a: onnx.ModelProto, b: onnx.ModelProto, rtol: float = 1e-5, seed: int = 0) -> None:
    """Equal outputs on random inputs (batch 3), relative to each output's largest magnitude."""
    sa, sb = make_session(a), make_session(b)
    rng = np.random.default_rng(seed)
    feed = {name: rng.standard_normal(shape).astype(dtype) for name, shape, dtype in input_specs(sa, symbolic_dim=3)}
    for x, y in zip(sa.run(None, feed), sb.run(None, feed), strict=True):
        assert x.shape == y.shape
        x, y = x.astype(np.float64), y.astype(np.float64)
        assert np.abs(x - y).max() <= rtol * max(np.abs(x).max(), 1e-12)


def in_phases(model: onnx.ModelProto, *, report: bool = False, first_only: bool = False, int8_kernels: bool = False):
    """The pass's result on ``model`` (the model checked on ORT by run_passes too) and the pass's record (and the
    run's report)."""
    result = run_passes(model, [PoolPhasesPass(first_only=first_only, int8_kernels=int8_kernels)])
    return (result.model, result.report.passes[-1].result) + ((result.report,) if report else ())


def conv_pool(*, k: int = 5, pads=(0, 0, 0, 0), size=(28, 28), cin: int = 1, cout: int = 3, s: int = 2,
              relu: bool = True, stride: int = 1, group: int = 1, pool_k: int | None = None, dtype=np.float32,
              batch="batch") -> onnx.ModelProto:
    """Conv cin->cout (k x k, pads, stride, group) [-> Relu] -> MaxPool(pool_k or s, stride s) -> Flatten -> Gemm."""
    b = GraphBuilder(seed=1)
    w = b.const("conv.weight", b.randn(cout, cin // group, k, k).astype(dtype))
    bias = b.const("conv.bias", b.randn(cout, scale=0.3).astype(dtype))
    h = b.node("Conv", [b.input("x", [batch, cin, *size], dtype=dtype), w, bias], name="conv", kernel_shape=[k, k],
               pads=list(pads), strides=[stride, stride], group=group if group != 1 else None)
    if relu:
        h = b.relu(h, name="relu")
    h = b.node("MaxPool", [h], name="pool", kernel_shape=[pool_k or s] * 2, strides=[s, s])
    b.node("Flatten", [h], name="flatten", outputs=["features"])
    b.output("features", dtype=dtype)
    return b.build()


def test_pass_is_registered_but_not_run_by_prune():
    assert PASSES["pool-phases"] is PoolPhasesPass
    assert not any(isinstance(p, PoolPhasesPass) for p in [*preparation(), *finishing()])


def test_pruned_lenet5_in_phases_computes_the_same_function():
    model = onnx.load(PRUNED_LENET5)
    out, result, report = in_phases(model, report=True)
    assert result.modified and result.details["rewritten"] == ["/conv1/Conv", "/conv2/Conv"]
    # the new tensors carry shapes: the phase convs' MACs (zeros included) are counted
    macs = {layer.name: layer.macs for layer in report.after.layers}
    assert macs["/conv1/Conv"] == 12 * 4 * 3 * 3 * 12 * 12 and macs["/conv2/Conv"] == 40 * 12 * 3 * 3 * 4 * 4
    assert not nodes_of(out, "MaxPool") and len(nodes_of(out, "SpaceToDepth")) == 2
    conv1 = next(n for n in out.graph.node if n.name == "/conv1/Conv")
    weights = {t.name: t for t in out.graph.initializer}
    assert list(weights[conv1.input[1]].dims) == [4 * 3, 4 * 1, 3, 3]  # 4 phases of 3 channels, 3x3 phase taps
    assert_same_function(model, out)


def test_relu_reads_the_phase_conv_so_runtimes_fuse_it():
    out, _ = in_phases(conv_pool(relu=True))
    (relu,) = nodes_of(out, "Relu")
    (conv,) = nodes_of(out, "Conv")
    (split,) = nodes_of(out, "Split")
    assert relu.input[0] == conv.output[0] and split.input[0] == relu.output[0]


@pytest.mark.parametrize("cout, outputs", [(3, 16), (5, 24), (4, 16), (8, 32)])
def test_int8_kernels_pad_the_phase_conv_to_what_ort_int8_runs_without_im2col(cout, outputs):
    model = conv_pool(cout=cout)
    out, result = in_phases(model, int8_kernels=True)
    assert result.modified
    weights = {t.name: t for t in out.graph.initializer}
    (conv,) = nodes_of(out, "Conv")
    assert weights[conv.input[1]].dims[0] == outputs
    (split,) = nodes_of(out, "Split")
    assert len(split.output) == 4 + (outputs > 4 * cout)
    assert_same_function(model, out)


def test_int8_kernels_pad_with_a_split_attribute_before_opset_13():
    model = conv_pool(cout=3)
    model.opset_import[0].version = 12
    out, _ = in_phases(model, int8_kernels=True)
    (split,) = nodes_of(out, "Split")
    assert [list(a.ints) for a in split.attribute if a.name == "split"] == [[3, 3, 3, 3, 4]]
    assert_same_function(model, out)


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("no relu", {"relu": False}),
        ("pads 1, input 16: Pad node", {"k": 3, "pads": (1, 1, 1, 1), "size": (16, 16), "cin": 2}),
        ("pads 2, conv pads in blocks", {"k": 5, "pads": (2, 2, 2, 2), "size": (12, 12)}),
        ("asymmetric pads, odd input", {"k": 3, "pads": (1, 0, 2, 1), "size": (11, 14), "cin": 2}),
        ("stride 3", {"k": 3, "pads": (1, 1, 1, 1), "size": (9, 12), "s": 3}),
        ("static batch", {"batch": 2}),
    ],
)
def test_sites_with_pads_strides_and_no_relu_compute_the_same_function(case, kwargs):
    model = conv_pool(**kwargs)
    out, result = in_phases(model)
    assert result.details["rewritten"] == ["conv"], result.details
    assert_same_function(model, out)


def test_fp16_weights_stay_fp16():
    model = conv_pool(k=3, pads=(1, 1, 1, 1), size=(8, 8), cin=2, cout=4, dtype=np.float16)
    out, result = in_phases(model)
    assert result.modified
    conv = next(n for n in out.graph.node if n.name == "conv")
    weights = {t.name: t for t in out.graph.initializer}
    assert weights[conv.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert weights[conv.input[2]].data_type == onnx.TensorProto.FLOAT16
    assert_same_function(model, out, rtol=2e-3)


def read_twice() -> onnx.ModelProto:
    """The conv's output read by its Relu and by a graph output of its own."""
    b = GraphBuilder(seed=1)
    h = b.node("Conv", [b.input("x", ["batch", 1, 8, 8]), b.const("w", b.randn(3, 1, 3, 3))], name="conv",
               kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b.node("MaxPool", [b.relu(h, name="relu")], name="pool", kernel_shape=[2, 2], strides=[2, 2], outputs=["y"])
    b.node("Sigmoid", [h], name="other", outputs=["z"])
    b.output("y", "z")
    return b.build()


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (conv_pool(pool_k=3, size=(27, 27)), "MaxPool kernel [3, 3] strides [2, 2]"),  # overlapping, as in AlexNet
        (conv_pool(stride=2, size=(32, 32)), "strides [2, 2], not 1"),
        (conv_pool(k=3, pads=(1, 1, 1, 1), cin=4, cout=4, group=2, size=(8, 8)), "grouped (group 2)"),
        (read_twice(), "not read by one node only"),
        (conv_pool(size=(29, 28)), "does not end where the pool's last window does"),
        (conv_pool(k=1, size=("h", 28)), "not static"),
    ],
    ids=["overlapping pool", "strided conv", "grouped conv", "conv output read twice", "pool drops a row",
         "dynamic height"],
)
def test_refused_sites_leave_the_graph_unchanged_and_say_why(model, reason):
    out, result = in_phases(model)
    assert not result.modified
    assert reason in result.details["refused"]["conv"], result.details
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_vgg_features_from_both_exporters_compute_the_same_function_in_phases(exporter, one_thread):
    """torchvision's VGG layers (VGG11's layout, 1/8 of its widths): 3x3 convs padded by 1, each block ending in
    MaxPool 2x2; every block's last conv goes into phases."""
    torch = pytest.importorskip("torch")
    from onnxprune.torch_export import export_onnx
    from tests.vision import import_torchvision

    vgg = import_torchvision().models.vgg
    torch.manual_seed(0)
    features = vgg.make_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"])
    model = export_onnx(features, torch.rand(1, 3, 32, 32), exporter=exporter)
    out, result = in_phases(model)
    assert len(result.details["rewritten"]) == 5 and not nodes_of(out, "MaxPool"), result.details
    assert len(nodes_of(out, "Pad")) == 5  # pads 1: each block's windows start one pixel into the padded image
    assert_same_function(model, out)


def dead_first_layer() -> onnx.ModelProto:
    """LeNet5's first layer with 13 of 16 channels dead, then a Gemm."""
    b = GraphBuilder(seed=2)
    h = b.conv(b.input("x", ["batch", 1, 28, 28]), 1, 16, k=5, pad=0, dead=range(3, 16), name="conv1")
    h = b.node("MaxPool", [b.relu(h)], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    h = b.node("Flatten", [h], name="flatten")
    b.gemm(h, 16 * 12 * 12, 10, name="fc", outputs=["logits"])
    b.output("logits")
    return b.build()


def test_first_only_computes_the_first_site_in_phases_and_leaves_the_rest():
    model = onnx.load(PRUNED_LENET5)
    out, result = in_phases(model, first_only=True)
    assert result.details["rewritten"] == ["/conv1/Conv"]
    assert "first_only" in result.details["refused"]["/conv2/Conv"]
    assert len(nodes_of(out, "SpaceToDepth")) == 1 and len(nodes_of(out, "MaxPool")) == 1
    assert_same_function(model, out)


def test_target_times_the_first_site_alone_only_where_it_differs_from_every_site():
    one_site = prune_model(conv_pool(relu=True), target="ort-cpu", threads=1, batch=4, assume_finite=True)
    names = [a["attempt"] for a in one_site.report.latency["attempts"]]
    assert not any("first conv+pool" in n for n in names), names
    two_sites = prune_model(onnx.load(PRUNED_LENET5), target="ort-cpu", threads=1, batch=4, assume_finite=True)
    names = [a["attempt"] for a in two_sites.report.latency["attempts"]]
    assert any(n.endswith("first conv+pool in phases") for n in names) and any(n.endswith(", " + PHASES) for n in names)


def test_target_times_each_candidate_in_phases_with_assume_finite():
    model = dead_first_layer()
    result = prune_model(model, target="ort-cpu", threads=1, batch=4, assume_finite=True)
    names = [a["attempt"] for a in result.report.latency["attempts"]]
    assert any(n.endswith(PHASES) for n in names), names
    assert result.report.verification is not None
    assert_same_function(model, result.model, rtol=1e-4)


def test_target_times_an_already_pruned_model_in_phases():
    """Nothing left to delete: the input itself is timed in phases beside it."""
    model = conv_pool(relu=True)
    result = prune_model(model, target="ort-cpu", threads=1, batch=4, assume_finite=True)
    attempts = result.report.latency["attempts"]
    assert [a["attempt"] for a in attempts if a["attempt"].endswith(PHASES)], attempts
    assert all(a["removed_channels"] == 0 for a in attempts)
    assert_same_function(model, result.model, rtol=1e-4)


def test_the_report_says_which_sites_each_timed_lowering_rewrote_and_why_it_left_the_others():
    model = onnx.load(PRUNED_LENET5)
    result = prune_model(model, target="ort-cpu", threads=1, batch=4, assume_finite=True)
    lowered = {a["attempt"]: a["lowering"] for a in result.report.latency["attempts"] if "lowering" in a}
    first = next(v for k, v in lowered.items() if k.endswith("first conv+pool in phases"))
    assert first == {"pass": "pool-phases", "rewritten": ["/conv1/Conv"],
                     "left": {"/conv2/Conv": "only the first site is computed in phases (first_only)"}}


def test_an_int8_target_times_phase_convs_padded_for_int8_kernels():
    from onnxprune.latency.guarantee import lowerings
    from onnxprune.latency.target import make_target

    def phase_passes(target):
        return [p for p in (lowering.make() for lowering in lowerings(target)) if isinstance(p, PoolPhasesPass)]

    assert all(p.int8_kernels for p in phase_passes(make_target("ort-cpu-int8", threads=1)))
    assert not any(p.int8_kernels for p in phase_passes(make_target("ort-cpu", threads=1)))


def test_target_does_not_try_phases_without_assume_finite():
    """A phase kernel's zeros multiply pixels the conv does not read there: 0 * inf is NaN."""
    result = prune_model(dead_first_layer(), target="ort-cpu", threads=1, batch=4)
    assert not any(a["attempt"].endswith(PHASES) for a in result.report.latency["attempts"])


def test_an_inf_pixel_gives_nan_in_phases_where_the_input_model_gives_inf():
    """Why the phase form needs finite activations: a phase kernel's zero meets the inf the original phase skips."""
    model = conv_pool(relu=True)
    weights = {t.name: t for t in model.graph.initializer}
    w = np.abs(onnx.numpy_helper.to_array(weights["conv.weight"]))
    weights["conv.weight"].CopyFrom(onnx.numpy_helper.from_array(w, "conv.weight"))
    out, _ = in_phases(model)
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    x[0, 0, 5, 5] = np.inf
    a, b = (make_session(m).run(None, {"x": x})[0] for m in (model, out))
    changed = np.isnan(a) != np.isnan(b)
    assert changed.any() and np.isposinf(a[changed]).all() and np.isnan(b[changed]).all()
