"""Attention heads gated at their value projection, and transformers' Conv1D as a gated layer.

The channel engine makes each head's channels of q, k, v (and of the attention output) one component and
flags q and k in ``contracted_outputs``; these tests check what the gates make of that on
models/transformer.py's block.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune import bayes  # noqa: E402
from onnxprune.bayes.costs import channel_costs, layer_macs, weight_kl_by_macs  # noqa: E402
from onnxprune.bayes.exporting import ChannelScale, export, fold_gates  # noqa: E402
from onnxprune.bayes.grouping import _module_parts  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402

DIM, HEADS, TOKENS, HIDDEN = 16, 2, 5, 32
HEAD_DIM = DIM // HEADS
# the block's ONNX layers (TorchScript export names)
PROJECTIONS = ("/attn/q/MatMul", "/attn/k/MatMul", "/attn/v/MatMul")
OUT_PROJECTION = "/attn/out/MatMul"


def _block(sdpa: bool = False):
    from models.transformer import MultiHeadSelfAttention, transformer_block

    class FusedAttention(MultiHeadSelfAttention):
        """The same attention through ``F.scaled_dot_product_attention``."""

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
            return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))

    torch.manual_seed(0)
    model = transformer_block(dim=DIM, num_heads=HEADS, mlp_ratio=HIDDEN // DIM, num_classes=3).eval()
    if sdpa:
        fused = FusedAttention(DIM, HEADS)
        fused.load_state_dict(model.attn.state_dict())
        model.attn = fused
    return model.eval()


@pytest.fixture(scope="module")
def block():
    return _block(), torch.randn(1, TOKENS, DIM)


def test_a_packed_projection_gates_its_values_and_leaves_queries_and_keys_to_them():
    # q0 q1 k0 k1 v0 v1 of two one-channel heads: one component per head, q and k reaching the contraction
    analysis = SimpleNamespace(components_of=lambda out: np.array([0, 1, 0, 1, 0, 1]),
                               group_of_component=np.array([7, 7]),
                               contracted_outputs={"qkv": np.array([1, 1, 1, 1, 0, 0], dtype=bool)})
    parts, contracted = _module_parts(analysis, "qkv", {7: {0: 0, 1: 1}})
    assert [(g, ch.tolist(), pos.tolist()) for g, ch, pos in parts] == [(7, [4, 5], [0, 1])]
    assert [(g, ch.tolist(), pos.tolist()) for g, ch, pos in contracted] == [(7, [0, 1, 2, 3], [0, 1, 0, 1])]


def test_heads_are_gated_at_the_value_projection_only(block, one_thread) -> None:
    model, x = block
    wrapped = bayes.wrap(model, x, method="sbp")
    assert {s.layer for s in wrapped.sites} == {"attn.v", "mlp.fc1"}  # no site on attn.q, attn.k
    assert {k: g.num_channels for k, g in wrapped.gates.items()} == {"attn_v": HEADS, "mlp_fc1": HIDDEN}
    assert wrapped.group_layers["attn_v"] == ["attn.q", "attn.k", "attn.v"]
    assert {k: [key for key, _, _ in parts] for k, parts in wrapped.contracted.items()} == {"attn.q": ["attn_v"],
                                                                                          "attn.k": ["attn_v"]}
    site = next(s for s in wrapped.sites if s.layer == "attn.v")
    assert wrapped.model.get_submodule(site.name).positions_0.tolist() == [h for h in range(HEADS) for _ in range(HEAD_DIM)]
    wrapped.train()
    loss = wrapped(x.repeat(4, 1, 1)).mean() + wrapped.kl()
    loss.backward()
    assert wrapped.gates["attn_v"].mu.grad.abs().sum() > 0


def test_a_rejected_head_folds_into_the_value_rows_and_exports(block, one_thread) -> None:
    from onnxprune.api import prune

    model, x = block
    wrapped = bayes.wrap(model, x, method="sbp")
    with torch.no_grad():
        for gate in wrapped.gates.values():
            k = max(1, int(0.4 * gate.num_channels))
            gate.mu[:k] = 0.0
            gate.log_sigma[:k] = 3.0
    wrapped.eval()
    expected = wrapped(x).detach().numpy()
    folded = fold_gates(wrapped)
    v = folded.get_submodule("attn.v")
    assert not v.weight[:HEAD_DIM].any() and not v.bias[:HEAD_DIM].any() and v.weight[HEAD_DIM:].abs().sum() > 0
    for name in ("attn.q", "attn.k"):  # queries and keys are left as they are
        assert torch.equal(folded.get_submodule(name).weight, wrapped.model.get_submodule(name).weight)
    assert sum(isinstance(m, ChannelScale) for m in folded.modules()) == 1  # mlp.fc1's (after GELU), not attn.v's
    dense = export(wrapped, (x,), exporter="torchscript")
    pruned = prune(dense, target="none")
    session = make_session(pruned)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert sum(int(np.prod(t.dims)) for t in pruned.graph.initializer) < sum(int(np.prod(t.dims)) for t in dense.graph.initializer)


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_a_head_is_charged_its_projections_and_attention_products(sdpa: bool, one_thread) -> None:
    x = torch.randn(1, TOKENS, DIM)
    wrapped = bayes.wrap(_block(sdpa), x, method="sbp")
    assert {s.layer for s in wrapped.sites} == {"attn.v", "mlp.fc1"}
    per_row = TOKENS * DIM  # MACs per example of one output channel of a DIM -> DIM projection
    q_k_v_rows = 3 * HEAD_DIM * per_row
    out_columns = HEAD_DIM * TOKENS * DIM
    attention = 2 * TOKENS * TOKENS * HEAD_DIM  # Q K^T and P V, per head
    costs = channel_costs(wrapped, x)
    assert costs["attn_v"] == pytest.approx(q_k_v_rows + out_columns + attention)  # 1920 + 640 + 400
    assert costs["mlp_fc1"] == pytest.approx(TOKENS * DIM + TOKENS * DIM)  # its row and fc2's column
    weights = weight_kl_by_macs(wrapped, x)
    assert weights["attn_v"] / weights["mlp_fc1"] == pytest.approx(2960 / 160)


def _gpt2(tr):
    from benchmarks.user_architectures import Logits

    # activation "gelu": GPT-2's default gelu_new is written with a Pow, for which the engine has no channel rule
    # (it pins the MLP's neurons)
    config = tr.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                           eos_token_id=0, activation_function="gelu")
    torch.manual_seed(0)
    return Logits(tr.GPT2LMHeadModel(config)).eval()


def test_transformers_conv1d_is_gated_folded_and_costed(one_thread) -> None:
    from tests.vision import import_transformers

    conv1d = import_transformers().pytorch_utils.Conv1D

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = conv1d(12, 6)  # nf=12 outputs, nx=6 inputs: weight [6, 12]
            self.head = torch.nn.Linear(12, 3)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    x = torch.randn(1, 4, 6)
    wrapped = bayes.wrap(Net().eval(), x, method="sbp")
    assert wrapped.captured_by == "fx" and [(s.layer, s.foldable) for s in wrapped.sites] == [("fc", True)]
    assert wrapped.gates["fc"].num_channels == 12
    assert layer_macs(wrapped.model, (x,))["fc"] == 4 * 6 * 12
    with torch.no_grad():  # reject the first five channels (mean 0, wide: low signal-to-noise)
        wrapped.gates["fc"].mu[:5] = 0.0
        wrapped.gates["fc"].log_sigma[:5] = 3.0
    wrapped.eval()
    folded = fold_gates(wrapped)
    assert not folded.fc.weight[:, :5].any() and folded.fc.weight[:, 5:].abs().sum() > 0  # columns
    torch.testing.assert_close(folded(x), wrapped(x))


def test_gpt2_mlp_neurons_are_gated_and_pruned(one_thread) -> None:
    from benchmarks.user_architectures import parameters, reject_share
    from onnxprune.api import prune
    from tests.vision import import_transformers

    model = _gpt2(import_transformers())
    x = torch.randint(0, 100, (1, 8))
    wrapped = bayes.wrap(model, (x,), method="sbp")
    sites = {s.layer: s for s in wrapped.sites}
    for layer in ("model.transformer.h.0.mlp.c_fc", "model.transformer.h.1.mlp.c_fc"):
        assert wrapped.gates[sites[layer].groups[0]].num_channels == 128
    wrapped.train()
    wrapped(x.repeat(4, 1)).float().mean().backward()  # gradients reach the gates through Conv1D's sites
    assert all(g.mu.grad is not None for g in wrapped.gates.values())
    reject_share(wrapped)
    wrapped.eval()
    expected = wrapped(x).detach().numpy()
    dense = export(wrapped, (x,))
    pruned = prune(dense, target="none")
    session = make_session(pruned)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert parameters(pruned) < parameters(dense)


@pytest.mark.parametrize("method", ["sbp", "rbp", "turbo-vbi"])
def test_every_method_rejects_whole_heads_and_the_pruned_vit_matches(method, one_thread) -> None:
    import models
    from onnxprune.api import prune_model
    from tests.test_bayes_wrap import reject_some, reject_some_rbp, reject_some_turbo_vbi

    torch.manual_seed(0)
    model, x = models.build("vit_cifar", dim=32, depth=2, heads=4, mlp=64).eval(), torch.rand(2, 3, 32, 32)
    wrapped = bayes.wrap(model, (x[:1],), method=method)
    heads = {name: g for name, g in wrapped.gates.items() if name.endswith("attn_v")}
    assert sorted(g.num_channels for g in heads.values()) == [4, 4]  # one entry per head
    {"sbp": reject_some, "rbp": reject_some_rbp, "turbo-vbi": reject_some_turbo_vbi}[method](wrapped, fraction=0.5)
    wrapped.eval()
    with torch.no_grad():
        ref = wrapped(x).numpy()
    result = prune_model(export(wrapped, (x[:1],)), target="none")
    got = make_session(result.model).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    head_groups = [d for d in result.report.plan.groups if d.channels == 4]  # one component per head
    assert len(head_groups) == 2 and all(d.removed == d.dead == 2 for d in head_groups)
