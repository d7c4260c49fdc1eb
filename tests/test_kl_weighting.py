"""KL weighted by MACs per channel (onnxprune.bayes.costs)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import models  # noqa: E402
from onnxprune import bayes  # noqa: E402
from onnxprune.bayes.costs import channel_costs, layer_macs, weight_kl_by_macs  # noqa: E402

MNIST = torch.zeros(1, 1, 28, 28)


def test_channel_cost_is_own_layer_plus_the_layers_that_read_it():
    wrapped = bayes.wrap(models.lenet5(), MNIST, method="sbp")
    assert channel_costs(wrapped, MNIST) == {
        "conv1": 25 * 24 * 24 + 50 * 25 * 8 * 8,  # its own filter, and conv2's MACs per input channel
        "conv2": 20 * 25 * 8 * 8 + 4 * 4 * 500,  # and fc1's 16 features per channel
        "fc1": 800 + 10,
    }


def test_input_gates_are_charged_only_their_consumers():
    wrapped = bayes.wrap(models.lenet500(), MNIST, method="sbp", gate_inputs=True)
    costs = channel_costs(wrapped, MNIST)
    assert costs["input_fc1"] == 500 and costs["fc1"] == 784 + 300 and costs["fc2"] == 500 + 10


def test_weights_average_one_per_channel_and_leave_the_initial_kl_unchanged():
    wrapped = bayes.wrap(models.lenet5(), MNIST, method="sbp")
    before = float(wrapped.kl().detach())
    weights = weight_kl_by_macs(wrapped, MNIST)
    sizes = {k: g.num_channels for k, g in wrapped.gates.items()}
    assert sum(weights[k] * sizes[k] for k in sizes) / sum(sizes.values()) == pytest.approx(1.0)
    assert weights["conv1"] > weights["conv2"] > 1 > weights["fc1"]
    assert float(wrapped.kl().detach()) == pytest.approx(before, rel=1e-6)  # every gate starts at the same posterior


def test_weighted_kl_is_each_groups_kl_times_its_weight():
    wrapped = bayes.wrap(models.lenet5(), MNIST, method="sbp")
    with torch.no_grad():
        for i, gate in enumerate(wrapped.gates.values()):
            gate.mu.normal_(generator=torch.Generator().manual_seed(i))
    weights = weight_kl_by_macs(wrapped, MNIST)
    expected = sum(weights[k] * float(g.kl().detach()) for k, g in wrapped.gates.items())
    assert float(wrapped.kl().detach()) == pytest.approx(expected, rel=1e-5)


def test_residual_channels_are_charged_every_later_reader():
    wrapped = bayes.wrap(models.resnet20(), torch.zeros(1, 3, 32, 32), method="sbp")
    costs = channel_costs(wrapped, torch.zeros(1, 3, 32, 32))
    macs = layer_macs(wrapped.model, (torch.zeros(1, 3, 32, 32),))
    assert costs and all(c > 0 for c in costs.values())
    assert max(costs.values()) <= sum(macs.values())
