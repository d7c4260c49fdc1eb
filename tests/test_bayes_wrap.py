"""Wrapping models with Bayesian gates, the ELBO, and export with gates folded in (real ORT sessions)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import models  # noqa: E402
from onnxprune import bayes  # noqa: E402
from onnxprune.api import prune_model  # noqa: E402
from onnxprune.bayes import exporting  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402
from tests.prune_helpers import layer_widths  # noqa: E402

SMALL = ["lenet300", "lenet5", "vgg_cifar", "resnet20", "mobilenetv2_cifar", "densenet_cifar", "resnext_cifar",
         "senet_cifar", "transformer_block"]


def export(wrapped, example_inputs, path=None):
    """``onnxprune.export`` through the TorchScript exporter: these tests are about the gates (it is several times
    faster, and names layers by module); tests/test_exporters.py exports wrapped models with both exporters."""
    return exporting.export(wrapped, example_inputs, path, exporter="torchscript")


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {"width": 0.25} if name == "vgg_cifar" else {}
    model = models.build(name, **kwargs).eval()
    models.randomize_batchnorm(model, seed)
    spec = models.REGISTRY[name]
    return model, torch.rand(4, *spec.input_shape)


def reject_some(wrapped, fraction: float = 0.4, seed: int = 0) -> None:
    """Posterior that rejects ``fraction`` of every gate's channels (as a trained one would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in wrapped.gates.values():
            n = gate.num_channels
            k = int(round(fraction * n))
            if k >= n:
                k = n - 1
            idx = torch.randperm(n, generator=g)[:k]
            gate.mu.zero_()
            gate.log_sigma.fill_(-5.0)
            gate.mu[idx] = -15.0
            gate.log_sigma[idx] = 2.0


@pytest.mark.parametrize("name", SMALL)
def test_wrap_gates_every_prunable_group_and_export_prunes_the_rejected_channels(name):
    model, x = build(name)
    wrapped = bayes.wrap(model, (x[:1],), method="sbp")
    assert wrapped.gates, "no gate inserted"
    reject_some(wrapped)
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(x).numpy()
    onnx_model = export(wrapped, (x[:1],))
    out = make_session(onnx_model).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    pruned = prune_model(onnx_model, target="none").model
    got = make_session(pruned).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    # Every rejected channel is deleted: the gated layers shrink by exactly the rejected count.
    kept = wrapped.kept()
    dense_w, pruned_w = layer_widths(onnx_model), layer_widths(pruned)
    removed = sum(dense_w[n][1] - pruned_w[n][1] for n in dense_w)
    assert removed > 0
    rejected = sum(total - k for k, total in kept.values())
    assert removed >= rejected  # coupled layers (a residual stream) lose the channel in each producer


def test_classifier_outputs_are_never_gated():
    model, x = build("lenet5")
    wrapped = bayes.wrap(model, (x[:1],))
    assert set(wrapped.gates) == {"conv1", "conv2", "fc1"}
    assert all(site.layer != "fc2" for site in wrapped.sites)


def test_residual_stream_channels_share_one_gate():
    model, x = build("resnet20")
    wrapped = bayes.wrap(model, (x[:1],))
    streams = [g for g, layers in wrapped.group_layers.items() if len(layers) > 1]
    assert streams, "the residual stream should be one gated group"
    # Stage 1 stream: the stem and every stage-1 block's second conv.
    stem = next(g for g in streams if "conv1" in wrapped.group_layers[g])
    assert {"layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"} <= set(wrapped.group_layers[stem])


def test_exclude_leaves_a_layer_ungated():
    model, x = build("lenet5")
    wrapped = bayes.wrap(model, (x[:1],), exclude=["conv1"])
    assert "conv1" not in wrapped.gates


def test_training_mode_samples_per_example_and_eval_is_deterministic():
    model, x = build("lenet5")
    wrapped = bayes.wrap(model, (x[:1],))
    with torch.no_grad():
        for gate in wrapped.gates.values():
            gate.log_sigma.fill_(0.0)
    wrapped.train()
    torch.manual_seed(0)
    a = wrapped(x)
    b = wrapped(x)
    assert not torch.allclose(a, b)
    wrapped.eval()
    assert torch.equal(wrapped(x), wrapped(x))


