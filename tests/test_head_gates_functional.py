"""Heads of attention whose projection weight is applied functionally get one gate per head, on the weight.

``nn.MultiheadAttention`` passes its packed ``in_proj_weight`` / ``in_proj_bias`` to
``F.multi_head_attention_forward`` and torchvision's Swin passes ``qkv.weight`` / ``qkv.bias`` to
``shifted_window_attention``: no graph node carries the projection's output, so the wrapper gates the value rows of
the weight and bias (onnxprune/bayes/weight_gates.py). Each case here wraps a small model with random weights,
forces some gates to reject, exports with the gates folded, prunes, and runs the pruned model on ONNX Runtime
against the gated PyTorch model. Also: Turbo-VBI on transformers' Conv1D (weight [in, out], a channel a column).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxprune import bayes  # noqa: E402
from onnxprune.api import prune_model  # noqa: E402
from onnxprune.bayes.costs import channel_costs, weight_kl_by_macs  # noqa: E402
from onnxprune.bayes.exporting import export, fold_gates  # noqa: E402
from onnxprune.bayes.finetune import freeze_rejected_weights  # noqa: E402
from onnxprune.bayes.gate import Producer  # noqa: E402
from onnxprune.bayes.turbo_vbi import TurboVBIGate  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402
from tests.attention_models import Block, MHAttention, randomize_vectors  # noqa: E402
from tests.prune_helpers import layer_widths  # noqa: E402
from tests.test_bayes_wrap import reject_some, reject_some_rbp, reject_some_turbo_vbi  # noqa: E402
from tests.vision import import_torchvision, import_transformers  # noqa: E402

REJECT: dict[str, Callable] = {"sbp": reject_some, "rbp": reject_some_rbp, "turbo-vbi": reject_some_turbo_vbi}
DIM, HEADS, HEAD_DIM, SEQ = 32, 4, 8, 8  # tests/attention_models.py's block


def _vit():
    import_torchvision()
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    heads = {f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight": (4, 8) for i in range(2)}
    return model, torch.rand(2, 3, 32, 32), heads


def _swin():
    import_torchvision()
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    return model, torch.rand(2, 3, 32, 32), {"features.1.0.attn.qkv.weight": (2, 8), "features.3.0.attn.qkv.weight": (4, 8)}


def _mha_block(batch_first: bool):
    torch.manual_seed(0)
    model = Block(MHAttention(batch_first=batch_first, need_weights=False))
    return model, torch.randn(2, SEQ, DIM), {"attn.mha.in_proj_weight": (HEADS, HEAD_DIM)}


BUILDERS = {"torchvision_vit": _vit, "torchvision_swin": _swin, "mha_batch_first": lambda: _mha_block(True),
            "mha_seq_first": lambda: _mha_block(False)}


def _build(name: str):
    """(model in eval mode with random biases and norms, a batch of two inputs, {weight path: (heads, head_dim)})."""
    model, x, heads = BUILDERS[name]()
    randomize_vectors(model)
    return model.eval(), x, heads


@pytest.fixture(scope="module")
def sbp_wrapped():
    """name -> (the model wrapped with SBP, its inputs, its heads), wrapped once for the tests that share it."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            model, x, heads = _build(name)
            cache[name] = bayes.wrap(model, (x[:1],), method="sbp"), x, heads
        wrapped, x, heads = cache[name]
        return copy.deepcopy(wrapped), x, heads

    return get


def _head_gates(wrapped, heads: dict[str, tuple[int, int]]) -> dict[str, str]:
    """Weight path -> the name of the gate on its heads (checked: one gate, one entry per head)."""
    found = {}
    for site in wrapped.weight_sites:
        if site.weight in heads:
            (key,) = site.groups
            assert wrapped.gates[key].num_channels == heads[site.weight][0]
            found[site.weight] = key
    assert set(found) == set(heads)
    return found


