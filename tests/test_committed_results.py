"""The ONNX models committed under benchmarks/results/ keep the issue's contract and reproduce their result.json.

Contract: float32 images in [0, 1], NCHW, a dynamic batch axis, normalisation inside the graph. Each
folder's dense.onnx and pruned.onnx, run on ONNX Runtime CPU over the MNIST test set, give the test
errors its result.json reports (to the image).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.data import load_dataset
from onnxprune.runtime import make_session

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
COMMITTED = sorted(d for d in RESULTS.iterdir() if (d / "dense.onnx").exists() and (d / "pruned.onnx").exists())


def test_the_mnist_runs_commit_their_models():
    names = {d.name for d in COMMITTED}
    assert {"mnist-lenet5-sbp", "mnist-lenet500-sbp", "mnist-lenet5-rbp", "mnist-lenet5-turbovbi"} <= names


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda d: d.name)
@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_committed_model_takes_nchw_float_images_with_a_dynamic_batch(folder: Path, which: str):
    model = onnx.load(str(folder / f"{which}.onnx"))
    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert not dims[0].HasField("dim_value")  # symbolic batch
    session = make_session(str(folder / f"{which}.onnx"))
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
        (logits,) = session.run(None, {inp.name: x})
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda d: d.name)
def test_committed_models_reproduce_the_reported_test_errors(folder: Path):
    result = json.loads((folder / "result.json").read_text())
    x, y = load_dataset(result["config"]["data"], split="test")
    for which in ("dense", "pruned"):
        session = make_session(str(folder / f"{which}.onnx"))
        name = session.get_inputs()[0].name
        pred = np.concatenate([session.run(None, {name: x[i : i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])
        error = 100 * float((pred != y).mean())
        assert error == pytest.approx(result["error_pct"][which], abs=0.011), (which, error)


@pytest.mark.parametrize("name", ["mnist-lenet5-sbp", "mnist-lenet5-rbp", "mnist-lenet5-turbovbi"])
def test_committed_lenet5_runs_record_that_the_pruned_model_predicts_as_the_wrapped_net(name: str):
    result = json.loads((RESULTS / name / "result.json").read_text())
    assert result["agreement_with_wrapped"]["pruned"] >= 0.999
    assert abs(result["error_pct"]["wrapped_torch"] - result["error_pct"]["pruned"]) <= 0.01
