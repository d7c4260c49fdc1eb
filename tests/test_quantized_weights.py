"""Dead channels in weights stored narrow or quantized are deleted as in float32, and the weights stay so stored.

Models with dead channels are quantized the way ONNX Runtime writes them and pruned with ``target="none"``:

* static QDQ (onnxruntime.quantization through onnxprune.quantization's settings: per-channel or per-tensor int8
  weights, uint8 activations; also int4 weights, uint16 activations, ONNX Runtime's com.microsoft Q/DQ ops):
  ``DequantizeLinear`` of constant weights, a QuantizeLinear -> DequantizeLinear pair on every activation. A
  weight row is dead when it dequantizes to zero (its codes equal its zero point): a float channel that
  per-tensor quantization rounds to zero goes, one that quantizes to anything else stays. Input channels of a
  MatMul that ONNX Runtime runs as MatMulNBits (a quantized weight meeting a float or 16-bit activation, any
  4-bit weight) stay: that kernel rounds its input to int8 in blocks of them;
* ``com.microsoft.MatMulNBits`` (onnxruntime.quantization's MatMulNBitsQuantizer, 4 and 8 bits): output rows go
  with their codes, scales, packed zero points and bias; input channels go only as whole blocks;
* the same weights in QDQ int4 blocks (DequantizeLinear with block_size): rows go, the blocked input axis stays;
* float16 and bfloat16 weights, computed in their own type or cast to float32 first.

The pruned model is run on ONNX Runtime against the quantized (or narrow) model it came from. QDQ int8 layers run
as integer kernels: the kept channels' integer sums are the same numbers, and the outputs are bitwise equal; so
are those of float layers here (the deleted terms are exact zeros). Where MatMulNBits loses whole input blocks,
its kernel sums the blocks in another grouping: outputs agree to ``FLOAT_ROUNDING`` of their scale (seen: 2e-7).
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.api import prune_model
from onnxprune.errors import InputError
from onnxprune.quantization import Int8Settings, quantize_static_int8, quantized_ops, to_float16
from onnxprune.runtime import make_session

RUNTIME_ROUNDS = ("ONNX Runtime runs it as MatMulNBits, which rounds its input to int8 in blocks of input channels "
                  "(deleting some would change that rounding)")
FLOAT_ROUNDING = 1e-5  # max abs difference, relative to max(1, max |output|)
D_IN, HIDDEN, MIDDLE, D_OUT = 32, 48, 24, 8


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _model(nodes, inits: dict[str, np.ndarray], x_shape: list, y_shape: list, *, opset: int = 17,
           dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, x_shape)],
                              [helper.make_tensor_value_info("y", dtype, y_shape)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 17 else 10
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(dead1=(3, 40, *range(16, 32)), dead2=(2, 5), *, tiny=(), small=(), opset: int = 17) -> onnx.ModelProto:
    """x -> fc1 (+b1, Relu) -> fc2 (+b2, Relu) -> fc3 -> y. ``dead*``: zero weight columns and bias of fc1/fc2
    outputs. ``tiny``: fc1 outputs whose weights are 1e-6 (a per-tensor int8 code of 0), ``small``: 0.05 (a code
    of about +-3), both with bias 0."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((D_IN, HIDDEN)).astype(np.float32), rng.standard_normal(HIDDEN).astype(np.float32)
    w2, b2 = rng.standard_normal((HIDDEN, MIDDLE)).astype(np.float32), rng.standard_normal(MIDDLE).astype(np.float32)
    w3 = rng.standard_normal((MIDDLE, D_OUT)).astype(np.float32)
    for w, b, dead in ((w1, b1, dead1), (w2, b2, dead2)):
        w[:, list(dead)], b[list(dead)] = 0, 0
    for cols, size in ((tiny, 1e-6), (small, 0.05)):
        w1[:, list(cols)] = size * np.sign(rng.standard_normal((D_IN, len(cols))))
        b1[list(cols)] = 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"), helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
             helper.make_node("Add", ["m2", "b2"], ["a2"], name="add2"), helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    return _model(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3}, ["batch", D_IN], ["batch", D_OUT], opset=opset)


