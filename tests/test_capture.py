"""Capturing models for the wrapper: torch.fx where it traces, torch.export where it does not, one error otherwise."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxprune.bayes import wrap
from onnxprune.bayes.capture import CaptureError, capture
from onnxprune.bayes.exporting import compress


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    """conv-bn-relu twice, a residual add, a classifier; ``branchy`` adds Python control flow on a shape."""

    def __init__(self, branchy: bool) -> None:
        super().__init__()
        self.branchy = branchy
        self.b1, self.b2 = Block(3, 8), Block(8, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b1(x)
        h = h + self.b2(h)
        if self.branchy and x.shape[-1] > 8:  # torch.fx cannot branch on a traced shape
            h = torch.nn.functional.max_pool2d(h, 2)
        h = h.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


class DataDependent(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b1(x)
        if h.sum() > 0:  # a branch on a value: neither capture can trace it
            h = h * 2
        return self.fc2(torch.relu(self.fc1(h.mean(dim=(2, 3)))))


def _net(branchy: bool) -> Net:
    torch.manual_seed(0)
    return Net(branchy).eval()


def test_fx_traceable_model_is_captured_by_fx() -> None:
    assert capture(_net(False), (torch.rand(1, 3, 16, 16),))[1] == "fx"


def test_model_fx_cannot_trace_is_captured_by_export_and_computes_the_same() -> None:
    model = _net(True)
    gm, how = capture(model, (torch.rand(1, 3, 16, 16),))
    assert how == "export"
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"b1.conv", "b1.bn", "b1.act", "b2.conv", "fc1", "fc2"} <= modules
    x = torch.rand(5, 3, 16, 16)  # another batch size than the example's
    torch.testing.assert_close(gm(x), model(x))


def test_captured_graph_trains_the_model_s_own_modules() -> None:
    model = _net(True)
    gm, _ = capture(model, (torch.rand(1, 3, 16, 16),))
    gm.train()
    before = gm.get_submodule("b1.bn").running_mean.clone()
    gm(torch.rand(4, 3, 16, 16)).sum().backward()
    assert not torch.equal(gm.get_submodule("b1.bn").running_mean, before)  # BatchNorm runs live, in training mode
    assert gm.get_submodule("fc1").weight.grad is not None
    assert gm.get_submodule("fc1") is model.fc1


def test_export_captured_wrap_gates_as_the_fx_one_and_compresses_exactly() -> None:
    x = torch.rand(1, 3, 16, 16)
    traced, exported = wrap(_net(False), (x,)), wrap(_net(True), (x,))
    assert (traced.captured_by, exported.captured_by) == ("fx", "export")
    sizes = {k: g.num_channels for k, g in exported.gates.items()}
    assert sizes == {k: g.num_channels for k, g in traced.gates.items()}
    with torch.no_grad():
        for gate in exported.gates.values():
            gate.mu[: gate.num_channels // 2] = 0.0
            gate.log_sigma[: gate.num_channels // 2] = 3.0
    exported.eval()
    pruned = compress(exported, (x,), target="none")
    session = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = torch.rand(3, 3, 16, 16)
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    np.testing.assert_allclose(got, exported(batch).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert exported.kept_fraction() < 1.0


def test_model_no_capture_can_trace_is_one_error_naming_the_model_and_both_captures() -> None:
    with pytest.raises(CaptureError) as info:
        wrap(DataDependent(False), (torch.rand(1, 3, 16, 16),))
    message = str(info.value)
    assert "DataDependent" in message and "torch.fx" in message and "torch.export" in message
    assert "test_capture.py" in message  # where in the user's code it stumbled
    assert "\n" not in message


def test_capture_fx_only_refuses_what_fx_cannot_trace_and_unknown_capture_is_refused() -> None:
    with pytest.raises(CaptureError, match="torch.fx"):
        capture(_net(True), (torch.rand(1, 3, 16, 16),), "fx")
    with pytest.raises(ValueError, match="capture must be one of"):
        capture(_net(False), (torch.rand(1, 3, 16, 16),), "jit")


class DropPath(nn.Module):
    """A parameter-free module whose forward branches on ``self.training`` (as stochastic depth does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.5).to(x.dtype) * 2


class WithDropPath(Net):
    def __init__(self) -> None:
        super().__init__(False)
        self.drop = DropPath()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b1(x)
        h = h + self.drop(self.b2(h))
        return self.fc2(torch.relu(self.fc1(h.mean(dim=(2, 3)))))


def test_mode_dependent_module_runs_live_so_evaluation_is_deterministic() -> None:
    torch.manual_seed(0)
    model = WithDropPath().train()  # traced in training mode, as users wrap
    wrapped = wrap(model, (torch.rand(1, 3, 16, 16),))
    assert any(n.op == "call_module" and n.target == "drop" for n in wrapped.model.graph.nodes)
    wrapped.eval()
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(wrapped(x), wrapped(x))
