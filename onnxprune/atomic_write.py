"""Writing files without ever losing the user's data.

Writing is atomic: the model (and its external data, if any) is written into a
temporary folder beside the destination, optionally checked there, and only
then moved into place with ``os.replace``. A failure leaves no half-written
file. Files get the permissions the umask gives any new file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import external_data_helper

from onnxprune.external_data import (
    has_pending,
    little_endian_bytes,
    materialize_pending,
    model_tensors,
    pending_nbytes,
    release_pages,
    take_pending,
)

# Protobuf cannot serialise a message of 2 GiB or more; stay well below it.
PROTO_LIMIT_BYTES = 2_000_000_000


# Everything but the tensors' bytes (nodes, names, shapes) is far below this in any model onnxprune can hold.
_STRUCTURE_ALLOWANCE = 64 * 2**20


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model is too large to be stored as one protobuf (or close to it). Counts the tensors'
    bytes: ``ModelProto.ByteSize`` serialises the whole model to measure it, a second per 150 MB."""
    return _tensor_bytes(model.graph) + _STRUCTURE_ALLOWANCE >= PROTO_LIMIT_BYTES


def _tensor_bytes(graph: onnx.GraphProto) -> int:
    """Bytes held by the graph's initializers and constant attributes, subgraphs included."""
    total = sum(_bytes_of(t) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            total += _bytes_of(attr.t) if attr.HasField("t") else 0
            total += sum(_bytes_of(t) for t in attr.tensors)
            total += _tensor_bytes(attr.g) if attr.HasField("g") else 0
            total += sum(_tensor_bytes(g) for g in attr.graphs)
    return total


def _bytes_of(t: onnx.TensorProto) -> int:
    """A tensor's serialised size: its raw bytes, the array a placeholder stands for
    (:func:`onnxprune.external_data.defer`), or the message's size when its values are typed fields."""
    if t.raw_data:
        return len(t.raw_data)
    pending = pending_nbytes(t)
    return t.ByteSize() if pending is None else pending


ByteProgress = Callable[[int, int], None]  # (bytes written, bytes to write)


@contextlib.contextmanager
def staged_write(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    progress: ByteProgress | None = None,
) -> Iterator[Path]:
    """Write ``model`` to a temporary copy of ``path``; move it into place on success.

    Yields the staged model's path so the caller can check it (e.g. run it on
    ONNX Runtime) before it replaces anything. If the body raises, nothing is
    written. ``external_data=None`` stores weights beside the model only when
    the model is too large for one protobuf. ``progress(done, total)`` is called
    as the tensors' bytes are written.
    """
    dest = Path(path)
    use_external = needs_external_data(model) if external_data is None else external_data
    stage_dir = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=_folder_of(dest)))
    try:
        staged = stage_dir / dest.name
        data_name = dest.name + ".data"
        _write_model(model, staged, data_name if use_external else None, progress)
        staged_data = stage_dir / data_name
        for written in (staged, staged_data):
            if written.exists():
                os.chmod(written, new_file_mode())
        yield staged
        if staged_data.exists():
            os.replace(staged_data, dest.with_name(data_name))
        os.replace(staged, dest)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)


def _write_model(model: onnx.ModelProto, path: Path, data_name: str | None, progress: ByteProgress | None = None) -> None:
    """Write ``model`` to ``path``; with ``data_name``, its weights to that file beside it.

    A model holding deferred tensors (placeholders) is streamed: each array is written into the data file
    and dropped, and the model is left pointing at the file written (``progress`` follows each tensor). Any
    other model is written by onnx and left as it was (its weights in the protobuf; ``progress`` is told
    at the start and the end).
    """
    if data_name is not None and has_pending(model):
        _stream_model(model, path, data_name, progress)
        return
    total = _tensor_bytes(model.graph) if progress is not None else 0
    if progress is not None:
        progress(0, total)
    _write_whole(model, path, data_name)
    if progress is not None:
        progress(total, total)


def _write_whole(model: onnx.ModelProto, path: Path, data_name: str | None) -> None:
    """Write ``model`` by onnx (after putting deferred tensors into the protobuf), leaving it as it was."""
    materialize_pending(model)
    if data_name is None:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    # save_model moved the weights out of the in-memory proto; put them back.
    external_data_helper.load_external_data_for_model(model, str(path.parent))


EXTERNAL_MIN_BYTES = 1024  # tensors this large or larger go to the data file (as onnx.save_model's size_threshold)
ALIGN_MIN_BYTES = 2**20  # tensors this large or larger start on a page: onnxruntime maps them instead of copying
ALIGN = 4096


class _DataFile:
    """The external data file being written: appends tensors, each aligned if large, and points them at it."""

    def __init__(self, f: BinaryIO, name: str) -> None:
        self.f, self.name, self.offset = f, name, 0

    def append(self, tensor: onnx.TensorProto, data: memoryview | bytes) -> None:
        """Write ``data`` as ``tensor``'s bytes and make ``tensor`` refer to them."""
        if len(data) >= ALIGN_MIN_BYTES and self.offset % ALIGN:
            pad = ALIGN - self.offset % ALIGN
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(data)
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", self.offset), ("length", len(data))):
            tensor.external_data.add(key=key, value=str(value))
        self.offset += len(data)


def _streamed_bytes(model: onnx.ModelProto) -> int:
    """Bytes :func:`_stream_model` writes into the data file (padding aside)."""
    total = 0
    for tensor in model_tensors(model, sparse=False):
        pending = pending_nbytes(tensor)
        if pending is not None:
            total += pending
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            total += len(tensor.raw_data)
    return total


def _stream_model(model: onnx.ModelProto, path: Path, data_name: str, progress: ByteProgress | None = None) -> None:
    """Write the model with every tensor of 1 KiB or more in ``data_name``, one tensor at a time: a deferred
    array is written from where it is (a map of the input, or the rewrite's array) and dropped."""
    total = _streamed_bytes(model) if progress is not None else 0
    done = 0
    if progress is not None:
        progress(0, total)
    with open(path.with_name(data_name), "wb") as f:
        data = _DataFile(f, data_name)
        for tensor in model_tensors(model, sparse=False):  # a sparse initializer's parts stay in the protobuf
            array = take_pending(tensor)
            if array is not None:
                data.append(tensor, little_endian_bytes(array))
                done += array.nbytes
                release_pages(array)
                del array
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                done += len(tensor.raw_data)
                data.append(tensor, tensor.raw_data)
            else:
                continue
            if progress is not None:
                progress(done, total)
        f.flush()
        os.fsync(f.fileno())
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _folder_of(path: Path) -> str | Path:
    return path.parent if str(path.parent) else "."


def current_umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions ``open`` gives a new file under the current umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write a model atomically (see :func:`staged_write`)."""
    with staged_write(model, path, external_data=external_data):
        pass
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temporary file beside it, then rename)."""
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=_folder_of(dest))
    try:
        os.chmod(tmp, new_file_mode())  # mkstemp makes it private (0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
