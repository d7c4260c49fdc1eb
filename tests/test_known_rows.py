"""Rows the subnormal scan found zero, or holding no zero, are remembered for immutable weights only, found again
through any view of the same memory, and forgotten with the weight; the zero tests give the same answers with them."""

from __future__ import annotations

import gc

import numpy as np

from onnxprune import floatbits
from onnxprune.channels.rules_linear import zero_inputs
from onnxprune.floatbits import flush_subnormals, reads_any
from onnxprune.known_rows import KNOWN_ROWS


def _immutable(w: np.ndarray) -> np.ndarray:
    """``w`` as a weight copied out of a protobuf: a read-only view of a bytes object."""
    return np.frombuffer(w.tobytes(), dtype=w.dtype).reshape(w.shape)


def _weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    w[[1, 4, 5]] = 0
    w[3, 2, 1, 1] = 1e-40  # a subnormal: not zero
    w[6] = -0.0
    w[7] = 0
    w[7, 5, 2, 2] = 1.0  # non-zero only in its last column
    return w


def test_the_scan_remembers_the_zero_and_full_rows_of_an_immutable_weight():
    w = _immutable(_weight())
    assert flush_subnormals(w)[1] == 1  # the subnormal is flushed in a copy; the rows are those of ``w``
    view = w.reshape(8, 6, -1)  # as the channel analysis reads it
    rows = KNOWN_ROWS.lookup(view, view.dtype)
    assert rows.zero.tolist() == [False, True, False, False, True, True, True, False]
    assert rows.full.tolist() == [True, False, True, True, False, False, False, False]


def test_a_writable_weight_is_not_remembered():
    w = _weight()
    before = len(KNOWN_ROWS)
    flush_subnormals(w)
    assert len(KNOWN_ROWS) == before and KNOWN_ROWS.lookup(w, w.dtype) is None


def test_a_view_that_is_not_the_rows_is_not_answered():
    w = _immutable(_weight())
    flush_subnormals(w)
    assert KNOWN_ROWS.lookup(w[:, 1:], w.dtype) is None  # starts elsewhere
    assert KNOWN_ROWS.lookup(w[::2], w.dtype) is None  # other rows
    assert KNOWN_ROWS.lookup(w.transpose(1, 0, 2, 3), w.dtype) is None
    assert KNOWN_ROWS.lookup(w.view(np.int32), np.dtype(np.int32)) is None


def _zero_inputs_three_ways(a: np.ndarray) -> list[list[bool]]:
    """A Conv weight's zero inputs (axis 1), the same read transposed, and a MatMul weight's (axis 0)."""
    return [zero_inputs(a, 1).tolist(), zero_inputs(a.reshape(8, -1).T, 0).tolist(), zero_inputs(a.reshape(8, -1), 0).tolist()]


def test_zero_inputs_are_the_same_with_remembered_rows():
    dense = _weight(4)  # rows 0, 2 and 3 hold no zero: no input channel is zero
    unread = _weight(5)
    unread[:, 1] = 0  # an input channel no row reads: no row is full
    for plain in (dense, unread):
        w = _immutable(plain)
        expected = _zero_inputs_three_ways(plain)
        flush_subnormals(w)
        assert KNOWN_ROWS.lookup(w, w.dtype) is not None
        assert _zero_inputs_three_ways(w) == expected
    assert _zero_inputs_three_ways(dense)[0] == [False] * 6
    assert _zero_inputs_three_ways(unread)[0] == [False, True, False, False, False, False]
    assert _zero_inputs_three_ways(unread)[2] == [False, True, False, False, True, True, True, False]


def test_a_weight_is_forgotten_once_it_is_gone():
    gc.collect()
    before = len(KNOWN_ROWS)
    w = _immutable(_weight(1))
    flush_subnormals(w)
    assert len(KNOWN_ROWS) == before + 1
    del w
    gc.collect()
    assert len(KNOWN_ROWS) == before


def test_reads_any_gives_the_same_answer_with_remembered_rows(monkeypatch):
    monkeypatch.setattr(floatbits, "SAMPLE", 9)  # one column per row first: rows 6 and 7 are read again
    plain = _weight(2)
    w = _immutable(plain)
    rng = np.random.default_rng(3)
    masks = [None, rng.random(6) < 0.5, np.arange(6) == 5, np.arange(6) < 5]
    expected = [reads_any(plain.reshape(8, 6, -1), m).tolist() for m in masks]
    flush_subnormals(w)
    assert KNOWN_ROWS.lookup(w.reshape(8, 6, -1), w.dtype) is not None
    assert [reads_any(w.reshape(8, 6, -1), m).tolist() for m in masks] == expected
    assert expected[2] == [True, False, True, True, False, False, False, True]


def test_a_weight_mapped_from_external_data_is_remembered_through_its_map(tmp_path):
    import onnx
    import onnx_graphsurgeon as gs

    from onnxprune.graphio import to_graph
    from onnxprune.graphutil import constant_values
    from onnxprune.modelio import as_loaded
    from passes.flush_subnormals import FlushSubnormalsPass
    from tests.graphs import GraphBuilder

    b = GraphBuilder(seed=2)
    b.output(b.conv(b.input("x", [1, 16, 8, 8]), 16, 32, dead=[0, 5, 9], name="c"))
    path = tmp_path / "m.onnx"
    onnx.save(b.build(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = as_loaded(path)
    graph = to_graph(loaded)
    FlushSubnormalsPass()(graph)
    weight = next(t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.name == "c.weight")
    view = constant_values(weight)  # a new view of the map on each access
    rows = KNOWN_ROWS.lookup(view, view.dtype)
    assert rows is not None and np.flatnonzero(rows.zero).tolist() == [0, 5, 9] and rows.full.sum() == 29