def _exported_and_pruned(wrapped, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, onnx.ModelProto, onnx.ModelProto]:
    """The wrapped model's output in evaluation mode, the pruned export's output on ONNX Runtime, the export (gates
    folded) and the pruned model."""
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(x).numpy()
    dense = export(wrapped, (x[:1],))
    pruned = prune_model(dense, target="none").model
    return ref, make_session(pruned).run(None, {"input": x.numpy()})[0], dense, pruned


def _pruned_matches(wrapped, x: torch.Tensor, heads: dict[str, tuple[int, int]], gates: dict[str, str]) -> None:
    """Export (gates folded), prune, and check on ONNX Runtime: same outputs, each packed q/k/v projection down to
    its kept heads."""
    ref, got, dense, pruned = _exported_and_pruned(wrapped, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    before, after = layer_widths(dense), layer_widths(pruned)
    expected: dict[int, list[int]] = {}  # packed width -> the widths its projections are pruned to
    for path, (count, head_dim) in heads.items():
        kept = int((wrapped.gates[gates[path]].deterministic() != 0).sum())
        assert 0 < kept < count
        expected.setdefault(3 * count * head_dim, []).append(3 * kept * head_dim)
    for packed, widths in expected.items():
        assert sorted(after[n][1] for n, (_, out) in before.items() if out == packed) == sorted(widths)


@pytest.mark.slow  # 10 to 25 s each on a busy 2-core machine (the dynamo exports); the costs test below wraps both fast
@pytest.mark.parametrize("method", ["sbp", "rbp", "turbo-vbi"])
@pytest.mark.parametrize("name", ["torchvision_vit", "torchvision_swin"])
def test_torchvision_attention_gets_a_gate_per_head_and_rejected_heads_are_pruned(name, method, sbp_wrapped,
                                                                                   one_thread) -> None:
    if method == "sbp":
        wrapped, x, heads = sbp_wrapped(name)
    else:
        model, x, heads = _build(name)
        wrapped = bayes.wrap(model, (x[:1],), method=method)
    gates = _head_gates(wrapped, heads)
    REJECT[method](wrapped, fraction=0.5)
    _pruned_matches(wrapped, x, heads, gates)


MHA_CASES = [(method, batch_first, "fx") for method in REJECT for batch_first in (True, False)] + [("sbp", True, "export")]


@pytest.mark.parametrize("method, batch_first, capture", MHA_CASES,
                         ids=[f"{m}-{'batch_first' if b else 'seq_first'}-{c}" for m, b, c in MHA_CASES])
def test_multihead_attention_in_a_users_model_gets_a_gate_per_head(method, batch_first, capture, one_thread) -> None:
    """Under torch.fx the attention is one leaf call (gated through a GatedCall); under torch.export its weights
    are read by get_attr nodes (gated by a WeightGate after them)."""
    model, x, heads = _build("mha_batch_first" if batch_first else "mha_seq_first")
    wrapped = bayes.wrap(model, (x[:1],), method=method, capture=capture)
    assert wrapped.captured_by == capture
    gates = _head_gates(wrapped, heads)
    assert {k: g.num_channels for k, g in wrapped.gates.items()} == {gates["attn.mha.in_proj_weight"]: HEADS, "fc1": 64}
    REJECT[method](wrapped, fraction=0.5)
    _pruned_matches(wrapped, x, heads, gates)


def test_a_head_gate_is_drawn_once_per_minibatch_and_trains(one_thread) -> None:
    model, x, heads = _build("mha_batch_first")
    wrapped = bayes.wrap(model, (x[:1],), method="sbp")
    key = _head_gates(wrapped, heads)["attn.mha.in_proj_weight"]
    wrapped.train()
    loss = wrapped(x.repeat(2, 1, 1)).pow(2).mean()
    assert wrapped.bank.theta(key, 4).shape == (1, HEADS)  # one sample shared by the minibatch
    assert wrapped.bank.theta("fc1", 4).shape == (4, 64)  # module sites: one per example
    loss.backward()
    gate = wrapped.gates[key]
    assert gate.mu.grad is not None and gate.mu.grad.abs().sum() > 0
    assert wrapped.model.get_parameter("attn.mha.in_proj_weight").grad.abs().sum() > 0  # the weight trains too


def test_a_rejected_head_is_exactly_zero_in_the_folded_weights_and_held_there_in_finetuning(one_thread) -> None:
    model, x, heads = _build("mha_seq_first")
    wrapped = bayes.wrap(model, (x[:1],), method="sbp")
    gate = wrapped.gates[_head_gates(wrapped, heads)["attn.mha.in_proj_weight"]]
    with torch.no_grad():  # reject head 1 (mean 0, wide)
        gate.mu[1], gate.log_sigma[1] = 0.0, 3.0
    wrapped.eval()
    folded = fold_gates(wrapped)
    weight, bias = folded.get_parameter("attn.mha.in_proj_weight"), folded.get_parameter("attn.mha.in_proj_bias")
    v1 = slice(2 * DIM + HEAD_DIM, 2 * DIM + 2 * HEAD_DIM)
    assert not weight[v1].any() and not bias[v1].any()
    assert weight[: 2 * DIM].abs().sum() > 0 and weight[2 * DIM + 2 * HEAD_DIM:].abs().min() > 0  # q, k, other v kept
    torch.testing.assert_close(folded(x), wrapped(x))
    assert freeze_rejected_weights(folded, wrapped.weight_sites) == HEAD_DIM * (DIM + 1)
    folded(x).sum().backward()
    assert not weight.grad[v1].any() and not bias.grad[v1].any()


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_kl_weighting_charges_a_functional_head_its_macs(capture, one_thread) -> None:
    model, x, heads = _build("mha_batch_first")
    wrapped = bayes.wrap(model, (x[:1],), method="sbp", capture=capture)
    assert wrapped.captured_by == capture
    key = _head_gates(wrapped, heads)["attn.mha.in_proj_weight"]
    per_head = SEQ * DIM * 3 * HEAD_DIM + 2 * SEQ * SEQ * HEAD_DIM + SEQ * HEAD_DIM * DIM  # q/k/v rows, products, out
    costs = channel_costs(wrapped, (x[:1],))
    assert costs[key] == pytest.approx(per_head)
    assert costs["fc1"] == pytest.approx(2 * SEQ * DIM)  # its row and fc2's column
    weights = weight_kl_by_macs(wrapped, (x[:1],))
    assert weights[key] / weights["fc1"] == pytest.approx(per_head / (2 * SEQ * DIM))


@pytest.mark.parametrize("name, path, dim, tokens", [
    ("torchvision_vit", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight", 32, [17]),  # 16 patches, class
    ("torchvision_swin", "features.1.0.attn.qkv.weight", 16, [16] * 4),  # stage 1: 8x8 tokens in four 4x4 windows
])
def test_torchvision_heads_are_charged_their_projections_and_products(name, path, dim, tokens, sbp_wrapped,
                                                                       one_thread) -> None:
    wrapped, x, heads = sbp_wrapped(name)
    head_dim, n = heads[path][1], sum(tokens)
    expected = n * dim * 3 * head_dim + sum(2 * t * t * head_dim for t in tokens) + n * head_dim * dim
    assert channel_costs(wrapped, (x[:1],))[_head_gates(wrapped, heads)[path]] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# Turbo-VBI on transformers' Conv1D
# ---------------------------------------------------------------------------------------------


def test_turbo_vbi_reads_a_column_major_producer_as_its_transpose() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5))  # [in, out]: 5 channels, columns
    with torch.no_grad():
        weight[:, 2] *= 1e-4
    rows, positions = torch.arange(5), torch.arange(5)
    columns = TurboVBIGate(5).attach([Producer(weight, rows, positions, channel_axis=1)])
    reference = TurboVBIGate(5).attach([(torch.nn.Parameter(weight.detach().t().clone()), rows, positions)])
    torch.testing.assert_close(columns.active_probability(), reference.active_probability())
    assert columns.deterministic().tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(columns.kl(), reference.kl())
    columns.kl().backward()
    assert weight.grad[:, 2].abs().sum() > 0 and weight.grad.shape == (6, 5)
    with pytest.raises(ValueError, match="rows out of range"):
        TurboVBIGate(6).attach([Producer(weight, torch.arange(6), torch.arange(6), channel_axis=1)])


