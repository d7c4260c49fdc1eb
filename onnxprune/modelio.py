"""Reading ONNX files and refusing what cannot be used, in one clear sentence.

Reading validates everything a later step would trip over (missing file, not
ONNX, truncated protobuf, text that is not UTF-8, external data that is
missing, short or outside the model's folder, an opset or IR version
onnxruntime cannot load) and raises :class:`~onnxprune.errors.InputError`.

Writing lives in :mod:`onnxprune.atomic_write`; its names are re-exported here
for existing callers.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper

from onnxprune.atomic_write import PROTO_LIMIT_BYTES, atomic_write_text, needs_external_data, save_model, staged_write
from onnxprune.errors import InputError
from onnxprune.external_data import MappedData, model_tensors
from onnxprune.runtime import max_loadable_ir, ort_load_problem

log = logging.getLogger(__name__)

__all__ = [
    "LoadedModel",
    "as_loaded",
    "check_input_model",
    "check_output_path",
    "load_model",
    "same_file",
    # written by onnxprune.atomic_write, re-exported for existing callers
    "PROTO_LIMIT_BYTES",
    "atomic_write_text",
    "needs_external_data",
    "save_model",
    "staged_write",
]


@dataclass
class LoadedModel:
    """A validated model and where it came from.

    ``structure`` is the parsed protobuf. For a file with external data it is read lazily: ``mapped`` maps
    the data files, ``to_graph`` gives the graph's initializers views into them, and ``structure``'s
    tensors still point at the files. ``model`` is the whole model: the first use of it reads the external
    data into ``structure`` (what every caller that wants a self-contained ModelProto gets).
    """

    structure: onnx.ModelProto
    path: Path | None = None
    external_data_files: list[Path] = field(default_factory=list)
    size_bytes: int = 0
    ir_lowered_from: int | None = None  # the file's IR version, if onnxruntime needed a lower one
    mapped: MappedData | None = None  # the external data, memory-mapped, while it is not read into ``structure``

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_data_files)

    @property
    def model(self) -> onnx.ModelProto:
        """The model with every tensor's data in the protobuf (read from the external data files on first use)."""
        if self.mapped is not None:
            log.debug("reading the external data of %s into memory", self.path)
            try:
                external_data_helper.load_external_data_for_model(self.structure, str(self.mapped.base_dir))
            except (OSError, ValueError) as e:
                raise InputError(f"{self.path}: cannot read external data: {e}") from None
            self.mapped = None
        return self.structure


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model, subgraphs and local functions included."""
    return model_tensors(model)


# The keys an external-data reference may have (onnx.external_data_helper reads no others).
EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def _external_reference(tensor: onnx.TensorProto, name: str) -> tuple[str, int, int | None]:
    """(file, offset, length) of a tensor's external data; unknown keys or bad numbers are an InputError."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    unknown = sorted(set(entries) - EXTERNAL_DATA_KEYS)
    if unknown:
        raise InputError(f"{name}: tensor '{tensor.name}' has unknown external data key(s) {unknown} (damaged file?)")
    numbers = {}
    for key in ("offset", "length"):
        try:
            numbers[key] = int(entries[key]) if key in entries else None
        except ValueError:
            raise InputError(f"{name}: tensor '{tensor.name}' has external data {key} {entries[key]!r}, not a number") from None
        if (numbers[key] or 0) < 0:
            raise InputError(f"{name}: tensor '{tensor.name}' has a negative external data {key}")
    return entries.get("location", ""), numbers["offset"] or 0, numbers["length"]


def _external_file(base_dir: Path, location: str, tensor: onnx.TensorProto, name: str) -> Path:
    """The file ``location`` names inside the model's folder; InputError if it is elsewhere or missing."""
    if not location:
        raise InputError(f"{name}: tensor '{tensor.name}' uses external data but names no file")
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise InputError(
            f"{name}: tensor '{tensor.name}' points at external data '{location}' by absolute path; "
            "only files inside the model's folder are read"
        )
    base_real = base_dir.resolve()
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
    return target


def _check_external_data(model: onnx.ModelProto, base_dir: Path, name: str) -> list[Path]:
    """Validate every external-data reference; return the files they use."""
    files: dict[Path, int] = {}
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location, offset, length = _external_reference(tensor, name)
        target = _external_file(base_dir, location, tensor, name)
        size = files.setdefault(target, target.stat().st_size)
        if length is not None and offset + length > size:
            raise InputError(
                f"{name}: external data file '{location}' is truncated: tensor '{tensor.name}' needs bytes "
                f"{offset}..{offset + length} but the file has {size}"
            )
    return sorted(files)


@functools.cache
def _text_and_message_fields(descriptor: Descriptor) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names of a message type's string fields and of its message fields."""
    fields = descriptor.fields
    return (
        tuple(f.name for f in fields if f.type == f.TYPE_STRING),
        tuple(f.name for f in fields if f.type == f.TYPE_MESSAGE),
    )


