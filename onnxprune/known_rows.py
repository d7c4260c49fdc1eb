"""Rows of immutable weights known to be all zero, or to hold no zero: a weight read whole once is not read again.

``flush-subnormals`` reads every float weight whole; on the way it finds the rows (along axis 0) that hold only
+0 and -0 (*zero*) and those that hold no +0 or -0 at all (*full*), and remembers them here. The channel
analysis then asks which rows of a weight are zero in some of its columns (:func:`onnxprune.floatbits.reads_any`)
and which input channels meet only zero weights (:func:`onnxprune.channels.rules_linear.zero_inputs`): a zero
row is zero in any of its columns, a full row non-zero in any of them, and neither is read from memory again
(a pruned model's dead rows are zero, the live rows of a dense layer full). Only rows that mix zeros with other
values are read again.

Only weights nothing can write to are remembered: a read-only array whose memory belongs to a ``bytes`` object
(a weight copied out of the protobuf) or a read-only map of an external data file. A rewrite gives a weight a
new array, which is not known here. An entry is found by the address of the weight's first row and its row
length, from any view of the same memory (the analysis reads a reshaped view of the array the scan read), and
only while the object owning that memory is alive: no other array can then lie at that address.
"""

from __future__ import annotations

import mmap
import weakref
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rows:
    """What is known of each row of a weight."""

    zero: np.ndarray  # bool per row: every value is +0 or -0
    full: np.ndarray  # bool per row: no value is +0 or -0


@dataclass(frozen=True)
class _Entry:
    """One weight's rows: they lie ``row_bytes`` apart, one after the other."""

    anchor: weakref.ref  # what holds the memory: while it lives, no other array lies at that address
    dtype: np.dtype
    row_bytes: int
    rows: Rows


def _holders(a: np.ndarray) -> list[object]:
    """``a``, the arrays and buffer views it is a view of, and the object owning the memory (last), each holding
    the next."""
    chain: list[object] = [a]
    while True:
        last = chain[-1]
        inner = last.base if isinstance(last, np.ndarray) else last.obj if isinstance(last, memoryview) else None
        if inner is None:
            return chain
        chain.append(inner)


def _immutable(owner: object) -> bool:
    """Whether nothing can write to the memory ``owner`` (not an array) exposes: bytes, a read-only map."""
    if isinstance(owner, np.ndarray) or (isinstance(owner, mmap.mmap) and owner.closed):
        return False
    try:
        with memoryview(owner) as view:
            return view.readonly
    except TypeError:
        return False


def _anchor(a: np.ndarray) -> object | None:
    """What keeps ``a``'s memory alive and can be referenced weakly, the closest to its owner (a map, the array
    bytes are viewed through), if nothing can write to that memory; None otherwise."""
    chain = _holders(a)
    if a.flags.writeable or not _immutable(chain[-1]):
        return None
    for holder in reversed(chain):
        try:
            weakref.ref(holder)
        except TypeError:  # bytes
            continue
        return holder
    return None


def _address(a: np.ndarray) -> int:
    """Where ``a``'s first element lies in memory."""
    return a.__array_interface__["data"][0]


class KnownRows:
    """The zero and full rows of immutable weights, by the address and layout of their rows."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, values: np.ndarray, rows: Rows) -> bool:
        """Remember the ``rows`` (along axis 0) of ``values`` (C-contiguous); False where ``values`` could change, or
        where no row is zero or full, and nothing is remembered."""
        holder = _anchor(values)
        if holder is None or values.ndim < 2 or not values.flags.c_contiguous or not (rows.zero.any() or rows.full.any()):
            return False
        key = (_address(values), values.shape[0])
        anchor = weakref.ref(holder, lambda ref, key=key: self._forget(key, ref))
        self._entries[key] = _Entry(anchor, values.dtype, values.strides[0], rows)
        return True

    def _forget(self, key: tuple[int, int], anchor: weakref.ref) -> None:
        """Drop the entry at ``key`` if ``anchor`` (now dead) is what kept it valid."""
        entry = self._entries.get(key)
        if entry is not None and entry.anchor is anchor:
            del self._entries[key]

    def lookup(self, w: np.ndarray, dtype: np.dtype) -> Rows | None:
        """What is known of the rows of ``w`` (any view whose elements are ``dtype`` values, each of its rows within
        the same row of a remembered weight): a row within a zero row is zero, one within a full row is full. None
        when nothing is known about ``w``."""
        if not self._entries or w.ndim == 0:
            return None
        entry = self._entries.get((_address(w), w.shape[0]))
        if entry is None or entry.dtype != dtype or w.itemsize != dtype.itemsize:
            return None
        if w.shape[0] > 1 and w.strides[0] != entry.row_bytes:
            return None
        extent = sum((n - 1) * s for n, s in zip(w.shape[1:], w.strides[1:]) if n > 1)
        if any(s < 0 for n, s in zip(w.shape[1:], w.strides[1:]) if n > 1) or extent + w.itemsize > entry.row_bytes:
            return None
        owner = entry.anchor()
        if owner is None or (isinstance(owner, mmap.mmap) and owner.closed):
            return None
        return entry.rows


KNOWN_ROWS = KnownRows()
