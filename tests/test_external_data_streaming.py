"""Models with external data: weights memory-mapped when read, streamed tensor by tensor when written.

The model is benchmarks/prune_at_scale.py's residual MLP at a small size (every weight in one external data
file, a quarter of each block's FFN neurons dead). Checked: the pruned model is exact and deletes every dead
neuron; the input's files are untouched; nothing is half-written when a check fails; the weights are never
held twice (views into the map, never cached by the graph; the exported protobuf holds placeholders, not
bytes; nothing is left pending after a write).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.prune_at_scale import MlpShape, build_model
from onnxprune import external_data
from onnxprune.api import prune_model
from onnxprune.cli import _whole_command_timings, main
from onnxprune.errors import PassError, VerificationError
from onnxprune.external_data import MappedConstant, MappedValues, has_pending
from onnxprune.graphio import to_graph, to_model
from onnxprune.modelio import load_model

SHAPE = MlpShape(blocks=3, hidden=64, ffn=256, dtype="float32", seq=4, dead=64)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def mlp(tmp_path) -> Path:
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    build_model(src, SHAPE, seed=1)
    return src


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> hash; folders as "dir")."""
    return {str(p.relative_to(folder)): sha(p) if p.is_file() else "dir" for p in sorted(folder.rglob("*"))}


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_pruned_exactly_written_with_external_data_and_the_input_untouched(mlp, tmp_path, capsys):
    before = files_of(mlp.parent)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    assert main(["prune", str(mlp), "-o", str(out), "--target", "none", "-q"]) == 0
    assert files_of(mlp.parent) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    pruned = onnx.load(out)
    removed = params(onnx.load(mlp)) - params(pruned)
    assert removed == SHAPE.blocks * SHAPE.dead * (2 * SHAPE.hidden + 1)  # W1 column, b1 entry, W2 row per neuron
    x = np.random.default_rng(0).standard_normal((2, SHAPE.seq, SHAPE.hidden)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(mlp, x), rtol=1e-5, atol=1e-5)


def test_large_tensors_start_on_a_page_and_point_at_the_output_data_file(mlp, tmp_path):
    shape = MlpShape(blocks=1, hidden=512, ffn=2048, dtype="float32", seq=2, dead=512)  # W1, W2: 4 MiB each
    src = tmp_path / "big.onnx"
    build_model(src, shape)
    out = tmp_path / "big-out.onnx"
    result = prune_model(src, output=out, target="none")
    written = onnx.load(out, load_external_data=False)
    for tensor in written.graph.initializer:
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        if onnx.external_data_helper.uses_external_data(tensor):
            assert info.location == "big-out.onnx.data"
            assert info.length < 2**20 or info.offset % 4096 == 0
    # the returned model refers to the written data (nothing pending, no bytes in the protobuf)
    assert not has_pending(result.model)
    assert all(not t.raw_data for t in result.model.graph.initializer if onnx.external_data_helper.uses_external_data(t))


def test_weights_are_mapped_views_never_cached_or_copied_into_the_protobuf(mlp):
    loaded = load_model(mlp)
    assert loaded.mapped is not None
    assert all(onnx.external_data_helper.uses_external_data(t) for t in loaded.structure.graph.initializer)
    graph = to_graph(loaded)
    constants = [t for t in graph.tensors().values() if isinstance(t, MappedConstant)]
    assert len(constants) == len(loaded.structure.graph.initializer)
    w1 = graph.tensors()["block0.w1"]
    first, second = w1.values, w1.values
    assert not first.flags.writeable and not first.flags.owndata  # a read-only view into the map
    assert np.shares_memory(first, second)  # the same bytes both times: no copy
    assert isinstance(w1._values, MappedValues)  # not cached: dropping the constant leaves nothing behind
    assert all(not t.raw_data for t in loaded.structure.graph.initializer)  # the protobuf never got the bytes


def test_exported_model_holds_placeholders_until_written(mlp, tmp_path):
    loaded = load_model(mlp)
    graph = to_graph(loaded)
    model = to_model(graph, loaded, defer_data=True)
    assert has_pending(model)
    assert model.ByteSize() < 20_000  # structure only: the weights are ~400 KB
    pending = dict(external_data._pending)
    assert pending and all(isinstance(v, MappedValues) for v in pending.values())  # nothing was read for it
    external_data.materialize_pending(model)
    assert not has_pending(model) and not (set(pending) & set(external_data._pending))
    assert params(model) == params(onnx.load(mlp))


@pytest.mark.parametrize("stage", ["check", "verify"])
def test_a_failed_check_writes_nothing_and_leaves_nothing_pending(mlp, tmp_path, monkeypatch, stage):
    from onnxprune import checked_write

    def fail(*args, **kwargs):
        raise (PassError if stage == "check" else VerificationError)(f"{stage} failed (test)")

    monkeypatch.setattr(checked_write, "check_output_model" if stage == "check" else "verify_into", fail)
    out = tmp_path / "out.onnx"
    before = files_of(tmp_path)
    with pytest.raises((PassError, VerificationError)):
        prune_model(mlp, output=out, target="none")
    assert files_of(tmp_path) == before  # no output, no data file, no staging folder
    assert not external_data._pending


