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
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import external_data_helper

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
    """A tensor's serialised size: its raw bytes, or the message's size when its values are typed fields."""
    return len(t.raw_data) if t.raw_data else t.ByteSize()


@contextlib.contextmanager
def staged_write(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> Iterator[Path]:
    """Write ``model`` to a temporary copy of ``path``; move it into place on success.

    Yields the staged model's path so the caller can check it (e.g. run it on
    ONNX Runtime) before it replaces anything. If the body raises, nothing is
    written. ``external_data=None`` stores weights beside the model only when
    the model is too large for one protobuf.
    """
    dest = Path(path)
    use_external = needs_external_data(model) if external_data is None else external_data
    stage_dir = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=_folder_of(dest)))
    try:
        staged = stage_dir / dest.name
        data_name = dest.name + ".data"
        _write_model(model, staged, data_name if use_external else None)
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


def _write_model(model: onnx.ModelProto, path: Path, data_name: str | None) -> None:
    """Write ``model`` to ``path``; with ``data_name``, its weights to that file beside it."""
    if data_name is None:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    # save_model moved the weights out of the in-memory proto; put them back.
    external_data_helper.load_external_data_for_model(model, str(path.parent))


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
