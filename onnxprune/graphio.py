"""Between ModelProto and onnx-graphsurgeon Graph, keeping what the graph does not hold."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.logger import G_LOGGER

from onnxprune.errors import InputError
from onnxprune.external_data import (
    defer,
    deferrable,
    little_endian_bytes,
    load_unmapped,
    map_initializers,
    model_tensors,
    take_pending,
)
from onnxprune.graphutil import graphsurgeon_logging
from onnxprune.modelio import LoadedModel
from onnxprune.shapes import export_node

log = logging.getLogger(__name__)


def to_graph(model: onnx.ModelProto | LoadedModel) -> gs.Graph:
    """Import ``model``; nodes without a name (or with a duplicate one) get a unique one,
    since analyses and reports refer to nodes by name.

    A :class:`LoadedModel` whose external data is mapped gives a graph whose initializers read
    their values from the map (views, never copies; see :mod:`onnxprune.external_data`).
    """
    proto, mapped = (model.structure, model.mapped) if isinstance(model, LoadedModel) else (model, None)
    if mapped is not None:
        try:
            load_unmapped(proto, mapped.base_dir)
        except (OSError, ValueError) as e:
            raise InputError(f"{model.path}: cannot read external data: {e}") from None
    with G_LOGGER.suppress(G_LOGGER.CRITICAL + 1):  # a damaged input's complaints: the exception it raises says it
        graph = gs.import_onnx(proto)
    if mapped is not None:
        log.debug("%d initializer(s) memory-mapped from %s", map_initializers(graph, mapped), mapped.base_dir)
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base = f"{node.op}_{i}"
            node.name = base
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)
    return graph


def to_model(
    graph: gs.Graph,
    original: onnx.ModelProto | LoadedModel,
    metadata: dict[str, object] | None = None,
    *,
    defer_data: bool = False,
    hand_over: bool = False,
) -> onnx.ModelProto:
    """Export ``graph`` with the original model's IR version, opsets, producer and metadata.

    For IR < 4 models, where every initializer must also be a graph input, the
    initializers are listed as inputs again (original order first, shapes current).
    ``metadata`` entries are added to ``metadata_props`` (non-strings as JSON).
    With ``defer_data`` the initializers of 1 KiB or more are not copied into the
    protobuf: it holds a placeholder for each, filled when the model is written
    (streamed into its external data file) or kept in memory
    (:func:`onnxprune.external_data.materialize_pending`). Their values are handed
    over: ``graph`` keeps only their names, types and shapes, so that whatever
    still refers to it holds no weights, and it cannot be exported again.
    ``hand_over`` (without ``defer_data``) hands them over the same way and copies
    each into the protobuf once it is exported: two copies of the weights where
    onnx-graphsurgeon's exporter makes three (``tobytes``, the TensorProto, the
    graph's list of them); the model is the same, and ``graph`` is left as with
    ``defer_data``.
    """
    if isinstance(original, LoadedModel):
        original = original.structure
    if defer_data or hand_over:
        log.debug("%d initializer(s) handed over to the exported model", _hand_over_initializers(graph))
    with graphsurgeon_logging(), _memoised_node_export():
        model = gs.export_onnx(graph, do_type_check=False)
    if hand_over and not defer_data:
        _fill_handed_over(model)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(original, attr))
    model.graph.name = original.graph.name
    model.graph.doc_string = original.graph.doc_string
    props = {p.key: p.value for p in original.metadata_props}
    for key, value in (metadata or {}).items():
        props[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    if original.ir_version < 4 and _lists_its_initializers(original):
        _list_initializers_as_inputs(model, [i.name for i in original.graph.input])
    return model


@contextmanager
def _memoised_node_export() -> Iterator[None]:
    """While open, onnx-graphsurgeon exports each node through :func:`onnxprune.shapes.export_node`: a node shape
    inference exported before, and nothing has changed since, is not exported again (its protobuf is copied into
    the graph)."""
    previous = OnnxExporter.__dict__["export_node"]
    OnnxExporter.export_node = staticmethod(export_node)
    try:
        yield
    finally:
        OnnxExporter.export_node = previous


def _lists_its_initializers(model: onnx.ModelProto) -> bool:
    """Whether ``model`` lists every initializer as a graph input, as IR < 4 requires (onnxruntime's quantizer
    writes IR 3 models that do not, and ONNX Runtime runs them: their initializers stay unlisted)."""
    listed = {i.name for i in model.graph.input}
    return all(t.name in listed for t in model.graph.initializer)


def _list_initializers_as_inputs(model: onnx.ModelProto, original_order: list[str]) -> None:
    g = model.graph
    present = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer}
    rank = {name: i for i, name in enumerate(original_order)}
    extra = sorted((n for n in inits if n not in present), key=lambda n: rank.get(n, len(rank)))
    for name in extra:
        t = inits[name]
        g.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    if extra:
        ordered = sorted(g.input, key=lambda vi: rank.get(vi.name, len(rank)))
        del g.input[:]
        g.input.extend(ordered)


def _hand_over_initializers(graph: gs.Graph) -> int:
    """Replace every large initializer's values with a placeholder the exporter writes as it is (see
    :func:`onnxprune.external_data.defer`); the values now belong to the exported model. Returns how many."""
    count = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and deferrable(tensor):
            tensor._values = _Placeholder(defer(tensor.name, tensor._values))
            count += 1
    return count


def _fill_handed_over(model: onnx.ModelProto) -> None:
    """Put the bytes of every placeholder in ``model`` into its TensorProto, as the exporter writes a tensor."""
    for tensor in model_tensors(model):
        array = take_pending(tensor)
        if array is not None:
            tensor.raw_data = little_endian_bytes(array).tobytes()
            del tensor.external_data[:]
            tensor.ClearField("data_location")


class _Placeholder(gs.ir.tensor.LazyValues):
    """Lazy values that onnx-graphsurgeon's exporter writes as they are: a placeholder TensorProto."""

    def load(self) -> np.ndarray:
        raise RuntimeError(f"internal error: the values of '{self.tensor.name}' were handed over to the exported model")