def _gpt2(dead_head: int, dead_neurons: int, layers: int = 1):
    """A GPT-2 of ``layers`` blocks (4 heads of 8) whose head ``dead_head`` value columns and first ``dead_neurons`` MLP
    columns are near zero in every block (scaled by 1e-4: Turbo-VBI's evidence, not exact zeros)."""
    from benchmarks.user_architectures import Logits

    tr = import_transformers()
    config = tr.GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=16, bos_token_id=0,
                           eos_token_id=0, activation_function="gelu")
    torch.manual_seed(0)
    model = Logits(tr.GPT2LMHeadModel(config)).eval()
    values = slice(2 * 32 + dead_head * 8, 2 * 32 + (dead_head + 1) * 8)
    with torch.no_grad():
        for block in model.model.transformer.h:
            block.attn.c_attn.weight[:, values] *= 1e-4
            block.attn.c_attn.bias[values] *= 1e-4
            block.mlp.c_fc.weight[:, :dead_neurons] *= 1e-4
    return model


def test_turbo_vbi_on_gpt2_rejects_heads_and_neurons_of_its_conv1d_layers(one_thread) -> None:
    model, x = _gpt2(dead_head=1, dead_neurons=10), torch.randint(0, 100, (2, 8))
    wrapped = bayes.wrap(model, (x[:1],), method="turbo-vbi")
    kept = {name: gate.kept() for name, gate in wrapped.gates.items()}
    assert kept == {f"model_transformer_h_{i}_{layer}": k for i in range(1)
                    for layer, k in (("attn_c_attn", (3, 4)), ("mlp_c_fc", (118, 128)))}
    assert all(gate.deterministic()[1] == 0 for name, gate in wrapped.gates.items() if name.endswith("c_attn"))
    wrapped.train()
    (wrapped(x).float().pow(2).mean() + wrapped.kl()).backward()
    c_attn = wrapped.model.get_submodule("model.transformer.h.0.attn.c_attn")
    assert c_attn.weight.grad[:, 2 * 32:].abs().sum() > 0  # the prior reaches the value columns
    ref, got, dense, pruned = _exported_and_pruned(wrapped, x)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    before, after = layer_widths(dense), layer_widths(pruned)
    changed = sorted(after[n] for n, width in before.items() if after[n] != width)
    # per block: c_attn and c_proj lose a head (3 x 8 columns, 8 rows), c_fc and the MLP's c_proj 10 neurons
    assert changed == sorted([(32, 72), (24, 32), (32, 118), (118, 32)])


def test_turbo_vbi_rejects_a_functional_head_from_its_weights(one_thread) -> None:
    model, x, heads = _build("mha_batch_first")
    with torch.no_grad():  # head 2's value rows and bias near zero
        v2 = slice(2 * DIM + 2 * HEAD_DIM, 2 * DIM + 3 * HEAD_DIM)
        model.attn.mha.in_proj_weight[v2] *= 1e-4
        model.attn.mha.in_proj_bias[v2] *= 1e-4
    wrapped = bayes.wrap(model, (x[:1],), method="turbo-vbi")
    gate = wrapped.gates[_head_gates(wrapped, heads)["attn.mha.in_proj_weight"]]
    assert gate.deterministic().tolist() == [1.0, 1.0, 0.0, 1.0]
    assert gate._weights[0] is wrapped.model.get_parameter("attn.mha.in_proj_weight")  # the prior's producer
    _pruned_matches(wrapped, x, heads, _head_gates(wrapped, heads))