def test_batch_noise_shares_one_gate_sample_across_the_minibatch():
    model, x = build("lenet5")
    wrapped = bayes.wrap(model, (x[:1],), noise="batch")
    with torch.no_grad():
        for gate in wrapped.gates.values():
            gate.log_sigma.fill_(0.0)
    wrapped.train()
    same = x[:1].expand(4, *x.shape[1:]).contiguous()
    out = wrapped(same)  # one draw for the whole minibatch: identical inputs, identical outputs
    assert torch.equal(out[0], out[3])
    for key in wrapped.gates:
        assert wrapped.bank.theta(key, 4).shape[0] == 1
    per_example = bayes.wrap(model, (x[:1],))
    with torch.no_grad():
        for gate in per_example.gates.values():
            gate.log_sigma.fill_(0.0)
    per_example.train()
    out = per_example(same)
    assert not torch.allclose(out[0], out[3])


def test_pre_bias_placement_keeps_the_output_placement_where_a_batchnorm_follows():
    model, x = build("vgg_cifar")
    wrapped = bayes.wrap(model, (x[:1],), placement="pre-bias")
    assert wrapped.sites and all(s.norm and not s.pre_bias for s in wrapped.sites)


@pytest.mark.parametrize("name", ["lenet5", "lenet300"])
def test_pre_bias_gates_leave_constant_channels_that_prune_folds_and_deletes(name, tmp_path):
    model, x = build(name)
    with torch.no_grad():  # biases that are not zero, so rejected channels are non-zero constants
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    wrapped = bayes.wrap(model, (x[:1],), placement="pre-bias")
    assert all(s.pre_bias for s in wrapped.sites)
    reject_some(wrapped, 0.5)
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(x).numpy()
    export(wrapped, (x[:1],), tmp_path / "gated.onnx")
    prune_model(tmp_path / "gated.onnx", output=tmp_path / "pruned.onnx", target="none")
    before = layer_widths(__import__("onnx").load(tmp_path / "gated.onnx"))
    after = layer_widths(__import__("onnx").load(tmp_path / "pruned.onnx"))
    assert sum(w[1] for w in after.values()) < sum(w[1] for w in before.values())
    got = make_session(str(tmp_path / "pruned.onnx")).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_pre_bias_gate_scales_w_x_and_keeps_the_bias():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 4)
    net = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(4, 2))
    wrapped = bayes.wrap(net, (torch.zeros(1, 3),), placement="pre-bias")
    reject_some(wrapped, 0.5)
    wrapped.eval()
    x = torch.rand(5, 3)
    theta = next(iter(wrapped.gates.values())).deterministic()
    inner = wrapped.model.get_submodule("0")
    expected = net[2](torch.relu((x @ inner.weight.T) * theta + inner.bias))
    torch.testing.assert_close(wrapped(x), expected)


def test_unknown_noise_sharing_is_refused():
    model, x = build("lenet5")
    with pytest.raises(ValueError, match="noise"):
        bayes.wrap(model, (x[:1],), noise="channel")
    with pytest.raises(ValueError, match="placement"):
        bayes.wrap(model, (x[:1],), placement="input")


def test_elbo_is_n_times_cross_entropy_plus_kl():
    model, x = build("lenet5")
    wrapped = bayes.wrap(model, (x[:1],))
    y = torch.tensor([0, 1, 2, 3])
    logits = wrapped(x)
    expected = 100 * torch.nn.functional.cross_entropy(logits, y) + 0.5 * wrapped.kl()
    assert torch.allclose(bayes.elbo(logits, y, wrapped, n_train=100, kl_weight=0.5), expected)


def test_export_records_gate_statistics_in_metadata():
    import json

    model, x = build("lenet5")
    wrapped = bayes.wrap(model, (x[:1],))
    reject_some(wrapped)
    meta = {p.key: p.value for p in export(wrapped, (x[:1],)).metadata_props}
    gates = json.loads(meta["onnxprune.gates"])
    assert meta["onnxprune.method"] == "sbp"
    assert set(gates) == {"conv1", "conv2", "fc1"}
    assert all(len(g["snr"]) == g["channels"] and len(g["expected"]) == g["channels"] for g in gates.values())
    assert gates["fc1"]["kept"] == 500 - 200


