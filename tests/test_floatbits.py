"""Weights read through their bits (onnxprune.floatbits): zero tests and subnormal flushing agree with the
plain numpy comparisons, in every float format and memory layout, on small blocks so that block edges are hit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import floatbits
from onnxprune.channels.rule_base import take_rows_cols
from onnxprune.floatbits import count_subnormals, float_bits, flush_subnormals, nonzero_rows, reads_any, subnormal_mask
from passes.flush_subnormals import FlushSubnormalsPass

FORMATS = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
IDS = ["float16", "bfloat16", "float32", "float64"]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(floatbits, "BLOCK", 64)


def _smallest_subnormal(dtype) -> float:
    return float(ml_dtypes.finfo(dtype).smallest_subnormal)


def _weights(dtype, shape=(12, 10, 3), seed=0) -> np.ndarray:
    """Random weights with zero rows, lone non-zeros, -0, subnormals, NaN and inf."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.7] = 0
    w[2] = 0
    w[3] = -0.0
    w[4] = 0
    w[4, -1, -1] = float(_smallest_subnormal(dtype))  # a row whose only non-zero is a subnormal
    w[5] = 0
    w[5, 0, 0] = np.nan
    w[6] = 0
    w[6, 5, -1] = -np.inf
    return w.astype(dtype)


def _by_value(w: np.ndarray, columns: np.ndarray) -> np.ndarray:
    return ((w.astype(np.float64) != 0) & columns[None, :, None]).reshape(w.shape[0], -1).any(axis=1)


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
@pytest.mark.parametrize("layout", ["rows apart", "columns apart", "window outermost"])
def test_reads_any_agrees_with_comparing_values_in_every_layout(dtype, layout):
    w = _weights(dtype)
    # the same values (out, in, window) in three memory orders
    stored = {"rows apart": w, "columns apart": np.ascontiguousarray(w.transpose(1, 0, 2)).transpose(1, 0, 2),
              "window outermost": np.ascontiguousarray(w.transpose(2, 1, 0)).transpose(2, 1, 0)}[layout]
    assert np.array_equal(stored.astype(np.float64), w.astype(np.float64), equal_nan=True)
    rng = np.random.default_rng(1)
    for columns in (np.ones(10, bool), rng.random(10) < 0.5, np.zeros(10, bool), np.arange(10) < 4):
        assert reads_any(stored, columns).tolist() == _by_value(w, columns).tolist()


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
@pytest.mark.parametrize("layout", ["rows apart", "columns apart"])
def test_reads_any_reads_the_rows_a_short_sample_leaves_undecided(dtype, layout, monkeypatch):
    monkeypatch.setattr(floatbits, "SAMPLE", 3)  # one weight per row: most rows are read again, whole or in columns
    w = _weights(dtype)
    w[7] = 0
    w[7, 9, 0] = 1  # non-zero only in the last column
    stored = w if layout == "rows apart" else np.ascontiguousarray(w.transpose(1, 0, 2)).transpose(1, 0, 2)
    rng = np.random.default_rng(5)
    for columns in (np.ones(10, bool), rng.random(10) < 0.5, np.arange(10) < 9, np.arange(10) >= 9, np.arange(10) == 0):
        assert reads_any(stored, columns).tolist() == _by_value(w, columns).tolist()


def test_reads_any_sees_negative_zero_as_zero_and_nan_as_non_zero():
    w = np.array([[[-0.0], [0.0]], [[np.nan], [0.0]], [[1e-7], [-0.0]]], np.float16)
    assert reads_any(w).tolist() == [False, True, True]


def test_reads_any_on_integers_compares_values():
    w = np.array([[[0], [0]], [[0], [3]]], np.int8)
    assert reads_any(w, np.array([True, False])).tolist() == [False, False]
    assert reads_any(w).tolist() == [False, True]


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
def test_nonzero_rows_of_a_matrix_and_of_its_transpose(dtype):
    w = _weights(dtype, (9, 14, 1), seed=2)[:, :, 0]
    expected = (w.astype(np.float64) != 0).any(axis=1)
    assert nonzero_rows(w).tolist() == expected.tolist()
    assert nonzero_rows(np.ascontiguousarray(w.T).T).tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
def test_subnormals_are_found_and_flushed_on_their_bits(dtype):
    tiny, sub = float(ml_dtypes.finfo(dtype).tiny), _smallest_subnormal(dtype)
    values = np.array([0.0, -0.0, sub, -sub, 3 * sub, tiny, -tiny, 1.0, np.nan, np.inf] * 30, dtype=dtype)
    wide = values.astype(np.float64)
    expected = (wide != 0) & (np.abs(wide) < tiny)
    assert subnormal_mask(values).tolist() == expected.tolist()
    assert count_subnormals(values) == expected.sum() == 90
    flushed, count = flush_subnormals(values.reshape(30, 10))
    assert count == 90 and flushed.dtype == values.dtype and flushed.shape == (30, 10)
    bits = flushed.reshape(-1).view(float_bits(dtype).uint)
    assert np.all(bits[expected] == 0)  # +0, not -0
    original = values.view(float_bits(dtype).uint)
    assert np.array_equal(bits[~expected], original[~expected])  # -0, NaN, inf and normals bit for bit


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
def test_flushing_a_weight_without_subnormals_makes_nothing(dtype):
    values = np.array([0.0, -0.0, 1.0, float(ml_dtypes.finfo(dtype).tiny)] * 50, dtype=dtype)
    assert flush_subnormals(values) == (None, 0)
    late = values.copy()
    late[-1] = _smallest_subnormal(dtype)  # the only one, in the last block: the blocks before are copied over
    flushed, count = flush_subnormals(late)
    assert count == 1 and flushed[-1] == 0 and np.array_equal(flushed[:-1].astype(np.float64), values[:-1].astype(np.float64))