def cnn() -> onnx.ModelProto:
    """x -> conv1 (3x3, Relu) -> conv2 (3x3, Relu) -> GlobalAveragePool -> Flatten -> Gemm -> y; conv1's
    channels 2 and 5 and conv2's channel 1 dead."""
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2, b2 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    w3, b3 = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    w1[[2, 5]], b1[[2, 5]], w2[[1]], b2[[1]] = 0, 0, 0, 0
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"), helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"), helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc")]
    return _model(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}, ["batch", 3, 8, 8], ["batch", 4])


def feeds(model: onnx.ModelProto, count: int, batch: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random normal inputs for ``model`` (its symbolic batch axis set to ``batch``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed = {}
        for value in model.graph.input:
            dims = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
            feed[value.name] = rng.standard_normal(dims).astype(np.float32)
        out.append(feed)
    return out


def qdq(model: onnx.ModelProto, per_channel: bool) -> onnx.ModelProto:
    """Static QDQ int8 as onnxprune deploys it (per-channel or per-tensor weights, uint8 activations)."""
    return quantize_static_int8(model, feeds(model, 4, seed=1), settings=Int8Settings(per_channel=per_channel))


def ort_qdq(model: onnx.ModelProto, tmp_path, *, weights: str, exclude: list[str], contrib_ops: bool = False) -> onnx.ModelProto:
    """onnxruntime.quantization's static QDQ with per-channel ``weights`` ("int4", "int8") and uint16 activations
    (opset 21 standard ops, or ONNX Runtime's com.microsoft QuantizeLinear/DequantizeLinear)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds(model, 4, seed=1))

        def get_next(self):
            return next(self.batches, None)

    src, out = tmp_path / "float.onnx", tmp_path / "quantized.onnx"
    onnx.save(model, src)
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type={"int4": QuantType.QInt4, "int8": QuantType.QInt8}[weights], activation_type=QuantType.QUInt16,
                    nodes_to_exclude=exclude, extra_options={"UseQDQContribOps": contrib_ops})
    return onnx.load(str(out))


def nbits(model: onnx.ModelProto, *, bits: int = 4, symmetric: bool = False, qdq_format: bool = False,
          exclude: list[str] | None = None) -> onnx.ModelProto:
    """MatMul weights in blocks of 16 (MatMulNBits, or DequantizeLinear with block_size in the QDQ format)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    fmt = QuantFormat.QDQ if qdq_format else QuantFormat.QOperator
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=16, is_symmetric=symmetric, quant_format=fmt,
                                     nodes_to_exclude=exclude)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer.process()
    return quantizer.model.model


# ---------------------------------------------------------------------------------------------
# Reading the results
# ---------------------------------------------------------------------------------------------


def stored(model: onnx.ModelProto, node_name: str, index: int = 1) -> onnx.TensorProto:
    """The initializer that input ``index`` of a node is stored as: itself, or behind its DequantizeLinear or Cast."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    name = node.input[index]
    while name not in inits:
        name = producers[name].input[0]
    return inits[name]


def scale_of(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    """The scale of the DequantizeLinear that makes input ``index`` of a node."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(inits[producers[node.input[index]].input[1]])


def input_of(model: onnx.ModelProto, node_name: str, index: int) -> np.ndarray:
    """The value of a node's constant input (as numpy, through no other node)."""
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    return numpy_helper.to_array(inits[node.input[index]])


def attrs(model: onnx.ModelProto, node_name: str) -> dict:
    node = next(n for n in model.graph.node if n.name == node_name)
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def layer(model: onnx.ModelProto, op: str, contains: str) -> str:
    """The name of the ``op`` node whose name contains ``contains`` (quantizers rename layers)."""
    names = [n.name for n in model.graph.node if n.op_type == op and contains in n.name]
    assert len(names) == 1, (op, contains, names)
    return names[0]


def outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model).run(None, feed)


def assert_same(before: onnx.ModelProto, after: onnx.ModelProto, *, exact: bool) -> None:
    """Equal outputs on a fresh random batch of 3: bitwise, or to FLOAT_ROUNDING of the output scale."""
    feed = feeds(before, 1, batch=3, seed=9)[0]
    for a, b in zip(outputs(before, feed), outputs(after, feed)):
        assert a.shape == b.shape
        if exact:
            assert np.array_equal(a, b), float(np.max(np.abs(a - b)))
        else:
            assert float(np.max(np.abs(a.astype(np.float64) - b))) <= FLOAT_ROUNDING * max(1.0, float(np.max(np.abs(a))))


