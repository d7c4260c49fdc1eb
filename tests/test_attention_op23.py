"""Heads are deleted through the standard ONNX Attention op (opset 23).

The dynamo exporter at opset 23 writes ``F.scaled_dot_product_attention`` as one ai.onnx ``Attention`` node
(4-D Q, K, V). Each case is a tiny block with random weights in which a head is dead (its V rows and bias zero)
beside live ones, pruned with ``target="none"``, and checked on ONNX Runtime (real sessions: ORT runs
Attention-23): the outputs match the exported model's, and the float parameters fall by exactly what removing
that head (Q, K, V rows and biases, o_proj columns) and the dead FFN neuron removes in PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxprune.api import inspect_model
from onnxprune.cli import main
from tests.prune_helpers import prune_checked, same_outputs

DIM, HEADS, SEQ = 16, 4, 5
HD = DIM // HEADS


class Block(nn.Module):
    """SDPA self-attention (optionally grouped-query, optionally masked) and a ReLU FFN, with residuals."""

    def __init__(self, kv_heads: int = HEADS, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.q, self.o = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.k, self.v = nn.Linear(DIM, kv_heads * HD), nn.Linear(DIM, kv_heads * HD)
        self.fc1, self.fc2 = nn.Linear(DIM, 8), nn.Linear(8, DIM)
        self.mask = mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, HD).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, HD).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, HD).transpose(1, 2)
        mask = self.mask if mask is None else mask
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != HEADS)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, DIM))
        return x + self.fc2(torch.relu(self.fc1(x)))


@torch.no_grad()
def _kill(block: Block, kv_head: int | None, neuron: int | None = 2) -> int:
    """Zero K/V head ``kv_head``'s V rows and bias and FFN ``neuron``'s fc1 row; the parameters PyTorch removes."""
    removed = 0
    if kv_head is not None:
        rows = slice(kv_head * HD, (kv_head + 1) * HD)
        block.v.weight[rows] = 0
        block.v.bias[rows] = 0
        group = HEADS // block.kv_heads
        removed += 2 * HD * (DIM + 1) + group * HD * (DIM + 1 + DIM)  # K, V rows; Q rows and o_proj columns
    if neuron is not None:
        block.fc1.weight[neuron] = 0
        block.fc1.bias[neuron] = 0
        removed += DIM + 1 + DIM
    return removed


def _export(block: Block, *args: torch.Tensor) -> onnx.ModelProto:
    torch.manual_seed(1)
    model = torch.onnx.export(block.eval(), (torch.randn(2, SEQ, DIM), *args), dynamo=True, opset_version=23,
                              verbose=False).model_proto
    assert [n.op_type for n in model.graph.node].count("Attention") == 1, "the export no longer writes Attention"
    return model


def _float_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)


def _check(model: onnx.ModelProto, removed: int) -> onnx.ModelProto:
    out = prune_checked(model).model
    assert same_outputs(model, out)
    assert _float_params(model) - _float_params(out) == removed
    return out


def _attention(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "Attention")


def test_dead_head_goes_through_attention_op_as_in_pytorch():
    torch.manual_seed(0)
    block = Block()
    removed = _kill(block, kv_head=1)
    _check(_export(block), removed)


def test_no_dead_head_keeps_every_attention_parameter():
    torch.manual_seed(0)
    block = Block()
    removed = _kill(block, kv_head=None)
    _check(_export(block), removed)


def test_mask_broadcast_over_heads_lets_dead_head_go():
    torch.manual_seed(0)
    block = Block()
    removed = _kill(block, kv_head=2)
    _check(_export(block, torch.randn(2, 1, SEQ, SEQ)), removed)


def test_constant_per_head_mask_is_sliced_with_its_head():
    torch.manual_seed(0)
    block = Block(mask=torch.randn(1, HEADS, SEQ, SEQ))
    removed = _kill(block, kv_head=0)
    _check(_export(block), removed + SEQ * SEQ)  # the mask loses the dead head's slice too


def test_grouped_query_kv_head_goes_with_all_its_query_heads():
    torch.manual_seed(0)
    block = Block(kv_heads=2)
    removed = _kill(block, kv_head=1)
    _check(_export(block), removed)


def test_mask_varying_per_head_at_run_time_is_a_barrier_with_reason(tmp_path, capsys):
    torch.manual_seed(0)
    block = Block()
    _kill(block, kv_head=1, neuron=None)
    model = _export(block, torch.randn(2, HEADS, SEQ, SEQ))
    assert _float_params(prune_checked(model).model) == _float_params(model)
    node = _attention(model).name
    assert "varies along the heads" in inspect_model(model)[0].barriers[node]
    onnx.save(model, tmp_path / "m.onnx")
    capsys.readouterr()
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--target", "none", "--explain"]) == 0
    line = next((ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(f"{node}:")), "")
    assert "varies along the heads" in line


def _three_d_model(dead_head: int, kv_heads: int = HEADS) -> onnx.ModelProto:
    """Hand-written 3-D Attention (Q, K, V [B, S, H*D] with q_num_heads/kv_num_heads) between projections;
    ``dead_head`` is a K/V head."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for name in ("q", "k", "v", "o"):
        width = kv_heads * HD if name in ("k", "v") else DIM
        w, b = rng.standard_normal((DIM, width)).astype(np.float32), rng.standard_normal(width).astype(np.float32)
        if name == "v":
            w[:, dead_head * HD:(dead_head + 1) * HD] = 0
            b[dead_head * HD:(dead_head + 1) * HD] = 0
        inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_m"], name=f"{name}_mm"),
                  helper.make_node("Add", [f"{name}_m", f"{name}_b"], [name], name=f"{name}_add")]
    nodes += [helper.make_node("Attention", ["q", "k", "v"], ["a"], name="attn", q_num_heads=HEADS,
                               kv_num_heads=kv_heads),
              helper.make_node("MatMul", ["a", "o_w"], ["o_m"], name="o_mm"),
              helper.make_node("Add", ["o_m", "o_b"], ["y"], name="o_add")]
    graph = helper.make_graph(nodes, "attn3d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, SEQ, DIM])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, SEQ, DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_three_d_attention_loses_dead_head_and_updates_head_counts():
    model = _three_d_model(dead_head=3)
    pruned = _check(model, 4 * HD * (DIM + 1) - HD)  # Q, K, V rows and biases, o_proj rows (no o bias lost)
    attn = _attention(pruned)
    counts = {a.name: a.i for a in attn.attribute}
    assert counts["q_num_heads"] == counts["kv_num_heads"] == HEADS - 1


def test_three_d_grouped_query_kv_head_goes_with_its_query_heads():
    model = _three_d_model(dead_head=0, kv_heads=2)
    removed = 2 * HD * (DIM + 1) + 2 * (HD * (DIM + 1) + HD * DIM)  # K, V of one K/V head; Q, o_proj of two heads
    counts = {a.name: a.i for a in _attention(_check(model, removed)).attribute}
    assert (counts["q_num_heads"], counts["kv_num_heads"]) == (HEADS - 2, 1)


def test_past_key_value_is_a_barrier_with_reason():
    model = _three_d_model(dead_head=3)
    attn = _attention(model)
    attn.input.extend(["", "past_key", "past_value"])
    attn.output.extend(["present_key", "present_value"])
    for name in ("past_key", "past_value"):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, HEADS, 3, HD]))
    assert _float_params(prune_checked(model).model) == _float_params(model)
    assert "past key/value" in inspect_model(model)[0].barriers["attn"]


