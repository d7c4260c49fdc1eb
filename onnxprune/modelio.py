"""Reading and writing ONNX files without ever losing the user's data.

Reading validates everything a later step would trip over (missing file, not
ONNX, truncated protobuf, external data that is missing, short or outside the
model's folder, an opset or IR version onnxruntime cannot load) and raises
:class:`~onnxprune.errors.InputError` with one clear sentence.

Writing is atomic: the model (and its external data, if any) is written into a
temporary folder beside the destination, optionally checked there, and only
then moved into place with ``os.replace``. A failure leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from onnxprune.errors import InputError
from onnxprune.runtime import max_loadable_ir, ort_load_problem

# Protobuf cannot serialise a message of 2 GiB or more; stay well below it.
PROTO_LIMIT_BYTES = 2_000_000_000


@dataclass
class LoadedModel:
    """A validated model and where it came from."""

    model: onnx.ModelProto
    path: Path | None = None
    external_data_files: list[Path] = field(default_factory=list)
    size_bytes: int = 0
    ir_lowered_from: int | None = None  # the file's IR version, if onnxruntime needed a lower one

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_data_files)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model, subgraphs and local functions included."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _check_external_data(model: onnx.ModelProto, base_dir: Path, name: str) -> list[Path]:
    """Validate every external-data reference; return the files they use."""
    base_real = base_dir.resolve()
    files: dict[Path, int] = {}
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        if not location:
            raise InputError(f"{name}: tensor '{tensor.name}' uses external data but names no file")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise InputError(
                f"{name}: tensor '{tensor.name}' points at external data '{location}' by absolute path; "
                "only files inside the model's folder are read"
            )
        target = (base_dir / location).resolve()
        if base_real != target and base_real not in target.parents:
            raise InputError(
                f"{name}: tensor '{tensor.name}' points at external data '{location}' outside the model's "
                "folder; refusing to read it"
            )
        if not target.is_file():
            raise InputError(
                f"{name}: external data file '{location}' for tensor '{tensor.name}' is missing "
                f"(expected at {target})"
            )
        size = files.setdefault(target, target.stat().st_size)
        offset = int(info.offset or 0)
        length = info.length
        if length is not None and offset + int(length) > size:
            raise InputError(
                f"{name}: external data file '{location}' is truncated: tensor '{tensor.name}' needs bytes "
                f"{offset}..{offset + int(length)} but the file has {size}"
            )
    return sorted(files)


def _check_structure(model: onnx.ModelProto, name: str) -> None:
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.output:
        raise InputError(f"{name} is not an ONNX model (no IR version, graph or graph outputs)")
    if model.ir_version >= 3 and not model.opset_import:
        raise InputError(f"{name} is not a usable ONNX model: it declares no opset")


def _lower_ir_if_needed(model: onnx.ModelProto, name: str) -> int | None:
    """Make onnxruntime able to load the model; lower only the IR version if that suffices.

    onnx's helpers may stamp an IR version newer than onnxruntime accepts
    (onnxruntime 1.31 refuses IR 14) although nothing in the model needs it.
    Returns the original IR version if it was lowered (in memory only).
    """
    problem = ort_load_problem(model)
    if problem is None:
        return None
    ir = max_loadable_ir(model)
    if ir is None or ir == model.ir_version:
        raise InputError(f"{name}: {problem}")
    original, model.ir_version = model.ir_version, ir
    return original


def load_model(path: str | os.PathLike[str], *, check: bool = False) -> LoadedModel:
    """Load and validate an ONNX file, external data included.

    Raises :class:`InputError` with one clear sentence for anything unusable.
    The ONNX checker runs only with ``check`` (it needs a second copy of the
    model in memory); callers check the *output* and blame the input only if
    the output fails.
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise InputError(f"{name}: no such file")
    if not p.is_file():
        raise InputError(f"{name}: not a file")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror or e}") from None
    if not data:
        raise InputError(f"{name} is empty, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(f"{name} is not an ONNX model, or is truncated (protobuf parse failed: {e})") from None
    del data
    _check_structure(model, name)
    files = _check_external_data(model, p.parent, name)
    if files:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as e:
            raise InputError(f"{name}: cannot read external data: {e}") from None
    lowered = _lower_ir_if_needed(model, name)
    size = p.stat().st_size + sum(f.stat().st_size for f in files)
    loaded = LoadedModel(model=model, path=p, external_data_files=files, size_bytes=size, ir_lowered_from=lowered)
    if check:
        check_input_model(loaded, name)
    return loaded


def check_input_model(loaded: LoadedModel, name: str) -> None:
    """Run the ONNX checker on an input model; a failure is an InputError.

    A model read from a file is checked by path: the checker then streams it
    from disk instead of holding a serialised copy beside the parsed one.
    """
    try:
        if loaded.path is not None:
            onnx.checker.check_model(str(loaded.path))
        elif loaded.model.ByteSize() < PROTO_LIMIT_BYTES:
            onnx.checker.check_model(loaded.model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InputError(f"{name} fails the ONNX checker: {first}") from None


def as_loaded(model_or_path: onnx.ModelProto | str | os.PathLike[str], *, check: bool = False) -> LoadedModel:
    """Accept a path or an in-memory ModelProto (validated the same way)."""
    if isinstance(model_or_path, onnx.ModelProto):
        _check_structure(model_or_path, "model")
        model, lowered = model_or_path, None
        if ort_load_problem(model) is not None:
            model = onnx.ModelProto()
            model.CopyFrom(model_or_path)  # never change the caller's model
            lowered = _lower_ir_if_needed(model, "model")
        loaded = LoadedModel(model=model, size_bytes=model.ByteSize(), ir_lowered_from=lowered)
        if check:
            check_input_model(loaded, "model")
        return loaded
    return load_model(model_or_path, check=check)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when the model is too large to be stored as one protobuf."""
    return model.ByteSize() >= PROTO_LIMIT_BYTES


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when two paths name the same file (existing or not)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def check_output_path(output: str | os.PathLike[str], loaded: LoadedModel) -> None:
    """Refuse an output that would overwrite the input or its external data."""
    out = Path(output)
    protected = ([loaded.path] if loaded.path else []) + list(loaded.external_data_files)
    data_out = out.with_name(out.name + ".data")
    for p in protected:
        if same_file(out, p) or same_file(data_out, p):
            raise InputError(f"{output}: the output would overwrite the input file {p}; choose another path")
    if out.exists() and out.is_dir():
        raise InputError(f"{output}: is a folder; give a file name for the output model")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{output}: folder {parent} does not exist")


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
    stage_dir = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=dest.parent if str(dest.parent) else "."))
    try:
        staged = stage_dir / dest.name
        data_name = dest.name + ".data"
        if use_external:
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            # save_model moved the weights out of the in-memory proto; put them back.
            external_data_helper.load_external_data_for_model(model, str(stage_dir))
        else:
            with open(staged, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        yield staged
        staged_data = stage_dir / data_name
        if staged_data.exists():
            os.replace(staged_data, dest.with_name(data_name))
        os.replace(staged, dest)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
    """Write a model atomically (see :func:`staged_write`)."""
    with staged_write(model, path, external_data=external_data):
        pass
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically (temporary file beside it, then rename)."""
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent if str(dest.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