def test_non_foldable_gate_becomes_a_constant_multiply():
    """ReLU6 is not positively homogeneous: the gate stays as a Mul by E[theta] * mask."""
    model, x = build("mobilenetv2_cifar")
    wrapped = bayes.wrap(model, (x[:1],))
    assert any(not s.foldable for s in wrapped.sites)
    reject_some(wrapped)
    ops = {n.op_type for n in export(wrapped, (x[:1],)).graph.node}
    assert "Mul" in ops


def test_input_gate_rejects_pixels_and_the_first_layer_reads_only_the_kept_ones():
    model, x = build("lenet300")
    wrapped = bayes.wrap(model, (x[:1],), gate_inputs=True)
    assert "input_fc1" in wrapped.gates and wrapped.gates["input_fc1"].num_channels == 784
    reject_some(wrapped, fraction=0.5)
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(x).numpy()
    pruned = prune_model(export(wrapped, (x[:1],)), target="none").model
    assert "Gather" in [n.op_type for n in pruned.graph.node]
    first = layer_widths(pruned)["/fc1/Gemm"]
    assert first[0] == 784 - 392
    got = make_session(pruned).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_input_gate_is_skipped_for_conv_first_models():
    model, x = build("lenet5")
    assert not any(k.startswith("input") for k in bayes.wrap(model, (x[:1],), gate_inputs=True).gates)


def test_sbp_gates_drawn_together_keep_each_gates_distribution_and_kl():
    from onnxprune.bayes.sbp import kl_together, sample_together

    torch.manual_seed(0)
    model = bayes.wrap(models.build("lenet5"), (torch.zeros(1, 1, 28, 28),))
    gates = list(model.gates.values())
    with torch.no_grad():
        for i, g in enumerate(gates):
            g.mu.fill_(-0.3 * (i + 1))
            g.log_sigma.fill_(-1.0 + 0.2 * i)
    torch.testing.assert_close(kl_together(gates), torch.stack([g.kl() for g in gates]).sum())
    torch.testing.assert_close(model.kl(), kl_together(gates))
    draws = sample_together(gates, 20000)
    assert [d.shape for d in draws] == [(20000, g.num_channels) for g in gates]
    for d, g in zip(draws, gates):
        torch.testing.assert_close(d.mean(0), g.expected(), rtol=0.03, atol=1e-3)


def _rejected_indices(n: int, fraction: float, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)[: min(int(round(fraction * n)), n - 1)]


def reject_some_rbp(wrapped, fraction: float = 0.4, seed: int = 0) -> None:
    """RBP posterior after training: theta away from 1 (the export must fold it in), log alpha above the
    threshold on ``fraction`` of each gate's channels; gates alternately frozen and active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, gate in enumerate(wrapped.gates.values()):
            n = gate.num_channels
            log_alpha = torch.full((n,), -6.0)
            log_alpha[_rejected_indices(n, fraction, g)] = 6.0
            gate.log_theta.copy_(0.3 * torch.randn(n, generator=g))
            gate.log_sigma2.copy_(log_alpha + 2.0 * gate.log_theta)
            gate.set_state("frozen" if i % 2 == 0 else "active")


def reject_some_turbo_vbi(wrapped, fraction: float = 0.4, seed: int = 0) -> None:
    """Turbo-VBI posterior after training: P(active) below one half on ``fraction`` of each gate's channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in wrapped.gates.values():
            n = gate.num_channels
            prob = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
            prob[_rejected_indices(n, fraction, g)] = 0.2
            gate.active_prob.copy_(prob)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("method, reject", [("rbp", reject_some_rbp), ("turbo-vbi", reject_some_turbo_vbi)])
def test_rbp_and_turbo_vbi_export_prunes_to_a_model_equal_to_the_wrapped_one(name, method, reject):
    model, x = build(name)
    wrapped = bayes.wrap(model, (x[:1],), method=method)
    assert wrapped.gates, "no gate inserted"
    reject(wrapped)
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(x).numpy()
    onnx_model = export(wrapped, (x[:1],))
    pruned = prune_model(onnx_model, target="none").model
    got = make_session(pruned).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    dense_w, pruned_w = layer_widths(onnx_model), layer_widths(pruned)
    removed = sum(dense_w[n][1] - pruned_w[n][1] for n in dense_w)
    rejected = sum(total - k for k, total in wrapped.kept().values())
    assert rejected > 0 and removed >= rejected