@pytest.mark.parametrize("output", ["present_key", "qk"])
def test_read_extra_output_is_a_barrier_with_reason(output):
    model = _three_d_model(dead_head=3)
    attn = _attention(model)
    attn.output.extend(["present_key", "present_value", "qk"][: 1 + ["present_key", "qk"].index(output) * 2])
    shape = [2, HEADS, SEQ, HD if output == "present_key" else SEQ]
    model.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, shape))
    assert _float_params(prune_checked(model).model) == _float_params(model)
    assert "output is read" in inspect_model(model)[0].barriers["attn"]


def test_a_dead_head_of_hugging_face_bert_goes_through_its_opset_23_attention():
    """Hugging Face's BertModel (random weights, sdpa attention) exported by dynamo at opset 23 reaches ONNX as one
    Attention node; a head with zero value rows and bias loses its Q, K, V columns and o_proj rows, exactly."""
    from tests.vision import import_transformers

    tr = import_transformers()
    torch.manual_seed(0)
    config = tr.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, attn_implementation="sdpa")
    bert = tr.BertModel(config).eval()
    value = bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        value.weight[8:16] = 0
        value.bias[8:16] = 0

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids).last_hidden_state

    model = torch.onnx.export(Hidden(), (torch.randint(0, 50, (2, 7)),), dynamo=True, opset_version=23).model_proto
    assert any(n.op_type == "Attention" for n in model.graph.node)
    out = prune_checked(model).model
    assert same_outputs(model, out)
    widths = sorted(tuple(t.dims) for t in out.graph.initializer if len(t.dims) == 2 and 32 in t.dims and 24 in t.dims)
    assert widths == [(24, 32), (32, 24), (32, 24), (32, 24)]  # q, k, v lose a head's 8 columns, o_proj 8 rows
