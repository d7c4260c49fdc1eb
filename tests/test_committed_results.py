"""The ONNX models committed in the results store keep the issue's contract and reproduce their run's result.

Contract: float32 images in [0, 1], NCHW, a dynamic batch axis, normalisation inside the graph. Every
RUN.dense.onnx and RUN.pruned.onnx under benchmarks/results/EXPERIMENT/, run on ONNX Runtime CPU over
the MNIST test set, gives the test error RUN.json reports (to the image).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from benchmarks.store import committed_models, locate
from onnxprune.data import load_dataset
from onnxprune.runtime import make_session

MODELS = committed_models()


def run_of(model: Path) -> tuple[str, str]:
    """(run, dense or pruned) of a committed RUN.WHICH.onnx."""
    run, which, _ = model.name.rsplit(".", 2)
    return run, which


def test_the_mnist_runs_commit_their_models():
    committed = {run_of(m) for m in MODELS}
    for run in ("mnist-lenet5-sbp", "mnist-lenet500-sbp", "mnist-lenet5-rbp", "mnist-lenet5-turbovbi"):
        assert {(run, "dense"), (run, "pruned")} <= committed


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_every_committed_model_sits_beside_its_runs_result(model: Path):
    run, which = run_of(model)
    assert which in ("dense", "pruned")
    assert locate(run) == model.with_name(f"{run}.json")


@pytest.mark.parametrize("path", MODELS, ids=lambda m: m.name)
def test_committed_model_takes_nchw_float_images_with_a_dynamic_batch(path: Path):
    model = onnx.load(str(path))
    (inp,) = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert not dims[0].HasField("dim_value")  # symbolic batch
    session = make_session(str(path))
    for batch in (1, 3):
        x = np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)
        (logits,) = session.run(None, {inp.name: x})
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("path", MODELS, ids=lambda m: m.name)
def test_committed_models_reproduce_the_reported_test_errors(path: Path):
    run, which = run_of(path)
    result = json.loads(path.with_name(f"{run}.json").read_text())
    x, y = load_dataset(result["config"]["data"], split="test")
    session = make_session(str(path))
    name = session.get_inputs()[0].name
    pred = np.concatenate([session.run(None, {name: x[i : i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)])
    error = 100 * float((pred != y).mean())
    assert error == pytest.approx(result["error_pct"][which], abs=0.011), (which, error)


@pytest.mark.parametrize("name", ["mnist-lenet5-sbp", "mnist-lenet5-rbp", "mnist-lenet5-turbovbi"])
def test_committed_lenet5_runs_record_that_the_pruned_model_predicts_as_the_wrapped_net(name: str):
    result = json.loads(locate(name).read_text())
    assert result["agreement_with_wrapped"]["pruned"] >= 0.999
    assert abs(result["error_pct"]["wrapped_torch"] - result["error_pct"]["pruned"]) <= 0.01