def test_in_memory_result_is_self_contained(mlp):
    result = prune_model(mlp, target="none")
    assert not has_pending(result.model)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in result.model.graph.initializer)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((1, SHAPE.seq, SHAPE.hidden), np.float32)
    np.testing.assert_allclose(session.run(None, {"input": x})[0], run(mlp, x), rtol=1e-5, atol=1e-5)


def test_the_whole_model_is_read_only_when_asked_for(mlp):
    loaded = load_model(mlp)
    assert loaded.mapped is not None
    model = loaded.model  # a caller that wants a self-contained ModelProto
    assert loaded.mapped is None and not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert params(model) == SHAPE.params


def test_pages_of_earlier_tensors_are_handed_back_past_the_budget(mlp, monkeypatch):
    released = []
    monkeypatch.setattr(external_data.MappedFile, "release", lambda self, offset, length: released.append((offset, length)))
    loaded = load_model(mlp)
    loaded.mapped.budget = 100_000  # below two W1s (64 KiB each)
    graph = to_graph(loaded)
    for name in ("block0.w1", "block0.w2", "block1.w1"):
        graph.tensors()[name].values.sum()
    assert released  # the first ones were released once the budget was passed


def test_flushing_subnormals_reads_each_mapped_weight_ahead_and_keeps_its_values(mlp, monkeypatch):
    from passes.flush_subnormals import FlushSubnormalsPass

    asked = []
    real = external_data.MappedFile.prefetch
    monkeypatch.setattr(external_data.MappedFile, "prefetch",
                        lambda self, offset, length: (asked.append((offset, length)), real(self, offset, length)))
    loaded = load_model(mlp)
    graph = to_graph(loaded)
    before = {name: t.values.copy() for name, t in graph.tensors().items() if isinstance(t, MappedConstant)}
    FlushSubnormalsPass()(graph)  # random normal float32 weights: no subnormals
    refs = sorted((t._values.ref.offset, t._values.ref.length) for t in graph.tensors().values() if isinstance(t, MappedConstant))
    assert sorted(asked) == refs  # every weight once
    assert all(np.array_equal(graph.tensors()[name].values, v) for name, v in before.items())


def test_float16_external_model_prunes_exactly(tmp_path):
    shape = MlpShape(blocks=2, hidden=64, ffn=256, dtype="float16", seq=4, dead=64)
    src, out = tmp_path / "h.onnx", tmp_path / "h-out.onnx"
    build_model(src, shape)
    prune_model(src, output=out, target="none")
    x = np.random.default_rng(0).standard_normal((1, shape.seq, shape.hidden)).astype(np.float16)
    np.testing.assert_allclose(run(out, x).astype(np.float32), run(src, x).astype(np.float32), rtol=1e-2, atol=1e-2)
    assert params(onnx.load(src)) - params(onnx.load(out)) == shape.removable_params


def test_the_reported_phases_add_up_to_the_command():
    timings = _whole_command_timings({"load": 0.5, "save": 0.25}, 1.0, 1.0)
    assert list(timings) == ["startup", "load", "save", "other"]
    assert sum(timings.values()) == pytest.approx(1.0 + 1.0)


def test_constant_subgraphs_over_mapped_weights_fold_and_prune(tmp_path):
    """A weight stored transposed (MatMul reads Transpose(W^T)): fold-constants runs the Transpose on ONNX Runtime
    from the mapped bytes, and the dead columns are still deleted."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 64)).astype(np.float32)
    w1[:, :16] = 0
    w2 = rng.standard_normal((64, 32)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["w1t"], ["w1"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1t"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = tmp_path / "t.onnx", tmp_path / "t-out.onnx"
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True, location="t.bin", size_threshold=0)
    result = prune_model(src, output=out, target="none")
    assert result.report.plan.removed_channels == 16
    x = rng.standard_normal((3, 32)).astype(np.float32)
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_write_failing_midway_leaves_no_file_and_nothing_pending(mlp, tmp_path, monkeypatch):
    from onnxprune import atomic_write

    calls = []
    append = atomic_write._DataFile.append

    def fail_on_third(self, tensor, data):
        calls.append(tensor.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        append(self, tensor, data)

    monkeypatch.setattr(atomic_write._DataFile, "append", fail_on_third)
    before = files_of(tmp_path)
    with pytest.raises(OSError):
        prune_model(mlp, output=tmp_path / "out.onnx", target="none")
    assert len(calls) == 3 and files_of(tmp_path) == before
    assert not external_data._pending