def _non_utf8_field(model: onnx.ModelProto) -> str | None:
    """``Message.field`` of the first text field whose bytes are not UTF-8, or None.

    The protobuf parser accepts such bytes in ONNX's (proto2) string fields and
    hands them out as ``bytes``; every later step expects ``str``. String
    attributes are bytes fields that readers decode as UTF-8.
    """
    stack: list[Message] = [model]
    while stack:
        message = stack.pop()
        texts, messages = _text_and_message_fields(message.DESCRIPTOR)
        for name in texts:
            value = getattr(message, name)
            if isinstance(value, bytes) or (not isinstance(value, str) and any(isinstance(v, bytes) for v in value)):
                return f"{message.DESCRIPTOR.name}.{name}"
        if isinstance(message, onnx.AttributeProto) and not _attribute_text_is_utf8(message):
            return f"attribute '{message.name}'"
        for name in messages:
            value = getattr(message, name)
            if not isinstance(value, Message):
                stack.extend(value)
            elif message.HasField(name):
                stack.append(value)
    return None


def _attribute_text_is_utf8(attribute: onnx.AttributeProto) -> bool:
    """Whether a STRING(S) attribute's bytes read as UTF-8, as every reader (onnx-graphsurgeon) decodes them."""
    try:
        attribute.s.decode()
        for value in attribute.strings:
            value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _check_text(model: onnx.ModelProto, name: str) -> None:
    """Refuse a model whose names or other text are not UTF-8 (a damaged file)."""
    try:
        where = _non_utf8_field(model)
    except UnicodeDecodeError:  # protobuf implementations that decode on access
        where = "a text field"
    if where is not None:
        raise InputError(f"{name} is not a valid ONNX model: {where} holds text that is not UTF-8 (damaged file?)")


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


def load_model(path: str | os.PathLike[str], *, check: bool = False, map_external: bool = True) -> LoadedModel:
    """Load and validate an ONNX file, external data included.

    Raises :class:`InputError` with one clear sentence for anything unusable.
    The ONNX checker runs only with ``check`` (it runs on the file, by path);
    callers check the *output* and blame the input only if the output fails.
    External data is validated (files present, inside the model's folder,
    long enough) and, with ``map_external``, memory-mapped rather than read
    (see :class:`LoadedModel`).
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
    _check_text(model, name)
    _check_structure(model, name)
    files = _check_external_data(model, p.parent, name)
    lowered = _lower_ir_if_needed(model, name)
    size = p.stat().st_size + sum(f.stat().st_size for f in files)
    loaded = LoadedModel(structure=model, path=p, external_data_files=files, size_bytes=size, ir_lowered_from=lowered,
                         mapped=_map_files(p.parent, files, name) if files else None)
    if files and not map_external:
        loaded.model  # noqa: B018 - reads the external data now
    if check:
        check_input_model(loaded, name)
    return loaded


def _map_files(base_dir: Path, files: list[Path], name: str) -> MappedData:
    """Map every external data file now, so that one that cannot be read is refused here, as bad input."""
    mapped = MappedData(base_dir)
    for path in files:
        try:
            mapped.file(str(path))
        except (OSError, ValueError) as e:
            raise InputError(f"{name}: cannot read external data: {e}") from None
    return mapped


def check_input_model(loaded: LoadedModel, name: str) -> None:
    """Run the ONNX checker on an input model; a failure is an InputError.

    A model read from a file is checked by path: the checker then streams it
    from disk instead of holding a serialised copy beside the parsed one.
    """
    try:
        if loaded.path is not None:
            onnx.checker.check_model(str(loaded.path))
        elif loaded.structure.ByteSize() < PROTO_LIMIT_BYTES:
            onnx.checker.check_model(loaded.structure)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
        raise InputError(f"{name} fails the ONNX checker: {first}") from None


def as_loaded(model_or_path: onnx.ModelProto | str | os.PathLike[str] | LoadedModel, *, check: bool = False) -> LoadedModel:
    """Accept a path or an in-memory ModelProto (validated the same way); a LoadedModel is returned as is."""
    if isinstance(model_or_path, LoadedModel):
        if check:
            check_input_model(model_or_path, str(model_or_path.path or "model"))
        return model_or_path
    if isinstance(model_or_path, onnx.ModelProto):
        _check_text(model_or_path, "model")
        _check_structure(model_or_path, "model")
        model, lowered = model_or_path, None
        if ort_load_problem(model) is not None:
            model = onnx.ModelProto()
            model.CopyFrom(model_or_path)  # never change the caller's model
            lowered = _lower_ir_if_needed(model, "model")
        loaded = LoadedModel(structure=model, size_bytes=model.ByteSize(), ir_lowered_from=lowered)
        if check:
            check_input_model(loaded, "model")
        return loaded
    return load_model(model_or_path, check=check)


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
