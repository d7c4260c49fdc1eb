"""The weights of models with external data: memory-mapped when read, streamed when written.

Weights stored in external data files are memory-mapped, never read into the model's protobuf: a graph
constant's values are a read-only numpy view into the map, made afresh on every access (so nothing keeps a
second copy of them), and the pages a view brought in are handed back to the kernel once more than
:data:`RESIDENT_BUDGET` bytes of other tensors were read since (they stay in the page cache; touching them
again costs a minor page fault). Peak memory then follows the largest tensor, not the model.

Constants that are written out again are *deferred*: the exported ModelProto holds a placeholder reference
for each (see :func:`defer`), and the writer (:mod:`onnxprune.atomic_write`) streams the arrays one at a
time into the output's external data file.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper
from onnx_graphsurgeon.ir.tensor import LazyValues

log = logging.getLogger(__name__)


# -- every tensor of a model ---------------------------------------------------------------------------------


def graph_tensors(graph: onnx.GraphProto, *, sparse: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``graph``: initializers, sparse ones' parts (unless ``sparse`` is False), node
    attributes, subgraphs."""
    yield from graph.initializer
    if sparse:
        for initializer in graph.sparse_initializer:
            yield initializer.values
            yield initializer.indices
    for node in graph.node:
        yield from node_tensors(node, sparse=sparse)


