"""Channels spread over several axes: attention heads.

Most tensors carry their channels on one axis. Attention splits the channel axis of its
Q, K and V projections into heads, ``[B, S, H*D] -> [B, S, H, D]``, moves the head axis
(``-> [B, H, S, D]``), may merge it with the batch (``[B*H, S, D]``) and merges it back
(``[B, S, H*D]``). A :class:`Part` says where one factor of the channel index sits:
on ``axis``, ``dim`` values, each step ``inner`` elements of that axis apart, with a
plain factor ``above`` it (the batch in ``[B*H, ...]``; 1 when nothing is above). A
tensor's *layout* lists its parts in channel order: channel ``c`` has the row-major
coordinates of ``c`` over the parts' ``dim``. Reshapes and transposes never reorder
channels, so they tie slot ``c`` to slot ``c``; only the parts change.

A Reshape is followed by splitting each axis into *factors* (plain sizes and channel
parts) and matching them against the target shape (:func:`match_reshape`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

Size = int | str | None  # a plain factor: known, a symbol, or unknown


@dataclass(frozen=True)
class Part:
    """One factor of the channel index: ``dim`` values on ``axis``, ``inner`` apart, below ``above``."""

    axis: int
    dim: int
    inner: int = 1
    above: Size = 1


@dataclass(frozen=True)
class Chan:
    """A channel factor while an axis is taken apart: ``dim`` values of part ``key`` (a path in channel order)."""

    key: tuple[int, ...]
    dim: int


@dataclass(frozen=True)
class Plain:
    """A factor of an axis that carries no channels."""

    size: Size


Factor = Chan | Plain


def is_standard(parts: tuple[Part, ...]) -> bool:
    """True if the layout is one part alone on its axis (a plain channel axis)."""
    return len(parts) == 1 and parts[0].inner == 1 and parts[0].above == 1


def dims(parts: tuple[Part, ...]) -> tuple[int, ...]:
    """The parts' sizes, in channel order."""
    return tuple(p.dim for p in parts)


def axis_factors(parts: tuple[Part, ...], shape: list, axis: int) -> list[Factor]:
    """Axis ``axis`` taken apart, outermost factor first (``shape[axis]`` when it holds no channels)."""
    on_axis = sorted(((p, i) for i, p in enumerate(parts) if p.axis == axis), key=lambda pi: -pi[0].inner)
    if not on_axis:
        return [Plain(plain_size(shape[axis]) if axis < len(shape) else None)]
    out: list[Factor] = []
    for p, i in on_axis:
        if p.above != 1:
            out.append(Plain(p.above))
        out.append(Chan((i,), p.dim))
    tail = on_axis[-1][0].inner
    if tail != 1:
        out.append(Plain(tail))
    return out


def plain_size(d) -> Size:
    """A shape entry as a plain size: an int, a symbol, or None."""
    if isinstance(d, (int, np.integer)) and d >= 0:
        return int(d)
    return d if isinstance(d, str) and d else None


def _product(factors: list[Factor]) -> Size:
    """The size of a run of factors: an int, a lone symbol, or None."""
    total, symbols = 1, []
    for f in factors:
        s = f.dim if isinstance(f, Chan) else f.size
        if isinstance(s, int):
            total *= s
        elif s is None:
            return None
        else:
            symbols.append(s)
    if not symbols:
        return total
    return symbols[0] if len(symbols) == 1 and total == 1 else None


def _take(queue: list[Factor], want: Size, from_end: bool) -> list[Factor] | None:
    """Factors from one end of ``queue`` whose product is ``want``, cutting an int factor where needed."""
    end = -1 if from_end else 0
    if want is None or want == 0:
        return None
    if isinstance(want, str):
        if queue and isinstance(queue[end], Plain) and queue[end].size == want:
            return [queue.pop(end)]
        return None
    taken: list[Factor] = []
    have = 1
    while have < want:
        if not queue:
            return None
        f = queue[end]
        s = f.dim if isinstance(f, Chan) else f.size
        need = want // have
        if not isinstance(s, int) or s <= 0 or want % have:
            return None
        if need % s == 0:
            taken.append(queue.pop(end))
            have *= s
            continue
        if s % need:
            return None
        piece, rest = cut(f, need, from_end)
        queue[end] = rest
        taken.append(piece)
        have *= need
    return taken[::-1] if from_end else taken


def _is_one(f: Factor) -> bool:
    return isinstance(f, Plain) and f.size == 1


