"""gather-rows: a Gather of kept features before a Gemm/MatMul reads rows of the transposed input instead."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.api import run_passes
from passes.gather_rows import GatherRowsPass
from tests.graphs import GraphBuilder, attr, nodes_of
from tests.prune_helpers import prune_checked, run, same_outputs

KEPT = [1, 2, 5, 7, 8, 11]


def gated_image_mlp(side: int = 6) -> onnx.ModelProto:
    """x [n, 1, side, side] -> Flatten -> * pixel gate (some pixels rejected) -> Gemm -> Relu -> Gemm."""
    b = GraphBuilder(seed=3)
    pixels = side * side
    gate = np.ones((1, pixels), np.float32)
    gate[0, b.rng.permutation(pixels)[: pixels // 2]] = 0
    f = b.node("Flatten", [b.input("x", ["n", 1, side, side])], name="flatten", axis=1)
    x = b.node("Mul", [f, b.const("pixel_gate", gate)], name="gate")
    h = b.node("Gemm", [x, b.const("w1", b.rng.standard_normal((10, pixels))), b.const("b1", b.rng.standard_normal(10))],
               name="fc1", transB=1)
    r = b.node("Relu", [h], name="relu")
    b.node("Gemm", [r, b.const("w2", b.rng.standard_normal((10, 3)))], name="fc2", outputs=["y"])
    b.output("y")
    return b.build()


def gathered(op: str = "Gemm", *, batch: int | str = "n", readers: int = 1, axis: int = 1, opset: int = 17) -> onnx.ModelProto:
    """x [batch, 12] -> Gather(axis, KEPT) -> ``readers`` Gemm or MatMul layers -> outputs."""
    b = GraphBuilder(opset=opset, seed=1)
    x = b.input("x", [batch, 12])
    g = b.node("Gather", [x, b.ints("kept", KEPT)], name="gather", axis=axis)
    for i in range(readers):
        w = b.const(f"w{i}", b.rng.standard_normal((12 if axis == 0 else len(KEPT), 4)))
        b.node(op, [g, w], name=f"{op.lower()}{i}", outputs=[f"y{i}"])
        b.output(f"y{i}")
    return b.build()


def lowered(model: onnx.ModelProto):
    """The model after gather-rows (verified on ONNX Runtime by run_passes) and the pass's result."""
    result = run_passes(model, [GatherRowsPass()])
    return result.model, result.report.passes[-1].result


def batch_of(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    dims = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


def test_pruned_mlp_reads_its_kept_pixels_as_rows_and_keeps_the_input_models_outputs():
    model = gated_image_mlp()
    pruned = prune_checked(model).model
    assert [attr(n, "axis") for n in nodes_of(pruned, "Gather")] == [1]
    out, result = lowered(pruned)
    assert result.modified and result.details["rewritten"] == [nodes_of(pruned, "Gather")[0].name]
    assert [attr(n, "axis") for n in nodes_of(out, "Gather")] == [0]
    assert [attr(n, "perm") for n in nodes_of(out, "Transpose")] == [[1, 0]]
    assert attr(next(n for n in out.graph.node if n.name == "fc1"), "transA") == 1
    assert same_outputs(model, out)
    for n in (1, 7, 64):
        np.testing.assert_allclose(run(out, batch_of(out, n))[0], run(pruned, batch_of(pruned, n))[0], rtol=1e-6)


def test_the_cost_report_counts_the_same_macs_for_a_transposed_read():
    result = run_passes(prune_checked(gated_image_mlp()).model, [GatherRowsPass()])
    assert result.report.after.macs == result.report.before.macs


def test_a_matmul_reader_becomes_a_gemm_reading_rows():
    model = gathered("MatMul")
    out, result = lowered(model)
    assert result.modified
    assert [n.op_type for n in out.graph.node] == ["Transpose", "Gather", "Gemm"]
    assert attr(nodes_of(out, "Gemm")[0], "transA") == 1
    np.testing.assert_allclose(run(out, batch_of(out, 9))[0], run(model, batch_of(model, 9))[0], rtol=1e-6)


def test_non_finite_values_in_features_not_kept_stay_unread():
    model = gathered()
    out, _ = lowered(model)
    feed = batch_of(model, 5)
    dropped = [i for i in range(12) if i not in KEPT]
    feed["x"][:, dropped[0]] = np.nan
    feed["x"][:, dropped[1]] = np.inf
    got = run(out, feed)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, run(model, feed)[0], rtol=1e-6)


