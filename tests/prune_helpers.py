"""Helpers for tests that prune a model and check the result."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune.api import RunResult, prune_model
from onnxprune.runtime import input_specs, make_session, random_feed


def prune_checked(model: onnx.ModelProto, **kwargs) -> RunResult:
    """Prune (every dead channel unless a target is given) with verification on; also assert the output
    passes the full ONNX check and keeps the interface."""
    kwargs.setdefault("target", "none")
    result = prune_model(model, **kwargs)
    out = result.model
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input if i.name not in {t.name for t in out.graph.initializer}] == [
        i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
    ]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert list(out.opset_import) == list(model.opset_import)
    assert out.ir_version == model.ir_version
    return result


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model).run(None, feed)


def same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, seed: int = 0, rtol: float = 1e-4) -> bool:
    """Both models give the same outputs on the same random inputs (relative to the output scale)."""
    sa = make_session(a)
    feed = random_feed(input_specs(sa), np.random.default_rng(seed))
    for x, y in zip(sa.run(None, feed), make_session(b).run(None, feed)):
        x, y = x.astype(np.float64), y.astype(np.float64)
        scale = max(float(np.max(np.abs(x))), 1e-12)
        if x.shape != y.shape or float(np.max(np.abs(x - y))) > rtol * scale:
            return False
    return True


def layer_widths(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(in, out) channels per Conv/Gemm/MatMul node name, from its constant weight."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            out[node.name] = (w.shape[1] * group, w.shape[0])
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out[node.name] = (w.shape[1], w.shape[0]) if trans_b else (w.shape[0], w.shape[1])
        else:
            out[node.name] = (w.shape[0], w.shape[1])
    return out
