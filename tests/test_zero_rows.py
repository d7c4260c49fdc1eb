"""Rows the subnormal scan found zero are remembered for immutable weights only, found again through any view of
the same memory, and forgotten with the weight; the zero tests give the same answers with them."""

from __future__ import annotations

import gc

import numpy as np

from onnxprune import floatbits
from onnxprune.floatbits import flush_subnormals, reads_any
from onnxprune.zero_rows import ZERO_ROWS


def _immutable(w: np.ndarray) -> np.ndarray:
    """``w`` as a weight copied out of a protobuf: a read-only view of a bytes object."""
    return np.frombuffer(w.tobytes(), dtype=w.dtype).reshape(w.shape)


def _weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    w[[1, 4, 5]] = 0
    w[6] = -0.0
    w[7] = 0
    w[7, 5, 2, 2] = 1.0  # non-zero only in its last column
    return w


def test_the_scan_remembers_the_zero_rows_of_an_immutable_weight():
    w = _immutable(_weight())
    assert flush_subnormals(w) == (None, 0)
    view = w.reshape(8, 6, -1)  # as the channel analysis reads it
    assert ZERO_ROWS.lookup(view, view.dtype).tolist() == [False, True, False, False, True, True, True, False]


def test_a_writable_weight_is_not_remembered():
    w = _weight()
    before = len(ZERO_ROWS)
    flush_subnormals(w)
    assert len(ZERO_ROWS) == before and ZERO_ROWS.lookup(w, w.dtype) is None


def test_a_view_that_is_not_the_rows_is_not_answered():
    w = _immutable(_weight())
    flush_subnormals(w)
    assert ZERO_ROWS.lookup(w[:, 1:], w.dtype) is None  # starts elsewhere
    assert ZERO_ROWS.lookup(w[::2], w.dtype) is None  # other rows
    assert ZERO_ROWS.lookup(w.transpose(1, 0, 2, 3), w.dtype) is None
    assert ZERO_ROWS.lookup(w.view(np.int32), np.dtype(np.int32)) is None


def test_a_weight_is_forgotten_once_it_is_gone():
    w = _immutable(_weight(1))
    flush_subnormals(w)
    before = len(ZERO_ROWS)
    del w
    gc.collect()
    assert len(ZERO_ROWS) == before - 1


def test_reads_any_gives_the_same_answer_with_remembered_rows(monkeypatch):
    monkeypatch.setattr(floatbits, "SAMPLE", 9)  # one column per row first: rows 6 and 7 are read again
    plain = _weight(2)
    w = _immutable(plain)
    rng = np.random.default_rng(3)
    masks = [None, rng.random(6) < 0.5, np.arange(6) == 5, np.arange(6) < 5]
    expected = [reads_any(plain.reshape(8, 6, -1), m).tolist() for m in masks]
    flush_subnormals(w)
    assert ZERO_ROWS.lookup(w.reshape(8, 6, -1), w.dtype) is not None
    assert [reads_any(w.reshape(8, 6, -1), m).tolist() for m in masks] == expected
    assert expected[2] == [True, False, True, True, False, False, False, True]