def test_gathers_of_one_input_share_one_transpose():
    b = GraphBuilder(seed=2)
    x = b.input("x", ["n", 12])
    for i, kept in enumerate((KEPT, [0, 3, 4, 9])):
        g = b.node("Gather", [x, b.ints(f"kept{i}", kept)], name=f"gather{i}", axis=1)
        b.node("Gemm", [g, b.const(f"w{i}", b.rng.standard_normal((len(kept), 4)))], name=f"fc{i}", outputs=[f"y{i}"])
        b.output(f"y{i}")
    model = b.build()
    out, result = lowered(model)
    assert result.details["rewritten"] == ["gather0", "gather1"]
    assert len(nodes_of(out, "Transpose")) == 1
    assert same_outputs(model, out)


def test_a_graph_without_gather_is_left_unchanged_and_the_pass_says_why():
    b = GraphBuilder()
    b.node("Gemm", [b.input("x", ["n", 12]), b.const("w", np.ones((12, 4)))], name="fc", outputs=["y"])
    b.output("y")
    model = b.build()
    out, result = lowered(model)
    assert not result.modified
    assert result.summary == "no change: the graph has no Gather"
    assert [n.op_type for n in out.graph.node] == ["Gemm"]


def relu_reader() -> onnx.ModelProto:
    b = GraphBuilder()
    g = b.node("Gather", [b.input("x", ["n", 12]), b.ints("kept", KEPT)], name="gather", axis=1)
    b.node("Gemm", [b.node("Relu", [g], name="relu"), b.const("w", np.ones((len(KEPT), 4)))], name="fc", outputs=["y"])
    b.output("y")
    return b.build()


@pytest.mark.parametrize(("model", "reason"), [
    (relu_reader, "Relu 'relu' reads it"),
    (lambda: gathered(axis=0, batch=12), "already gathers rows"),
    (lambda: gathered(batch=1), "one row"),
    (lambda: gathered("MatMul", opset=9), "cannot become a Gemm (opset 9"),
], ids=["read-by-relu", "rows-already", "batch-one", "old-opset-matmul"])
def test_gathers_it_cannot_read_as_rows_stay_and_the_pass_says_why(model, reason):
    model = model()
    out, result = lowered(model)
    assert not result.modified
    assert reason in result.details["skipped"]["gather"]
    assert reason in result.summary
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_target_times_the_candidate_with_its_kept_pixels_gathered_as_rows():
    from onnxprune.api import prune_model

    model = gated_image_mlp(side=12)
    result = prune_model(model, target="ort-cpu", threads=1, batch=8)
    names = [a["attempt"] for a in result.report.latency["attempts"]]
    assert any(n.endswith("kept inputs gathered as rows") for n in names), names
    assert same_outputs(model, result.model)


def test_target_times_an_already_pruned_model_with_its_kept_pixels_gathered_as_rows():
    from onnxprune.api import prune_model

    pruned = prune_checked(gated_image_mlp(side=12)).model
    result = prune_model(pruned, target="ort-cpu", threads=1, batch=8)
    attempts = result.report.latency["attempts"]
    assert [a for a in attempts if a["attempt"].endswith("kept inputs gathered as rows")], attempts
    assert same_outputs(pruned, result.model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torchvision_mlp_from_both_exporters_reads_its_kept_inputs_as_rows(exporter):
    """torchvision.ops.MLP with half its input features read only by zero weights: --assume-finite drops them
    through a Gather, which gather-rows reads as rows; the target times that form too."""
    torch = pytest.importorskip("torch")
    from onnxprune.api import prune_model
    from onnxprune.torch_export import export_onnx
    from tests.vision import import_torchvision

    torch.manual_seed(0)
    mlp = import_torchvision().ops.MLP(64, [32, 16, 10]).eval()
    with torch.no_grad():
        mlp[0].weight[:, ::2] = 0
    model = export_onnx(mlp, torch.rand(2, 64), exporter=exporter)
    pruned = prune_model(model, target="none", assume_finite=True).model
    out, result = lowered(pruned)
    assert result.modified and [attr(n, "axis") for n in nodes_of(out, "Gather")] == [0]
    assert same_outputs(model, out)
    chosen = prune_model(model, target="ort-cpu", threads=1, batch=64, assume_finite=True)
    attempts = [a["attempt"] for a in chosen.report.latency["attempts"]]
    assert any(a.endswith("kept inputs gathered as rows") for a in attempts), attempts