def test_a_byte_order_not_the_machines_is_compared_by_value():
    values = np.array([0.0, 1e-40, -1e-40, 1.0], dtype=">f4")
    assert float_bits(values.dtype) is None
    flushed, count = flush_subnormals(values)
    assert count == 2 and flushed.tolist() == [0.0, 0.0, 0.0, 1.0]


def _graph_with(weights: dict[str, np.ndarray], elem: int) -> gs.Graph:
    """x -> MatMul(w) for each weight, every output a graph output."""
    nodes, outs = [], []
    for name, w in weights.items():
        nodes.append(helper.make_node("MatMul", ["x", name], [f"{name}_y"]))
        outs.append(helper.make_tensor_value_info(f"{name}_y", elem, [2, w.shape[1]]))
    x = helper.make_tensor_value_info("x", elem, [2, 8])
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    return gs.import_onnx(helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits)))


@pytest.mark.parametrize("dtype, elem", [(np.float16, TensorProto.FLOAT16), (ml_dtypes.bfloat16, TensorProto.BFLOAT16)],
                         ids=["float16", "bfloat16"])
def test_the_pass_flushes_float16_and_bfloat16_weights_in_their_type(dtype, elem):
    rng = np.random.default_rng(3)
    clean = rng.uniform(0.5, 1.0, (8, 4)).astype(dtype)
    dirty = clean.copy()
    dirty[1, 2] = _smallest_subnormal(dtype)
    dirty[5] = -_smallest_subnormal(dtype)
    graph = _graph_with({"clean": clean, "dirty": dirty}, elem)
    result = FlushSubnormalsPass()(graph)
    assert result.summary.startswith("5 subnormal value(s) in 1 constant(s)")  # the clean weight is not rewritten
    out = {t.name: t for t in gs.export_onnx(graph).graph.initializer}
    assert out["dirty"].data_type == elem
    got = numpy_helper.to_array(out["dirty"]).astype(np.float32)
    assert got[1, 2] == 0 and not got[5].any()
    assert np.array_equal(np.delete(got, 5, axis=0)[:, [0, 1, 3]], np.delete(clean.astype(np.float32), 5, axis=0)[:, [0, 1, 3]])


@pytest.mark.parametrize("rows, cols", [(None, None), ("some", None), (None, "some"), ("some", "some")])
def test_take_rows_cols_is_the_boolean_selection(rows, cols):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((7, 9, 3)).astype(np.float16)
    r = rng.random(7) < 0.5 if rows else np.ones(7, bool)
    c = rng.random(9) < 0.5 if cols else np.ones(9, bool)
    got = take_rows_cols(w, r, c)
    assert np.array_equal(got, w[r][:, c]) and got.flags.c_contiguous and not np.shares_memory(got, w)
    assert np.array_equal(take_rows_cols(w.transpose(1, 0, 2), c, r), w.transpose(1, 0, 2)[c][:, r])


def test_take_rows_cols_gathers_rows_a_block_at_a_time(monkeypatch):
    from onnxprune.channels import rule_base

    monkeypatch.setattr(rule_base, "_GATHER_BLOCK", 100)  # two rows of 9 x 3 float16 per block
    rng = np.random.default_rng(6)
    w = rng.standard_normal((11, 9, 3)).astype(np.float16)
    r, c = rng.random(11) < 0.6, rng.random(9) < 0.5
    got = take_rows_cols(w, r, c)
    assert np.array_equal(got, w[r][:, c]) and got.flags.c_contiguous
    assert np.array_equal(take_rows_cols(w.transpose(1, 0, 2), c, r), w.transpose(1, 0, 2)[c][:, r])


@pytest.mark.parametrize("dtype", FORMATS, ids=IDS)
def test_a_lone_subnormal_among_normal_rows_and_zero_rows_is_flushed(dtype):
    rng = np.random.default_rng(7)
    w = rng.uniform(0.5, 1.0, (40, 5)).astype(dtype)
    w[::3] = 0  # zero rows and rows of normal numbers: cleared by their lowest and highest magnitudes
    assert flush_subnormals(w) == (None, 0)
    w[10, 2] = -_smallest_subnormal(dtype)
    flushed, count = flush_subnormals(w)
    assert count == 1 and flushed[10, 2] == 0
    assert np.array_equal(np.delete(flushed.reshape(-1), 52).astype(np.float64), np.delete(w.reshape(-1), 52).astype(np.float64))
