"""The ChannelGate interface: a gate of one's own, with only the required members, through wrap, fit and export."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import models  # noqa: E402
from onnxprune import bayes  # noqa: E402
from onnxprune.api import prune_model  # noqa: E402
from onnxprune.bayes.exporting import export, gate_summary  # noqa: E402
from onnxprune.bayes.gate import ChannelGate, TrainingPlan  # noqa: E402
from onnxprune.bayes.methods import METHODS, gate_class, register_method  # noqa: E402
from onnxprune.bayes.rbp import RBPGate  # noqa: E402
from onnxprune.bayes.sbp import SBPGate  # noqa: E402
from onnxprune.bayes.training import fit  # noqa: E402
from onnxprune.bayes.turbo_vbi import TurboVBIGate  # noqa: E402
from onnxprune.data import load_dataset  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402
from tests.prune_helpers import layer_widths  # noqa: E402


class HardConcreteGate(ChannelGate):
    """An L0 gate (Louizos, Welling, Kingma 2018) implementing only what ChannelGate requires."""

    BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1

    def __init__(self, num_channels: int, penalty: float = 1e-2) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.penalty = penalty
        self.log_alpha = torch.nn.Parameter(torch.full((num_channels,), 3.0))

    def _stretched(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0.0, 1.0)

    def kl(self) -> torch.Tensor:
        """The expected number of open gates, times the penalty."""
        return self.penalty * torch.sigmoid(self.log_alpha - self.BETA * math.log(-self.GAMMA / self.ZETA)).sum()

    def sample(self, n: int) -> torch.Tensor:
        u = torch.rand(n, self.num_channels).clamp(1e-6, 1 - 1e-6)
        return self._stretched(torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.BETA))

    def deterministic(self) -> torch.Tensor:
        return self._stretched(torch.sigmoid(self.log_alpha))


class JointHardConcreteGate(HardConcreteGate):
    """Declares a joint key: the bank must sample and KL all such gates through the class's joint functions."""

    calls: list[tuple[str, int]] = []

    def joint_key(self):
        return "all"

    @classmethod
    def sample_jointly(cls, gates, n):
        cls.calls.append(("sample", len(gates)))
        return super().sample_jointly(gates, n)

    @classmethod
    def kl_jointly(cls, gates, weights):
        cls.calls.append(("kl", len(gates)))
        return super().kl_jointly(gates, weights)


@pytest.fixture
def hard_concrete():
    register_method("hard-concrete", HardConcreteGate)
    yield "hard-concrete"
    METHODS.pop("hard-concrete")


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", split="train")
    return x[:128], y[:128]


def test_a_gate_with_only_the_required_members_wraps_trains_and_exports_with_rejected_channels_at_zero(hard_concrete, digits):
    x, y = digits
    torch.manual_seed(0)
    example = torch.as_tensor(x[:4]).float()
    wrapped = bayes.wrap(models.build("lenet5"), (example[:1],), method=hard_concrete)
    assert wrapped.gates and all(type(g) is HardConcreteGate for g in wrapped.gates.values())
    before = {k: g.log_alpha.detach().clone() for k, g in wrapped.gates.items()}
    history = fit(wrapped, x, y, epochs=1, batch_size=32, gate_lr=0.05, progress=False, compile_step=False)
    assert len(history.epochs) == 1 and math.isfinite(history.epochs[0].loss)
    assert all(not torch.equal(g.log_alpha.detach(), before[k]) for k, g in wrapped.gates.items()), "gates did not train"
    first = next(iter(wrapped.gates.values()))
    with torch.no_grad():
        first.log_alpha[:3] = -10.0  # rejected: the stretched sigmoid clamps to exactly 0
    assert first.deterministic()[:3].tolist() == [0.0, 0.0, 0.0]
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(example).numpy()
    onnx_model = export(wrapped, (example[:1],))
    got = make_session(onnx_model).run(None, {"input": example.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    conv1 = next(n for n in onnx_model.graph.node if n.op_type == "Conv")
    assert not inits[conv1.input[1]][:3].any() and not inits[conv1.input[2]][:3].any()  # folded: exact zeros
    pruned = prune_model(onnx_model, target="none").model
    assert layer_widths(pruned)[conv1.name][1] == layer_widths(onnx_model)[conv1.name][1] - 3
    summary = gate_summary(wrapped)
    assert all(set(entry) == {"layers", "channels", "kept"} for entry in summary.values())  # no expected, no snr


def test_gates_with_a_joint_key_are_sampled_and_kld_through_their_class_in_one_call():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 3))
    register_method("joint-hard-concrete", JointHardConcreteGate)
    try:
        wrapped = bayes.wrap(net, (torch.rand(1, 4),), method="joint-hard-concrete")
    finally:
        METHODS.pop("joint-hard-concrete")
    JointHardConcreteGate.calls.clear()
    wrapped.train()
    wrapped(torch.rand(5, 4))
    kl = wrapped.kl()
    assert JointHardConcreteGate.calls == [("sample", 2), ("kl", 2)]
    torch.testing.assert_close(kl, sum(g.kl() for g in wrapped.gates.values()))


def test_every_hook_has_a_no_op_default():
    gate = HardConcreteGate(3)
    plan = TrainingPlan(epochs=2, steps_per_epoch=1, gate_lr=1e-3, lr_factor=lambda epoch, step: 1.0)
    assert gate.clip_() is gate and gate.attach([]) is gate
    gate.begin_epoch(0, 2), gate.before_step(), gate.after_step(), gate.compile_numerics(True), gate.read_state_as_data(True)
    assert gate.stage_epochs(0, 2) is None and gate.reach_shortfall(plan) is None and gate.joint_key() is None
    assert not gate.leaves_parameters_unused() and gate.expected() is None and gate.snr() is None
    gate.set_stage(1, 4)
    assert (gate.stage_index, gate.stage_count) == (1, 4)


def test_a_gate_missing_a_required_member_says_which():
    class Incomplete(ChannelGate):
        num_channels = 2

    with pytest.raises(NotImplementedError, match=r"Incomplete must implement kl\(\)"):
        Incomplete().kl()
    with pytest.raises(NotImplementedError, match=r"sample\(n\)"):
        Incomplete().sample(1)


def test_the_registry_maps_method_names_to_channel_gate_classes():
    assert METHODS["sbp"] is SBPGate and METHODS["rbp"] is RBPGate and METHODS["turbo-vbi"] is TurboVBIGate
    assert all(issubclass(cls, ChannelGate) for cls in METHODS.values())
    assert gate_class("rbp") is RBPGate
    with pytest.raises(ValueError, match="unknown method 'nope'; known: sbp, rbp, turbo-vbi"):
        gate_class("nope")
    with pytest.raises(TypeError, match="ChannelGate subclass"):
        register_method("plain", torch.nn.Identity)
    assert "plain" not in METHODS
