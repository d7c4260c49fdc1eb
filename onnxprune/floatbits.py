"""Floating-point weights read through their bits: zero tests and subnormal flushing at memory speed.

A float is +0 or -0 exactly when its bits, sign bit cleared, are all 0; it is subnormal when its exponent bits
are 0 and its mantissa is not. Both are tested on an unsigned-integer view of the data (float16 and bfloat16 as
uint16, float32 as uint32, float64 as uint64): no conversion to another float type (numpy computes float16
comparisons one element at a time), no array of the weights' size, and the data is read in the order it lies in
memory, a block at a time (a memory-mapped weight streams through once).

Other types (integers, byte orders not the machine's) take the plain numpy comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxprune.known_rows import KNOWN_ROWS, Rows

BLOCK = 1 << 18  # elements read at a time (the scratch arrays stay in the cache)


@dataclass(frozen=True)
class FloatBits:
    """How one float format lays out its bits."""

    uint: type  # the unsigned integer of the same width
    magnitude: int  # every bit but the sign
    smallest_normal: int  # the bits of the smallest normal number (the lowest exponent bit)


_FORMATS = {
    "float16": FloatBits(np.uint16, 0x7FFF, 0x0400),
    "bfloat16": FloatBits(np.uint16, 0x7FFF, 0x0080),
    "float32": FloatBits(np.uint32, 0x7FFF_FFFF, 0x0080_0000),
    "float64": FloatBits(np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x0010_0000_0000_0000),
}


def float_bits(dtype) -> FloatBits | None:
    """The bit layout of ``dtype`` (float16, bfloat16, float32, float64 in the machine's byte order), else None."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    if not dtype.isnative:
        return None
    return _FORMATS.get(dtype.name)


# -- zero tests ----------------------------------------------------------------------------------------------


def reads_any(w: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """For each row of ``w`` (out, in, window; any strides): whether it holds a non-zero value (anything but +0
    and -0; NaN counts) in one of the ``columns`` (a mask over ``in``; None: every column).

    The weight is read at most once, in memory order: where rows lie apart (a Conv weight), not at all for rows
    the subnormal scan found zero or without a zero (:mod:`onnxprune.known_rows`), else the first weights of each
    row first (they decide a live row of a trained layer), then only the rows still undecided; where columns lie
    apart (a MatMul weight read as its transpose), a column at a time until every row is decided."""
    out_ch = w.shape[0]
    if columns is not None and columns.all():
        columns = None
    if w.size == 0 or (columns is not None and not columns.any()):
        return np.zeros(out_ch, dtype=bool)
    bits = float_bits(w.dtype)
    if bits is None:
        return _reads_any_by_value(w, columns)
    u = w.view(bits.uint)
    strides = [abs(s) if n > 1 else 0 for s, n in zip(u.strides, u.shape)]
    if strides[2] > max(strides[0], strides[1]):  # window outermost: one (out, in) plane at a time
        acc = np.zeros(out_ch, dtype=bool)
        for k in range(u.shape[2]):
            acc |= reads_any(w[:, :, k : k + 1], columns)
        return acc
    if strides[1] > strides[0]:
        return _or_over_columns(u, columns, bits)
    return _rows_read_any(u, columns, bits, KNOWN_ROWS.lookup(w, w.dtype))


SAMPLE = 64  # weights of each row looked at first (about one cache line of a float32 row)


def _nonzero(acc: np.ndarray, bits: FloatBits) -> np.ndarray:
    """Where an OR of bits holds a magnitude bit: a value other than +0 and -0 was among them."""
    return (acc & bits.uint(bits.magnitude)) != 0


def _rows_read_any(u: np.ndarray, columns: np.ndarray | None, bits: FloatBits, known: Rows | None) -> np.ndarray:
    """:func:`reads_any` where rows lie apart. Rows ``known`` to be zero or full are answered without reading them
    (some column is read), others whole in ``columns``. Where nothing is known: the first ``SAMPLE`` weights of
    each row in ``columns``; for the rows holding none, the whole row (a row that is zero everywhere is zero in
    ``columns``); only a row non-zero elsewhere but not in the sample is read again, in ``columns``."""
    if known is not None:
        touched = known.full.copy()
        rest = np.flatnonzero(~(known.zero | known.full))
        if rest.size:
            touched[rest] = _nonzero(_or_over_rows(u, rest, columns, bits), bits)
        return touched
    picked = None if columns is None else np.flatnonzero(columns)
    read = u.shape[1] if picked is None else picked.size
    first = max(1, SAMPLE // max(1, u.shape[2]))
    head = u[:, :first] if picked is None else np.take(u, picked[:first], axis=1)
    touched = _nonzero(np.bitwise_or.reduce(head, axis=(1, 2)), bits)
    undecided = np.flatnonzero(~touched)
    if first >= read or undecided.size == 0:
        return touched
    somewhere = undecided[_nonzero(_or_over_rows(u, undecided, None, bits), bits)]
    if somewhere.size:
        touched[somewhere] = True if columns is None else _nonzero(_or_over_rows(u, somewhere, columns, bits), bits)
    return touched


def _or_over_rows(u: np.ndarray, rows: np.ndarray, columns: np.ndarray | None, bits: FloatBits) -> np.ndarray:
    """For the ``rows`` (indices) of ``u`` (rows lie apart in memory): the OR of each one's bits in ``columns``,
    a block of rows at a time, gathered into one scratch array."""
    row = u.shape[1] * u.shape[2]
    step = max(1, BLOCK // max(row, 1))
    acc = np.empty(rows.size, dtype=u.dtype)
    scratch = np.empty((min(step, rows.size), u.shape[1], u.shape[2]), dtype=u.dtype)
    keep = None
    if columns is not None:  # the magnitude bits where a column is read, none elsewhere
        keep = np.where(columns, bits.uint(bits.magnitude), bits.uint(0)).astype(u.dtype)[None, :, None]
    for i in range(0, rows.size, step):
        index = rows[i : i + step]
        block = scratch[: index.size]
        np.take(u, index, axis=0, out=block, mode="clip")  # in range; the default mode would buffer ``out``
        if keep is not None:
            np.bitwise_and(block, keep, out=block)
        np.bitwise_or.reduce(block, axis=(1, 2), out=acc[i : i + step])
    return acc


def _or_over_columns(u: np.ndarray, columns: np.ndarray | None, bits: FloatBits) -> np.ndarray:
    """:func:`reads_any` where columns lie apart in memory: the OR of each row's bits in ``columns``, a few
    columns at a time, until every row holds a non-zero value."""
    out_ch, in_ch = u.shape[0], u.shape[1]
    step = max(1, BLOCK // max(out_ch * u.shape[2], 1))
    acc = np.zeros(out_ch, dtype=u.dtype)
    picked = None if columns is None else np.flatnonzero(columns)
    total = in_ch if picked is None else picked.size
    for j in range(0, total, step):
        if picked is None:
            block = u[:, j : j + step]
        else:
            index = picked[j : j + step]
            block = u[:, index[0] : index[-1] + 1] if index[-1] - index[0] + 1 == index.size else u[:, index]
        acc |= np.bitwise_or.reduce(block, axis=(1, 2))
        if _nonzero(acc, bits).all():
            break
    return _nonzero(acc, bits)


def _reads_any_by_value(w: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    """:func:`reads_any` by comparing values with zero (types without a bit layout here), a block of rows at a time."""
    out_ch, row = w.shape[0], w.shape[1] * w.shape[2]
    step = max(1, BLOCK // max(row, 1))
    touched = np.empty(out_ch, dtype=bool)
    mask = None if columns is None else columns[None, :, None]
    for i in range(0, out_ch, step):
        nonzero = w[i : i + step] != 0
        if mask is not None:
            nonzero &= mask
        touched[i : i + step] = nonzero.reshape(nonzero.shape[0], row).any(axis=1)
    return touched


def nonzero_rows(w: np.ndarray) -> np.ndarray:
    """For each row of a 2-D array (any strides): whether it holds a value other than +0 and -0."""
    return reads_any(w[:, :, None])


# -- subnormals ----------------------------------------------------------------------------------------------


def _flat_bits(values: np.ndarray, bits: FloatBits) -> np.ndarray:
    """The bits of ``values`` as one flat array (a view where ``values`` is contiguous)."""
    return np.ascontiguousarray(values).reshape(-1).view(bits.uint)


def subnormal_mask(values: np.ndarray) -> np.ndarray:
    """True where ``values`` (a floating array) holds a nonzero subnormal number."""
    bits = float_bits(values.dtype)
    if bits is None:
        tiny = np.finfo(values.dtype).tiny
        return (values != 0) & (np.abs(values) < tiny)
    u = values.view(bits.uint) if values.ndim else values.reshape(1).view(bits.uint).reshape(())
    magnitude = np.bitwise_and(u, bits.uint(bits.magnitude))
    return (magnitude != 0) & (magnitude < bits.uint(bits.smallest_normal))


def _magnitude_less_one(block: np.ndarray, bits: FloatBits, scratch: np.ndarray) -> np.ndarray:
    """|x|'s bits minus 1 for the bits ``block`` (in ``scratch``): zeros wrap round to the top, and a subnormal is
    below the smallest normal's bits minus 1."""
    s = scratch[: block.size]
    np.bitwise_and(block, bits.uint(bits.magnitude), out=s)
    return np.subtract(s, bits.uint(1), out=s)


def _subnormals_in(block: np.ndarray, bits: FloatBits, scratch: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Flags (in ``flags``) of the subnormals among the bits ``block``."""
    s = _magnitude_less_one(block, bits, scratch)
    return np.less(s, bits.uint(bits.smallest_normal - 1), out=flags[: block.size])


def count_subnormals(values: np.ndarray) -> int:
    """How many nonzero subnormal numbers ``values`` holds, counted on the bits a block at a time."""
    bits = float_bits(values.dtype)
    if bits is None:
        return int(subnormal_mask(values).sum())
    flat = _flat_bits(values, bits)
    scratch, flags = np.empty(min(BLOCK, flat.size), dtype=bits.uint), np.empty(min(BLOCK, flat.size), dtype=bool)
    return sum(int(np.count_nonzero(_subnormals_in(flat[i : i + BLOCK], bits, scratch, flags)))
               for i in range(0, flat.size, BLOCK))


def _row_length(values: np.ndarray) -> int | None:
    """The elements in each row (along axis 0) of a C-contiguous array of rank 2 or more, where whole rows fit in a
    block; None otherwise."""
    if values.ndim < 2 or values.shape[0] == 0 or not values.flags.c_contiguous:
        return None
    row = values.size // values.shape[0]
    return row if 0 < row <= BLOCK else None


class _RowScan:
    """The lowest and highest magnitude (|x|'s bits) in each row, as blocks of whole rows are scanned: a row is zero
    where its highest is 0 and full where its lowest is not; it may hold a subnormal only where its lowest is below
    the smallest normal and its highest is not 0 (a row of normal numbers, or of zeros, holds none)."""

    def __init__(self, rows: int, row: int, bits: FloatBits) -> None:
        self.row, self.normal = row, bits.uint(bits.smallest_normal)
        self.lowest, self.highest = np.empty(rows, dtype=bits.uint), np.empty(rows, dtype=bits.uint)

    def may_hold_subnormals(self, start: int, s: np.ndarray) -> bool:
        """Take in the magnitudes ``s`` (whole rows, from element ``start``); whether they may hold a subnormal."""
        rows, at = s.reshape(-1, self.row), slice(start // self.row, (start + s.size) // self.row)
        lowest = np.minimum.reduce(rows, axis=1, out=self.lowest[at])
        highest = np.maximum.reduce(rows, axis=1, out=self.highest[at])
        return bool(((lowest < self.normal) & (highest != 0)).any())

    def rows(self) -> Rows:
        """What the scan found of each row."""
        return Rows(zero=self.highest == 0, full=self.lowest != 0)


def _may_hold_subnormals(s: np.ndarray, bits: FloatBits) -> bool:
    """Whether the magnitudes ``s`` may hold a subnormal: their lowest is below the smallest normal, and not all zero."""
    lowest = np.minimum.reduce(s)
    return bool(lowest < bits.smallest_normal and (lowest != 0 or np.maximum.reduce(s) != 0))


def flush_subnormals(values: np.ndarray) -> tuple[np.ndarray | None, int]:
    """``values`` with every nonzero subnormal set to +0 (a new array; -0 and everything else as they are), and
    how many there were; (None, 0) when there are none. One pass over the data: blocks before the first
    subnormal are copied over when it is found, later blocks are copied and flushed as they are read. A block's
    lowest and highest magnitudes clear it in most weights; only a block that may hold subnormals is tested
    value by value.

    On the way, the rows (along axis 0) holding only zeros or no zero are found, and remembered for the zero tests
    where ``values`` cannot change (:mod:`onnxprune.known_rows`)."""
    bits = float_bits(values.dtype)
    if bits is None:
        mask = subnormal_mask(values)
        count = int(mask.sum())
        return (np.where(mask, values.dtype.type(0), values), count) if count else (None, 0)
    flat = _flat_bits(values, bits)
    row = _row_length(values)
    scan = None if row is None else _RowScan(values.shape[0], row, bits)
    step = BLOCK if row is None else BLOCK // row * row  # whole rows per block
    scratch = np.empty(min(step, flat.size), dtype=bits.uint)
    out, count = None, 0
    for i in range(0, flat.size, step):
        block = flat[i : i + step]
        s = np.bitwise_and(block, bits.uint(bits.magnitude), out=scratch[: block.size])
        found, n = None, 0
        if scan.may_hold_subnormals(i, s) if scan is not None else _may_hold_subnormals(s, bits):
            found = np.subtract(s, bits.uint(1), out=s) < bits.uint(bits.smallest_normal - 1)  # zeros wrap to the top
            n = int(np.count_nonzero(found))
        if n and out is None:
            out = np.empty_like(flat)
            out[:i] = flat[:i]
        if out is not None:
            target = out[i : i + block.size]
            target[...] = block
            if n:
                np.copyto(target, 0, where=found)
        count += n
    if scan is not None:
        KNOWN_ROWS.remember(values, scan.rows())
    if out is None:
        return None, 0
    return out.view(values.dtype).reshape(values.shape), count
