"""The passes that fold a node into the layer before it (fold-batchnorm, fold-bias-add, remove-identity).

Every result is checked by ``run_passes`` on ONNX Runtime against the input model
(and again here on other random inputs), so these tests state only what must
have changed in the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxprune.api import run_passes
from onnxprune.pass_infra import GraphPass
from passes.fold_batchnorm import FoldBatchNormPass
from passes.fold_bias_add import FoldBiasAddPass
from passes.remove_identity import RemoveIdentityPass
from tests.graphs import GraphBuilder, attr, bias_of, initializers, node_named, nodes_of
from tests.prune_helpers import same_outputs

Build = Callable[[GraphBuilder, str], str]


def _folded(model: onnx.ModelProto, *passes: GraphPass) -> onnx.ModelProto:
    """The model after ``passes`` (verified on ONNX Runtime), also checked on a second random input."""
    out = run_passes(model, list(passes)).model
    onnx.checker.check_model(out, full_check=True)
    assert same_outputs(model, out, seed=3)
    return out


def _chain(input_shape: list[int], layer: Build, follower: Build) -> onnx.ModelProto:
    """x -> ``layer`` -> ``follower`` -> Relu -> y."""
    b = GraphBuilder()
    b.node("Relu", [follower(b, layer(b, b.input("x", input_shape)))], name="relu", outputs=["y"])
    b.output("y")
    return b.build()


def _layer_then(input_shape: list[int], layer: Build, follower: Build, *passes: GraphPass) -> onnx.ModelProto:
    """x -> ``layer`` -> ``follower`` -> Relu -> y, after ``passes``."""
    return _folded(_chain(input_shape, layer, follower), *passes)


def _batchnorm(channels: int) -> Build:
    return lambda b, h: b.batchnorm(h, channels, name="bn")


def _add(shape: tuple[int, ...], constant_first: bool = False) -> Build:
    def add(b: GraphBuilder, h: str) -> str:
        shift = b.const("shift", b.randn(*shape))
        return b.node("Add", [shift, h] if constant_first else [h, shift], name="add")

    return add


def test_batchnorm_folds_into_a_conv_without_bias_which_gets_one():
    out = _layer_then([1, 3, 6, 6], lambda b, x: b.conv(x, 3, 4, bias=False, name="conv"), _batchnorm(4), FoldBatchNormPass())
    assert not nodes_of(out, "BatchNormalization")
    assert list(node_named(out, "conv").input)[2] == "conv_bias"


def test_batchnorm_folds_into_a_gemm_and_its_beta_becomes_one():
    out = _layer_then([2, 5], lambda b, x: b.gemm(x, 5, 3, name="fc", beta=0.5), _batchnorm(3), FoldBatchNormPass())
    assert not nodes_of(out, "BatchNormalization")
    assert attr(node_named(out, "fc"), "beta") == 1.0


def test_batchnorm_folds_into_a_conv_transpose_along_its_output_axis():
    def upsample(b: GraphBuilder, x: str) -> str:
        weight = b.const("w", b.randn(3, 4, 2, 2))  # (in, out, kH, kW)
        return b.node("ConvTranspose", [x, weight], name="up", strides=[2, 2])

    out = _layer_then([1, 3, 4, 4], upsample, _batchnorm(4), FoldBatchNormPass())
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose", "Relu"]


def test_batchnorm_after_a_node_without_weights_stays():
    out = _layer_then([1, 3, 4, 4], lambda b, x: b.node("Sigmoid", [x], name="sigmoid"), _batchnorm(3), FoldBatchNormPass())
    assert len(nodes_of(out, "BatchNormalization")) == 1


def test_folded_bias_takes_the_slot_of_a_bias_omitted_by_an_empty_name():
    def conv(b: GraphBuilder, x: str) -> str:
        return b.node("Conv", [x, b.const("w", b.randn(4, 3, 3, 3)), ""], name="conv", pads=[1] * 4)

    out = _layer_then([1, 3, 6, 6], conv, _batchnorm(4), FoldBatchNormPass())
    assert list(node_named(out, "conv").input) == ["x", "w", "conv_bias"]


def test_per_channel_add_after_a_conv_becomes_its_bias():
    model = _chain([1, 3, 6, 6], lambda b, x: b.conv(x, 3, 4, name="conv"), _add((1, 4, 1, 1)))
    out = _folded(model, FoldBiasAddPass())
    assert not nodes_of(out, "Add")
    expected = initializers(model)["conv.bias"] + initializers(model)["shift"].reshape(-1)
    np.testing.assert_allclose(bias_of(out, "conv"), expected, rtol=1e-6)


def test_per_feature_add_after_a_gemm_with_beta_becomes_its_bias():
    gemm = lambda b, x: b.gemm(x, 5, 3, name="fc", trans_b=0, beta=2.0)  # noqa: E731
    out = _layer_then([2, 5], gemm, _add((1, 3), constant_first=True), FoldBiasAddPass())
    assert not nodes_of(out, "Add")
    assert attr(node_named(out, "fc"), "beta") == 1.0


def test_add_that_varies_over_positions_is_not_a_bias():
    out = _layer_then([1, 3, 4, 4], lambda b, x: b.conv(x, 3, 2, name="conv"), _add((1, 2, 4, 4)), FoldBiasAddPass())
    assert len(nodes_of(out, "Add")) == 1


def test_identity_is_removed_unless_it_writes_a_graph_output():
    b = GraphBuilder()
    h = b.node("Identity", [b.input("x", [1, 3])], name="inner")
    b.node("Identity", [b.node("Relu", [h], name="relu")], name="last", outputs=["y"])
    b.output("y")
    out = _folded(b.build(), RemoveIdentityPass())
    assert [n.name for n in out.graph.node] == ["relu", "last"]