def pruned(model: onnx.ModelProto, **kwargs):
    """``prune_model`` with every dead channel deleted (verified on ORT against the input), checked by ONNX."""
    result = prune_model(model, target="none", **kwargs)
    onnx.checker.check_model(result.model, full_check=True)
    return result


def kept_reasons(result, group_name: str) -> dict[str, int]:
    return next(g.kept_dead for g in result.report.plan.groups if g.group.name == group_name)


# ---------------------------------------------------------------------------------------------
# QDQ
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qdq_mlp_loses_its_dead_rows_and_stays_int8(per_channel):
    q = qdq(mlp(), per_channel)
    result = pruned(q)
    out = result.model
    fc1, fc2 = layer(out, "Gemm", "fc1"), layer(out, "Gemm", "fc2")  # ORT's pre-processing fuses MatMul + Add
    assert [stored(out, fc1).dims, stored(out, fc2).dims] == [[D_IN, HIDDEN - 18], [HIDDEN - 18, MIDDLE - 2]]
    assert stored(out, fc1).data_type == TensorProto.INT8 and stored(out, fc1, 2).data_type == TensorProto.INT32
    assert scale_of(out, fc1).shape == ((HIDDEN - 18,) if per_channel else ())  # per channel: the kept rows' scales
    assert sorted(quantized_ops(out)) == sorted(quantized_ops(q))
    assert sum(n.op_type == "QuantizeLinear" for n in out.graph.node) == sum(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert_same(q, out, exact=True)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qdq_cnn_loses_its_dead_channels(per_channel):
    q = qdq(cnn(), per_channel)
    out = pruned(q).model
    assert [stored(out, "conv1").dims, stored(out, "conv2").dims, stored(out, "fc").dims] == [[6, 3, 3, 3], [5, 6, 3, 3], [5, 4]]
    bias = stored(out, "conv1", 2)
    assert bias.data_type == TensorProto.INT32 and list(bias.dims) == [6]
    assert scale_of(out, "conv1").shape == ((6,) if per_channel else ())
    assert scale_of(out, "conv1", 2).size == (6 if per_channel else 1)  # the int32 bias: input scale x weight scale
    assert_same(q, out, exact=True)


def test_a_row_that_dequantizes_to_zero_goes_and_one_that_does_not_stays():
    """Per tensor, fc1's outputs 0 and 1 (weights 1e-6) quantize to codes of zero: dead in the quantized model.
    Outputs 6 and 7 (weights 0.05) quantize to small non-zero codes and stay; per channel, every row gets its
    own scale, and the tiny ones stay too."""
    model = mlp(tiny=(0, 1), small=(6, 7))
    for per_channel, width in ((False, HIDDEN - 18 - 2), (True, HIDDEN - 18)):
        q = qdq(model, per_channel)
        out = pruned(q).model
        assert stored(out, layer(out, "Gemm", "fc1")).dims == [D_IN, width]
        assert_same(q, out, exact=True)


def test_per_channel_activation_quantization_loses_the_deleted_channels_scales():
    """A QuantizeLinear -> DequantizeLinear pair with a scale and zero point per channel of the activation
    (axis 1) between fc1 and fc2: the pair's parameters lose the entries of fc1's deleted outputs."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.standard_normal((D_IN, 12)).astype(np.float32), rng.standard_normal((12, D_OUT)).astype(np.float32)
    w1[:, [1, 4, 5]] = 0
    scale, zero = (rng.random(12) * 0.1 + 0.01).astype(np.float32), rng.integers(100, 150, 12).astype(np.uint8)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="fc1"),
             helper.make_node("QuantizeLinear", ["m", "scale", "zero"], ["q"], name="quant", axis=1),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["d"], name="dequant", axis=1),
             helper.make_node("Relu", ["d"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    model = _model(nodes, {"w1": w1, "w2": w2, "scale": scale, "zero": zero}, ["batch", D_IN], ["batch", D_OUT])
    out = pruned(model).model
    assert [input_of(out, name, i).shape for name in ("quant", "dequant") for i in (1, 2)] == [(9,)] * 4
    assert np.array_equal(input_of(out, "quant", 2), np.delete(zero, [1, 4, 5]))
    assert list(stored(out, "fc2").dims) == [9, D_OUT]
    assert_same(model, out, exact=True)


def test_qdq_int4_weights_lose_rows_and_stay_packed_int4(tmp_path):
    """Per-channel int4 weights (fc2 left in float): fc1's dead rows go. fc2's dead outputs stay: ONNX Runtime
    runs fc3 (a 4-bit weight) as MatMulNBits, which rounds fc3's input to int8 in blocks of its channels."""
    q = ort_qdq(mlp(opset=21), tmp_path, weights="int4", exclude=["fc2"])
    result = pruned(q)
    out = result.model
    w1 = stored(out, "fc1")
    assert w1.data_type == TensorProto.INT4 and list(w1.dims) == [D_IN, HIDDEN - 18]
    assert len(w1.raw_data) == D_IN * (HIDDEN - 18) // 2  # two codes a byte
    assert stored(out, "add1").data_type == TensorProto.UINT16  # the Add's bias, quantized as an activation
    assert list(stored(out, "fc2").dims) == [HIDDEN - 18, MIDDLE]
    assert kept_reasons(result, "fc2") == {f"read by MatMul 'fc3': {RUNTIME_ROUNDS}": 2}
    assert_same(q, out, exact=True)


def test_onnx_runtime_contrib_quantize_and_dequantize_ops_are_followed(tmp_path):
    """com.microsoft QuantizeLinear/DequantizeLinear (ONNX Runtime's, here for uint16 activations at opset 17)."""
    q = ort_qdq(mlp(), tmp_path, weights="int8", exclude=["fc2"], contrib_ops=True)
    assert {n.domain for n in q.graph.node if "Quantize" in n.op_type} == {"com.microsoft"}
    out = pruned(q).model
    assert list(stored(out, "fc1").dims) == [D_IN, HIDDEN - 18] and stored(out, "fc1").data_type == TensorProto.INT8
    assert_same(q, out, exact=True)


def test_qdq_blocked_int4_loses_rows_but_not_its_blocked_inputs():
    """DequantizeLinear(block_size=16) along K: fc1's dead outputs go (fc2 is left in float), fc2's dead outputs
    stay, read by fc3 whose weight is quantized in blocks along them."""
    q = nbits(mlp(opset=21), qdq_format=True, exclude=["fc2"])
    result = pruned(q)
    out = result.model
    w1 = stored(out, layer(out, "MatMul", "fc1"))
    assert w1.data_type == TensorProto.UINT4 and list(w1.dims) == [D_IN, HIDDEN - 18]
    assert list(stored(out, "fc2").dims) == [HIDDEN - 18, MIDDLE]
    assert kept_reasons(result, "fc2") == {
        f"read by MatMul '{layer(out, 'MatMul', 'fc3')}': its weight is quantized in blocks of 16 along axis 0": 2}
    assert_same(q, out, exact=True)


# ---------------------------------------------------------------------------------------------
# MatMulNBits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "symmetric"), [(4, False), (4, True), (8, False)], ids=["4bit", "4bit-symmetric", "8bit"])
def test_matmul_nbits_rows_go_and_inputs_go_in_whole_blocks(bits, symmetric):
    """fc1's outputs 16..31 fill fc2's second input block: they go, and fc2's K drops from 48 to 32 (its packed
    zero points from three blocks a row to two). Outputs 3 and 40 share blocks with live ones: kept. fc2's outputs
    16..23 are fc3's last (half) block."""
    q = nbits(mlp(dead2=(2, 5, *range(16, 24))), bits=bits, symmetric=symmetric)
    result = pruned(q)
    out = result.model
    fc1, fc2, fc3 = (layer(out, "MatMulNBits", f"fc{i}") for i in (1, 2, 3))
    assert (attrs(out, fc1)["N"], attrs(out, fc2)["K"], attrs(out, fc2)["N"], attrs(out, fc3)["K"]) == (32, 32, 16, 16)
    assert input_of(out, fc2, 1).shape == (16, 2, 16 * bits // 8)
    assert input_of(out, fc2, 2).reshape(16, -1).shape == (16, 2)
    if not symmetric:
        zero_points = input_of(out, fc2, 3)
        assert zero_points.dtype == np.uint8 and zero_points.size == 16 * (1 if bits == 4 else 2)
    assert kept_reasons(result, "m1") == {f"com.microsoft.MatMulNBits '{fc2}' reads its input in blocks of 16: only whole blocks go": 2}
    assert_same(q, out, exact=False)


def test_matmul_nbits_keeps_a_row_that_does_not_dequantize_to_zero():
    """fc1's outputs 16..31 read by a float fc2 (excluded from quantization): the dead rows go, the rows of
    small weights (0.05, codes well away from the zero point) stay."""
    q = nbits(mlp(dead1=range(16, 30), small=(30, 31)), exclude=["fc2"])
    out = pruned(q).model
    assert attrs(out, layer(out, "MatMulNBits", "fc1"))["N"] == HIDDEN - 14
    assert list(stored(out, "fc2").dims) == [HIDDEN - 14, MIDDLE]
    assert_same(q, out, exact=True)  # only whole rows left fc1; fc2 and fc3 compute on the same numbers


def _pack4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes [rows, count] packed two a byte, low nibble first, each row padded to whole bytes."""
    padded = np.zeros((codes.shape[0], -(-codes.shape[1] // 2) * 2), dtype=np.uint8)
    padded[:, : codes.shape[1]] = codes
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def _hand_nbits(*, float_zero_points: bool, g_idx: bool = False) -> onnx.ModelProto:
    """x [batch, 40] -> MatMulNBits (N=12, blocks of 16: the last one half full; bias) -> Relu -> MatMul -> y.
    Rows 2 and 7 are their zero points in every block, bias 0: dead. Row 9 is too, but for one code: live."""
    k, n, block, blocks = 40, 12, 16, 3
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, (n, blocks * block)).astype(np.uint8)
    zero = rng.integers(0, 16, (n, blocks)).astype(np.uint8)
    for row in (2, 7, 9):
        codes[row] = np.repeat(zero[row], block)
    codes[9, 35] = (zero[9, 2] + 1) % 16
    bias = rng.standard_normal(n).astype(np.float32)
    bias[[2, 7, 9]] = 0
    inits = {"b": _pack4(codes).reshape(n, blocks, block // 2), "scales": (rng.random(n * blocks) + 0.1).astype(np.float32),
             "zp": zero.astype(np.float32).reshape(-1) if float_zero_points else _pack4(zero).reshape(-1),
             "g_idx": (np.arange(k) // block).astype(np.int32), "bias": bias, "w2": rng.standard_normal((n, 5)).astype(np.float32)}
    inputs = ["x", "b", "scales", "zp", "g_idx" if g_idx else "", "bias"]
    if not g_idx:
        del inits["g_idx"]
    nodes = [helper.make_node("MatMulNBits", inputs, ["m"], name="nbits", domain="com.microsoft", K=k, N=n, bits=4, block_size=block),
             helper.make_node("Relu", ["m"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
                              [numpy_helper.from_array(v, name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("float_zero_points", [False, True], ids=["packed-zero-points", "float-zero-points"])
def test_matmul_nbits_rows_go_with_their_scales_zero_points_and_bias(float_zero_points):
    model = _hand_nbits(float_zero_points=float_zero_points)
    out = pruned(model).model
    assert attrs(out, "nbits")["N"] == 10 and attrs(out, "nbits")["K"] == 40
    assert [input_of(out, "nbits", i).shape for i in (1, 2, 3, 5)] == [
        (10, 3, 8), (30,), (30,) if float_zero_points else (20,), (10,)]
    assert list(stored(out, "fc").dims) == [10, 5]
    assert_same(model, out, exact=True)


def test_matmul_nbits_with_g_idx_is_a_barrier():
    result = pruned(_hand_nbits(float_zero_points=False, g_idx=True))
    assert result.report.plan.removed_channels == 0
    assert result.report.plan.analysis.barriers == {"nbits": "only 2-, 4- and 8-bit MatMulNBits without g_idx (act-order) is covered"}


# ---------------------------------------------------------------------------------------------
# A decoder block: QDQ and MatMulNBits
# ---------------------------------------------------------------------------------------------


def _decoder_block(heads: tuple[int, ...], neurons: list[int]) -> onnx.ModelProto:
    """tests/attention_models.py's pre-norm block with causal softmax attention (4 heads of 8, an FFN of 64),
    heads and FFN neurons dead, exported by TorchScript."""
    torch = pytest.importorskip("torch")
    from onnxprune.torch_export import export_onnx
    from tests import attention_models as am

    torch.manual_seed(0)
    attn = am.SelfAttention(mode="additive")
    kill = am.Kill(True, True)
    block = kill.randomized(am.Block(attn))
    kill.separate_heads(attn.v, heads, 8)
    kill.linear_neurons(block.fc1, block.fc2, neurons)
    case = kill.case("decoder", block, am._sequence)
    return export_onnx(case.model, case.example, exporter="torchscript")


def _projection_widths(model: onnx.ModelProto, op: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the q, k, v, out, fc1, fc2 projections, from their stored weights."""
    widths = {}
    for name in ("q", "k", "v", "out", "fc1", "fc2"):
        node = layer(model, op, f"/{name}/")
        if op == "MatMulNBits":
            widths[name] = (attrs(model, node)["K"], attrs(model, node)["N"])
        else:
            widths[name] = tuple(stored(model, node).dims)
    return widths


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # ORT quantizing the -inf causal mask
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_qdq_decoder_block_loses_dead_heads_and_neurons(per_channel):
    """Heads 1 and 3 (their V rows zero) and FFN neurons 0, 5, 6, 63 go through the Q/DQ pairs around every
    activation, the attention products included."""
    model = _decoder_block((1, 3), [0, 5, 6, 63])
    q = quantize_static_int8(model, feeds(model, 4, seed=1), settings=Int8Settings(per_channel=per_channel))
    out = pruned(q).model
    assert _projection_widths(out, "MatMul") == {"q": (32, 16), "k": (32, 16), "v": (32, 16), "out": (16, 32),
                                                 "fc1": (32, 60), "fc2": (60, 32)}
    assert_same(q, out, exact=True)


def test_matmul_nbits_decoder_block_loses_heads_that_fill_whole_blocks():
    """Heads 2 and 3 are the out projection's second block of 16 inputs: they go. Neurons 16..31 fill fc2's second
    block and go; neurons 0 and 5 share a block with live ones and stay."""
    q = nbits(_decoder_block((2, 3), [0, 5, *range(16, 32)]))
    result = pruned(q)
    out = result.model
    assert _projection_widths(out, "MatMulNBits") == {"q": (32, 16), "k": (32, 16), "v": (32, 16), "out": (16, 32),
                                                      "fc1": (32, 48), "fc2": (48, 32)}
    fc2 = layer(out, "MatMulNBits", "/fc2/")
    assert {f"com.microsoft.MatMulNBits '{fc2}' reads its input in blocks of 16: only whole blocks go": 2} in [
        g.kept_dead for g in result.report.plan.groups]
    assert_same(q, out, exact=False)


# ---------------------------------------------------------------------------------------------
# float16 and bfloat16
# ---------------------------------------------------------------------------------------------


def _narrow_mlp(store: type, *, cast: bool) -> onnx.ModelProto:
    """The MLP with weights stored as ``store``: computed in that type (``cast`` False), or each weight Cast to
    float32 first. fc2's weight holds a float16 subnormal (1e-6), normal in float32."""
    float_model = mlp()
    inits = {t.name: numpy_helper.to_array(t).copy() for t in float_model.graph.initializer}
    inits["w2"][0, 0] = 1e-6
    narrow = {k: v.astype(store) for k, v in inits.items()}
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(store))
    nodes = list(float_model.graph.node)
    if cast:
        casts = [helper.make_node("Cast", [k], [f"{k}_f32"], name=f"{k}_cast", to=TensorProto.FLOAT) for k in narrow]
        for node in nodes:
            node.input[:] = [f"{i}_f32" if i in narrow else i for i in node.input]
        nodes = casts + nodes
    return _model(nodes, narrow, ["batch", D_IN], ["batch", D_OUT], dtype=TensorProto.FLOAT if cast else onnx_type)


@pytest.mark.parametrize("store", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_narrow_weights_cast_to_float32_are_pruned_in_their_type(store):
    model = _narrow_mlp(store, cast=True)
    out = pruned(model).model
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(store))
    assert [(stored(out, n).data_type, list(stored(out, n).dims)) for n in ("fc1", "fc2")] == [
        (onnx_type, [D_IN, HIDDEN - 18]), (onnx_type, [HIDDEN - 18, MIDDLE - 2])]
    assert sum(n.op_type == "Cast" for n in out.graph.node) == 5  # the weights are not folded to float32
    assert numpy_helper.to_array(stored(out, "fc2"))[0, 0] == store(1e-6)  # not flushed: normal in float32
    assert_same(model, out, exact=True)


def test_a_float16_model_is_pruned_in_float16():
    """onnxprune.quantization.to_float16 (float16 weights and compute, float32 inputs and outputs)."""
    model = to_float16(cnn())
    out = pruned(model).model
    assert [(stored(out, n).data_type, list(stored(out, n).dims)) for n in ("conv1", "conv2", "fc")] == [
        (TensorProto.FLOAT16, [6, 3, 3, 3]), (TensorProto.FLOAT16, [5, 6, 3, 3]), (TensorProto.FLOAT16, [5, 4])]
    assert_same(model, out, exact=True)


def test_a_bfloat16_model_is_pruned_in_bfloat16():
    """Weights and compute in bfloat16: ONNX Runtime's CPU provider has no bfloat16 MatMul, so the result is
    checked with onnx's reference evaluator (verification on ONNX Runtime is off)."""
    from onnx.reference import ReferenceEvaluator

    model = _narrow_mlp(ml_dtypes.bfloat16, cast=False)
    out = prune_model(model, target="none", verify=False).model
    assert [(stored(out, n).data_type, list(stored(out, n).dims)) for n in ("fc1", "fc2")] == [
        (TensorProto.BFLOAT16, [D_IN, HIDDEN - 18]), (TensorProto.BFLOAT16, [HIDDEN - 18, MIDDLE - 2])]
    x = np.random.default_rng(3).standard_normal((3, D_IN)).astype(ml_dtypes.bfloat16)
    before, after = (ReferenceEvaluator(m).run(None, {"x": x})[0] for m in (model, out))
    assert np.array_equal(before.astype(np.float32), after.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# prune takes quantized models; deploy still refuses them
# ---------------------------------------------------------------------------------------------


def test_prune_takes_a_quantized_model_and_deploy_refuses_it(tmp_path):
    from onnxprune.deploy.api import deploy

    q = qdq(cnn(), per_channel=True)
    assert pruned(q).report.plan.removed_channels == 3
    with pytest.raises(InputError, match="already quantized"):
        deploy(q, tmp_path / "out", precision="fp32")


# ---------------------------------------------------------------------------------------------
# The cost table reads through the stored form
# ---------------------------------------------------------------------------------------------


def _layer_costs(model: onnx.ModelProto) -> list[tuple[int, int, int, int]]:
    """(in, out, params, MACs) of every layer, in order (names and ops may differ after quantization)."""
    from onnxprune.api import inspect_model

    return [(c.in_channels, c.out_channels, c.params, c.macs) for c in inspect_model(model)[2].layers]


@pytest.mark.parametrize("quantize", ["qdq-cnn", "qdq-mlp", "matmul-nbits"])
def test_quantized_layers_have_the_macs_and_parameters_of_the_float_layers(quantize):
    """Widths, MACs and weights are read through DequantizeLinear and from MatMulNBits' K and N. (Quantizing the
    MLP fuses each MatMul and bias Add into a Gemm: its parameters count the bias too.)"""
    build = cnn if quantize == "qdq-cnn" else mlp
    expected = _layer_costs(build())
    q = nbits(build()) if quantize == "matmul-nbits" else qdq(build(), per_channel=True)  # (nbits edits its input)
    got = _layer_costs(q)
    assert len(expected) == 3 and all(macs > 0 for *_, macs in expected)
    if quantize == "qdq-mlp":
        biases = [HIDDEN, MIDDLE, 0]
        expected = [(i, o, p + b, m) for (i, o, p, m), b in zip(expected, biases)]
    assert got == expected