def node_tensors(node: onnx.NodeProto, *, sparse: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in ``node``'s attributes, subgraphs included."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from graph_tensors(attr.g, sparse=sparse)
        for g in attr.graphs:
            yield from graph_tensors(g, sparse=sparse)


def model_tensors(model: onnx.ModelProto, *, sparse: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model, subgraphs and local functions included."""
    yield from graph_tensors(model.graph, sparse=sparse)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node, sparse=sparse)


# -- memory-mapped external data -----------------------------------------------------------------------------

RESIDENT_BUDGET = 16 * 2**20  # bytes of mapped tensors read before the pages of the older ones are handed back
PAGE = mmap.PAGESIZE

# ONNX element types whose external bytes are a numpy array as they stand (little-endian, one element per item).
_VIEWABLE = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
    onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128,
})  # fmt: skip


def viewable_dtype(elem_type: int) -> np.dtype | None:
    """The little-endian numpy dtype of an ONNX element type whose bytes can be viewed as they are, else None."""
    if elem_type not in _VIEWABLE:
        return None
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).newbyteorder("<")


class _Map(mmap.mmap):
    """A read-only map of one file that knows the :class:`MappedFile` it belongs to."""

    owner: MappedFile
    address: int


class MappedFile:
    """One external data file, mapped read-only; tensors are views into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.map: _Map | None = _Map(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        if self.map is not None:
            self.map.owner = self
            self.map.address = np.frombuffer(self.map, dtype=np.uint8, count=1).__array_interface__["data"][0]

    def view(self, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
        """``count`` items of ``dtype`` from byte ``offset`` (read-only, no copy)."""
        if count == 0:
            return np.zeros(0, dtype)
        end = offset + count * dtype.itemsize
        if self.map is None or end > self.size:
            raise ValueError(f"external data file {self.path} is truncated: needs bytes {offset}..{end}, has {self.size}")
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset)

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading bytes ``offset .. offset+length`` now, in the background
        (``MADV_WILLNEED``): a pass that reads tensors one after another overlaps its work with the disk."""
        if self.map is None or length <= 0 or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = offset - offset % PAGE
        self.map.madvise(mmap.MADV_WILLNEED, start, min(offset + length, self.size) - start)

    def release(self, offset: int, length: int) -> None:
        """Hand the pages holding bytes ``offset .. offset+length`` back to the kernel (they are read again on use)."""
        if self.map is None or length <= 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % PAGE
        self.map.madvise(mmap.MADV_DONTNEED, start, min(offset + length, self.size) - start)


class MappedData:
    """The external data files of one model (in ``base_dir``), mapped on first use, with a resident budget."""

    def __init__(self, base_dir: Path, budget: int = RESIDENT_BUDGET) -> None:
        self.base_dir, self.budget = base_dir, budget
        self.files: dict[str, MappedFile] = {}  # by real path
        self._keys: dict[str, str] = {}  # location -> real path
        self._touched: dict[tuple[str, int], int] = {}
        self._touched_bytes = 0

    def _key(self, location: str) -> str:
        """The real path of the file ``location`` (relative to ``base_dir``) names."""
        key = self._keys.get(location)
        if key is None:
            key = self._keys[location] = os.path.realpath(self.base_dir / location)
        return key

    def file(self, location: str) -> MappedFile:
        """The mapped file ``location`` (relative to ``base_dir``) names, mapped now if it is not yet."""
        key = self._key(location)
        if key not in self.files:
            self.files[key] = MappedFile(Path(key))
        return self.files[key]

    def view(self, ref: ExternalRef) -> np.ndarray:
        """The tensor ``ref`` names, as a read-only view (the budget may first release older views' pages)."""
        array = self.file(ref.location).view(ref.offset, ref.count, ref.dtype).reshape(ref.shape)
        self._touch(ref)
        return array

    def read_bytes(self, ref: ExternalRef) -> bytes:
        """The tensor's bytes, copied (for element types numpy cannot view, and full TensorProtos)."""
        with open(self.base_dir / ref.location, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.length)
        if len(data) != ref.length:
            raise ValueError(f"external data file {ref.location} is truncated at tensor '{ref.name}'")
        return data

    def _touch(self, ref: ExternalRef) -> None:
        key = (self._key(ref.location), ref.offset)
        if key in self._touched:
            return
        self._touched[key] = ref.length
        self._touched_bytes += ref.length
        if self._touched_bytes > self.budget:
            del self._touched[key]
            log.debug("handing back the pages of %d mapped tensor(s), %d bytes", len(self._touched), self._touched_bytes)
            self.release_all()
            self._touched, self._touched_bytes = {key: ref.length}, ref.length

    def release_all(self) -> None:
        """Hand back the pages of every tensor read since the last release."""
        for (path, offset), length in self._touched.items():
            self.files[path].release(offset, length)
        self._touched, self._touched_bytes = {}, 0


class ExternalRef:
    """Where a tensor's bytes are: file, offset, length, and what they are (name, element type, shape)."""

    def __init__(self, tensor: onnx.TensorProto) -> None:
        info = external_data_helper.ExternalDataInfo(tensor)
        self.name, self.location, self.offset = tensor.name, info.location, int(info.offset or 0)
        self.elem_type, self.shape = tensor.data_type, tuple(int(d) for d in tensor.dims)
        self.dtype = viewable_dtype(tensor.data_type)
        self.count = int(np.prod(self.shape, dtype=np.int64))
        size = None if self.dtype is None else self.count * self.dtype.itemsize
        self.length = int(info.length) if info.length is not None else size
        if self.length is None:  # a packed or non-numeric type without a length: read to the end of the file
            self.length = -1


class MappedValues(LazyValues):
    """onnx-graphsurgeon's lazy values, read from a memory-mapped external data file instead of the protobuf.

    ``load()`` returns a read-only view (no copy) for plain numeric types and a copy for the others (bfloat16,
    float8, int4, strings: what onnx's ``numpy_helper`` makes of them, as onnx-graphsurgeon does). ``tensor``
    (what onnx-graphsurgeon's exporter reads) is a full TensorProto with the bytes in ``raw_data``.
    """

    def __init__(self, tensor: onnx.TensorProto, source: MappedData) -> None:
        from onnx_graphsurgeon.importers.onnx_importer import get_itemsize, get_onnx_tensor_dtype, get_onnx_tensor_shape
        from onnx_graphsurgeon.util import misc

        self._proto, self.source, self.ref = tensor, source, ExternalRef(tensor)
        self.shape = get_onnx_tensor_shape(tensor)
        self.dtype = get_onnx_tensor_dtype(tensor)
        self.nbytes = misc.volume(self.shape) * get_itemsize(self.dtype)

    @property
    def viewable(self) -> bool:
        return self.ref.dtype is not None and self.ref.length == self.ref.count * self.ref.dtype.itemsize

    @property
    def tensor(self) -> onnx.TensorProto:
        """A TensorProto holding the values in ``raw_data`` (a copy: for exporting a subgraph, say)."""
        full = onnx.TensorProto()
        full.CopyFrom(self._proto)
        del full.external_data[:]
        full.data_location = onnx.TensorProto.DEFAULT
        ref = self.ref
        full.raw_data = self.source.read_bytes(ref) if ref.length >= 0 else _read_to_end(self.source, ref)
        return full

    @tensor.setter
    def tensor(self, value: onnx.TensorProto) -> None:
        self._proto = value

    def prefetch(self) -> None:
        """Start reading the tensor's bytes from disk in the background (see :meth:`MappedFile.prefetch`)."""
        if self.viewable:
            self.source.file(self.ref.location).prefetch(self.ref.offset, self.ref.length)

    def load(self) -> np.ndarray:
        if self.viewable:
            return self.source.view(self.ref)
        from onnx import numpy_helper

        return np.array(numpy_helper.to_array(self.tensor))

    def __str__(self) -> str:
        return f"MappedValues (shape={self.shape}, dtype={self.dtype}, {self.ref.location}@{self.ref.offset})"


def _read_to_end(source: MappedData, ref: ExternalRef) -> bytes:
    with open(source.base_dir / ref.location, "rb") as f:
        f.seek(ref.offset)
        return f.read()


class MappedConstant(gs.Constant):
    """A graph constant whose values stay in the map: each read of ``values`` is a fresh view, never cached,
    so that replacing or dropping the constant leaves no copy behind. Other value kinds behave as in
    onnx-graphsurgeon (a non-viewable type is loaded once and cached)."""

    @property
    def values(self) -> np.ndarray:
        if isinstance(self._values, MappedValues) and self._values.viewable:
            return self._values.load()
        return gs.Constant.values.fget(self)

    @values.setter
    def values(self, values: np.ndarray | LazyValues) -> None:
        self._values = values

    def copy(self) -> MappedConstant:
        out = super().copy()
        out.__class__ = MappedConstant
        return out


def map_initializers(graph: gs.Graph, source: MappedData) -> int:
    """Make every initializer of ``graph`` whose data is external read from ``source``; returns how many."""
    count = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(tensor, gs.Constant) and type(values) is LazyValues and external_data_helper.uses_external_data(values.tensor):
            tensor._values = MappedValues(values.tensor, source)
            tensor.__class__ = MappedConstant
            tensor.data_location = None  # exported in the protobuf unless the writer streams it out
            count += 1
    return count


def prefetch(constant: gs.Constant) -> None:
    """If ``constant``'s values are in a mapped external data file, start reading them in the background."""
    values = getattr(constant, "_values", None)
    if isinstance(values, MappedValues):
        values.prefetch()


def release_pages(array: np.ndarray) -> None:
    """If ``array`` views a mapped external data file, hand its pages back to the kernel."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    if isinstance(base, _Map) and array.flags.c_contiguous:
        base.owner.release(array.__array_interface__["data"][0] - base.address, array.nbytes)


# -- deferred tensors: placeholders in an exported model, streamed into the output when it is written -----------

DEFERRED_PREFIX = "onnxprune-deferred:"
DEFER_MIN_BYTES = 1024  # smaller constants stay in the protobuf
_pending: dict[str, np.ndarray | MappedValues] = {}
_counter = itertools.count()


def deferrable(constant: gs.Constant) -> bool:
    """Whether a constant's values can be written later from where they are: a plain numeric array or map of
    1 KiB or more, exported as its own type (no conversion on export)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    values = constant._values
    if isinstance(values, MappedValues):
        size_ok, elem = values.viewable and values.ref.length >= DEFER_MIN_BYTES, values.ref.elem_type
    elif isinstance(values, np.ndarray) and values.dtype != object:
        size_ok, elem = values.nbytes >= DEFER_MIN_BYTES, dtype_to_onnx(values.dtype)
    else:
        return False
    try:
        return size_ok and elem in _VIEWABLE and dtype_to_onnx(constant.export_dtype) == elem
    except (KeyError, TypeError, ValueError):
        return False


def defer(name: str, values: np.ndarray | MappedValues) -> onnx.TensorProto:
    """A placeholder TensorProto for ``values`` (its name, type and shape; data: a pending reference)."""
    location = f"{DEFERRED_PREFIX}{os.getpid()}-{next(_counter)}"
    _pending[location] = values
    if isinstance(values, MappedValues):
        elem, dims = values.ref.elem_type, values.ref.shape
    else:
        elem, dims = helper.np_dtype_to_tensor_dtype(values.dtype), values.shape
    tensor = onnx.TensorProto(name=name, data_type=elem, dims=dims, data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value=location)
    return tensor


def pending_location(tensor: onnx.TensorProto) -> str | None:
    """The pending reference a placeholder made by :func:`defer` holds, or None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location" and entry.value.startswith(DEFERRED_PREFIX):
            return entry.value
    return None


def pending_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a placeholder stands for (None if ``tensor`` is not one)."""
    location = pending_location(tensor)
    if location is None or location not in _pending:
        return None
    values = _pending[location]
    return values.ref.length if isinstance(values, MappedValues) else values.nbytes


def take_pending(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The array a placeholder stands for, handed over (the registry forgets it), or None."""
    location = pending_location(tensor)
    if location is None:
        return None
    if location not in _pending:
        raise RuntimeError(f"internal error: tensor '{tensor.name}' was exported for a later write that is gone")
    values = _pending.pop(location)
    return values.load() if isinstance(values, MappedValues) else values


def little_endian_bytes(array: np.ndarray) -> memoryview:
    """``array``'s bytes in ONNX's order (little-endian, C order) without a copy where they already are."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8))


def has_pending(model: onnx.ModelProto) -> bool:
    return any(pending_location(t) is not None for t in model_tensors(model))


def materialize_pending(model: onnx.ModelProto) -> None:
    """Put every deferred tensor's bytes into the model's protobuf (for a model kept in memory)."""
    for tensor in model_tensors(model):
        array = take_pending(tensor)
        if array is None:
            continue
        tensor.raw_data = little_endian_bytes(array).tobytes()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        release_pages(array)


def forget_pending(model: onnx.ModelProto) -> None:
    """Drop the arrays of any placeholder still pending in ``model`` (after a failed write)."""
    for tensor in model_tensors(model):
        location = pending_location(tensor)
        if location is not None:
            _pending.pop(location, None)


def load_unmapped(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read into the protobuf the external data of every tensor :func:`map_initializers` leaves alone: those
    in node attributes, subgraphs, local functions and sparse initializers (seldom large)."""
    graph = model.graph
    others = itertools.chain(
        (t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices)),
        (t for node in graph.node for t in node_tensors(node)),
        (t for function in model.functions for node in function.node for t in node_tensors(node)),
    )
    for tensor in others:
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