def cut(f: Factor, need: int, from_end: bool) -> tuple[Factor, Factor]:
    """``f`` cut in two: the ``need`` values at the end taken from, and the rest."""
    size = f.dim if isinstance(f, Chan) else f.size
    if isinstance(f, Plain):
        return Plain(need), Plain(size // need)
    if from_end:  # the inner (faster) values
        return Chan(f.key + (1,), need), Chan(f.key + (0,), size // need)
    return Chan(f.key + (0,), need), Chan(f.key + (1,), size // need)


def tensor_factors(parts: tuple[Part, ...], shape: list, rank: int) -> list[list[Factor]]:
    """Every axis of a rank-``rank`` tensor taken apart (plain sizes from ``shape`` where it carries no channels)."""
    return [axis_factors(parts, shape, axis) for axis in range(rank)]


def match_reshape(in_factors: list[list[Factor]], out_sizes: list[Size | str]) -> list[list[Factor]] | None:
    """Assign the input's factors (per axis, memory order) to the output axes, or None if that is not clear.

    ``out_sizes`` holds each output axis's size (int, symbol, None unknown, or "-1" for the
    inferred one). Axes are matched from the left and from the right while sizes are known;
    the one axis left in the middle takes what remains, and several left in the middle are
    fine only if no channel factor is among what remains.
    """
    queue = [f for axis in in_factors for f in axis if not _is_one(f)]
    n = len(out_sizes)
    out: list[list[Factor] | None] = [None] * n
    lo, hi = 0, n - 1
    while lo <= hi:
        got = _take(queue, _known(out_sizes[lo]), from_end=False)
        if got is None:
            break
        out[lo], lo = got, lo + 1
    while hi >= lo:
        got = _take(queue, _known(out_sizes[hi]), from_end=True)
        if got is None:
            break
        out[hi], hi = got, hi - 1
    if lo == hi:
        out[lo] = list(queue)
    elif lo < hi:
        if any(isinstance(f, Chan) for f in queue):
            return None
        for j in range(lo, hi + 1):
            out[j] = [Plain(None)]
    elif queue and any(isinstance(f, Chan) for f in queue):
        return None
    return [o or [Plain(1)] for o in out]


def _known(s) -> Size:
    return None if s == "-1" else s


def parts_from_factors(out_factors: list[list[Factor]], source_parts: int) -> tuple[Part, ...] | None:
    """The output layout once the factors sit on their axes (None if a part would sit below a symbol)."""
    found: list[tuple[tuple[int, ...], Part]] = []
    for axis, factors in enumerate(out_factors):
        above: Size = 1
        for j, f in enumerate(factors):
            if isinstance(f, Plain):
                above = f.size if above == 1 else _product([Plain(above), f])
                continue
            inner = _product(factors[j + 1 :])
            if not isinstance(inner, int):
                return None
            found.append((f.key, Part(axis, f.dim, inner, above)))
            above = 1
    found.sort(key=lambda kp: kp[0])
    if sorted({k[0] for k, _ in found}) != list(range(source_parts)):
        return None
    return normalize(tuple(p for _, p in found))


def normalize(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    """Merge neighbouring parts (in channel order) that sit next to each other on one axis."""
    out: list[Part] = []
    for p in parts:
        if out and out[-1].axis == p.axis and p.above == 1 and out[-1].inner == p.dim * p.inner:
            q = out[-1]
            out[-1] = Part(q.axis, q.dim * p.dim, p.inner, q.above)
        else:
            out.append(p)
    return tuple(out)


def move_axes(parts: tuple[Part, ...], new_axis) -> tuple[Part, ...]:
    """The layout with each part's axis mapped through ``new_axis``."""
    return tuple(replace(p, axis=new_axis(p.axis)) for p in parts)


def coordinates(parts_dims: tuple[int, ...]) -> np.ndarray:
    """Row-major coordinates of every channel: an array [channels, parts]."""
    if not parts_dims:
        return np.zeros((1, 0), dtype=np.int64)
    return np.stack(np.unravel_index(np.arange(int(np.prod(parts_dims))), parts_dims), axis=1)


def kept_per_part(keep: np.ndarray, parts_dims: tuple[int, ...]) -> list[np.ndarray]:
    """For each part, which of its values some kept channel uses."""
    grid = keep.reshape(parts_dims)
    return [grid.any(axis=tuple(j for j in range(len(parts_dims)) if j != i)) for i in range(len(parts_dims))]


def product_closure(keep: np.ndarray, parts_dims: tuple[int, ...], fixed: set[int]) -> np.ndarray:
    """The smallest set of channels that contains ``keep`` and is a product over the parts (every
    value of a ``fixed`` part kept): what a tensor of that layout can hold after pruning."""
    per_part = kept_per_part(keep, parts_dims)
    for i in fixed:
        per_part[i] = np.ones(parts_dims[i], dtype=bool)
    grid = np.ones((), dtype=bool)
    for mask in per_part:
        grid = np.multiply.outer(grid, mask)
    return grid.reshape(-1)
