"""Units whose only readers multiply them by zero weights go with ``assume_finite``; GQA query heads go alone.

A neuron whose every reader is a Gemm/MatMul/Conv with all-zero weights for it (a zero ``down_proj`` column) is
not zero: it reaches the output as ``0 * x``, which is NaN where x is inf. Without ``assume_finite`` the engine
keeps it (and ``--explain`` says why); with it, the neuron goes, exact wherever the input model's activations
are finite. In grouped-query attention a query head is its own unit: it goes alone (its K/V head stays for the
others, the repeat rewritten to a Gather of the kept heads), and a K/V head goes only with all its query heads.

Every pruned model is checked against its input on ONNX Runtime (prune_checked verifies; same_outputs and
assert_same_outputs run both models on fresh random inputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from onnxprune.api import inspect_model, prune_model, run_passes
from onnxprune.channels.analysis import ZERO_READ_REASON
from onnxprune.cli import main
from tests import attention_models as am
from tests.graphs import GraphBuilder, nodes_of
from tests.prune_helpers import layer_widths, prune_checked, same_outputs
from tests.test_attention_heads import SLACK, assert_same_outputs, float_parameters


def mlp_with_zero_down_columns(op: str = "Gemm", zero=(3, 7), hidden: int = 16) -> onnx.ModelProto:
    """x -> fc1 (8 -> hidden) -> Relu -> fc2 (hidden -> 4), fc2's weights for the ``zero`` neurons all zero."""
    b = GraphBuilder()
    x = b.input("x", ["n", 8])
    h = b.relu(b.gemm(x, 8, hidden, name="fc1"))
    w2 = b.rows((4, hidden), zero, axis=1)  # (N, K): column k is neuron k's weights
    if op == "Gemm":
        y = b.node("Gemm", [h, b.const("fc2.weight", w2)], name="fc2", transB=1)
    else:
        y = b.node("MatMul", [h, b.const("fc2.weight", np.ascontiguousarray(w2.T))], name="fc2")
    b.output(y)
    return b.build()


def conv_with_zero_input_weights(zero=(1, 4)) -> onnx.ModelProto:
    """conv1 (3 -> 6) -> Relu -> conv2 (6 -> 5) whose weights for input channels ``zero`` are all zero."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, 6, name="conv1"))
    y = b.conv(h, 6, 5, weight=b.rows((5, 6, 3, 3), zero, axis=1), name="conv2")
    b.output(y)
    return b.build()


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_a_neuron_read_only_by_zero_weights_is_kept_unless_activations_are_assumed_finite(op):
    model = mlp_with_zero_down_columns(op)
    kept = prune_checked(model)
    assert layer_widths(kept.model) == {"fc1": (8, 16), "fc2": (16, 4)}
    (decision,) = [d for d in kept.report.plan.groups if d.group.name == "fc1"]
    assert (decision.dead, decision.zero_read) == (0, 2)

    pruned = prune_checked(model, assume_finite=True)
    assert layer_widths(pruned.model) == {"fc1": (8, 14), "fc2": (14, 4)}
    assert same_outputs(model, pruned.model, seed=3)


def test_without_assume_finite_nothing_changes_where_no_weight_column_is_zero():
    model = mlp_with_zero_down_columns(zero=())
    for flag in (False, True):
        result = prune_checked(model, assume_finite=flag)
        assert result.report.plan.removed_channels == 0
        assert layer_widths(result.model) == {"fc1": (8, 16), "fc2": (16, 4)}


def test_a_conv_channel_read_only_by_zero_weights_goes_with_assume_finite():
    model = conv_with_zero_input_weights()
    assert layer_widths(prune_checked(model).model) == {"conv1": (3, 6), "conv2": (6, 5)}
    pruned = prune_checked(model, assume_finite=True)
    assert layer_widths(pruned.model) == {"conv1": (3, 4), "conv2": (4, 5)}
    assert same_outputs(model, pruned.model, seed=1)


def test_a_neuron_with_a_live_reader_stays_with_assume_finite():
    """fc1's neuron 3 has a zero column in fc2 but also reaches the graph output: it stays."""
    b = GraphBuilder()
    x = b.input("x", ["n", 8])
    h = b.relu(b.gemm(x, 8, 6, name="fc1"))
    y = b.node("Gemm", [h, b.const("fc2.weight", b.rows((4, 6), [3], axis=1))], name="fc2", transB=1)
    b.output(y, h)
    model = b.build()
    assert prune_checked(model, assume_finite=True).report.plan.removed_channels == 0


def test_the_inspecting_analysis_takes_the_assumption_too():
    model = mlp_with_zero_down_columns()
    assert inspect_model(model)[1].removed_channels == 0
    assert inspect_model(model, assume_finite=True)[1].removed_channels == 2


def test_explain_names_channels_read_only_by_zero_weights(tmp_path, capsys):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_with_zero_down_columns(), src)
    capsys.readouterr()
    assert main(["prune", str(src), "-o", str(tmp_path / "a.onnx"), "--target", "none", "--explain", "-q"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fc1 "))
    assert row.split()[1:4] == ["16", "0", "16"] and f"14 live; 2 {ZERO_READ_REASON}" in row
    assert main(["prune", str(src), "-o", str(tmp_path / "b.onnx"), "--target", "none", "--explain", "-q",
                 "--assume-finite"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("fc1 "))
    assert row.split()[1:4] == ["16", "2", "14"] and ZERO_READ_REASON not in out
    assert layer_widths(onnx.load(str(tmp_path / "b.onnx")))["fc2"] == (14, 4)


def test_zero_weights_stored_narrow_or_quantized_count_as_zero():
    """fc2's weight a Cast of float16 constants; conv2's int8 codes and a scale (DequantizeLinear), codes equal to
    the zero point for the zero input channels: their stored forms are read, and cut, as they are."""
    b = GraphBuilder(opset=19)
    x = b.input("x", ["n", 8])
    h = b.relu(b.gemm(x, 8, 16, name="fc1"))
    w16 = b.rows((16, 4), [2, 9]).astype(np.float16)
    w = b.node("Cast", [b.const("fc2.weight16", w16)], name="widen", to=onnx.TensorProto.FLOAT)
    b.output(b.node("MatMul", [h, w], name="fc2"))
    narrow = b.build()

    b = GraphBuilder(opset=19)
    x = b.input("x", [1, 3, 8, 8])
    h = b.relu(b.conv(x, 3, 6, name="conv1"))
    codes = b.rng.integers(-100, 100, (5, 6, 3, 3)).astype(np.int8)
    codes[:, [1, 4]] = 0
    w = b.node("DequantizeLinear", [b.const("conv2.codes", codes), b.const("conv2.scale", np.float32(0.01))], name="dq")
    b.output(b.node("Conv", [h, w], name="conv2", pads=[1, 1, 1, 1]))
    quantized = b.build()

    for model, stored, shape in ((narrow, onnx.TensorProto.FLOAT16, [14, 4]), (quantized, onnx.TensorProto.INT8,
                                                                               [5, 4, 3, 3])):
        assert prune_checked(model).report.plan.removed_channels == 0
        pruned = prune_checked(model, assume_finite=True)
        assert pruned.report.plan.removed_channels == 2
        (after,) = [t for t in pruned.model.graph.initializer if t.data_type == stored]
        assert list(after.dims) == shape
        assert same_outputs(model, pruned.model, seed=4)


# -- grouped-query attention ------------------------------------------------------------------------------------

LONE = 1  # a query head of K/V head 0 (K/V head 1 and its query heads 2 and 3 are dead in gqa_block)


def gqa_with_a_lone_query_head() -> tuple[am.AttentionCase, int]:
    """tests/attention_models.py's GQA block (K/V head 1 dead with its query heads 2 and 3) and query head ``LONE``
    whose o_proj input columns are zero; the float parameters removing that query head in PyTorch removes."""
    case = am.build("gqa_block")
    attn, hd = case.model.attn, am.HEAD_DIM
    with torch.no_grad():
        attn.o.weight[:, LONE * hd : (LONE + 1) * hd] = 0
    return case, hd * (am.DIM + 1) + am.DIM * hd  # its Q rows and biases, its o_proj columns


@pytest.fixture(scope="module")
def gqa_exports():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from onnxprune.torch_export import export_onnx

    case, lone_params = gqa_with_a_lone_query_head()
    exports = {e: export_onnx(case.model, case.example, exporter=e) for e in ("dynamo", "torchscript")}
    yield case, lone_params, exports
    torch.set_num_threads(threads)


def _removed(model: onnx.ModelProto, pruned: onnx.ModelProto) -> int:
    from passes import preparation

    return float_parameters(run_passes(model, preparation(), verify=False).model) - float_parameters(pruned)


def _widths(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(in, out) of every layer with a constant weight, sorted (the exporters name them differently)."""
    return sorted(layer_widths(model).values())


FFN = [(am.DIM, am.HIDDEN - len(am.DEAD_NEURONS)), (am.HIDDEN - len(am.DEAD_NEURONS), am.DIM)]  # gqa_block's MLP


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_lone_gqa_query_head_goes_with_assume_finite_and_its_kv_head_stays(gqa_exports, exporter):
    case, lone_params, exports = gqa_exports
    model = exports[exporter]
    hd, dim = am.HEAD_DIM, am.DIM

    kept = prune_model(model, target="none")
    assert _widths(kept.model) == sorted([(dim, 2 * hd), (dim, hd), (dim, hd), (2 * hd, dim), *FFN])
    assert abs(_removed(model, kept.model) - case.removed_params) <= SLACK

    pruned = prune_model(model, target="none", assume_finite=True)
    assert pruned.report.verification.ok
    assert_same_outputs(model, pruned.model, case)
    # query head 0 alone is left; K/V head 0 stays for it, K/V head 1 went with query heads 2 and 3
    assert _widths(pruned.model) == sorted([(dim, hd), (dim, hd), (dim, hd), (hd, dim), *FFN])
    removed, expected = _removed(model, pruned.model), case.removed_params + lone_params
    assert abs(removed - expected) <= SLACK, f"{removed} float parameters removed, PyTorch removes {expected}"
    assert len([n for n in nodes_of(pruned.model, "Gather") if "Reshape" in n.name]) == 2  # K's and V's repeat


def test_a_query_head_alone_needs_no_assumption_when_its_output_is_zero():
    """A gate of 0 on query head 1's merged output channels (a pruned head gate) makes that head dead by itself: it
    goes without ``assume_finite``, and K/V head 0 stays for query head 0."""
    hd, dim = am.HEAD_DIM, am.DIM

    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = am.GQAttention()
            gate = torch.ones(am.HEADS * hd)
            gate[LONE * hd : (LONE + 1) * hd] = 0
            self.register_buffer("gate", gate)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, (b, s, _) = self.attn, x.shape
            q = a.q(x).view(b, s, -1, a.head_dim).transpose(1, 2)
            k = a.repeat_kv(a.k(x).view(b, s, -1, a.head_dim).transpose(1, 2), a.heads // a.kv_heads)
            v = a.repeat_kv(a.v(x).view(b, s, -1, a.head_dim).transpose(1, 2), a.heads // a.kv_heads)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return a.o(o.transpose(1, 2).reshape(b, s, -1) * self.gate)

    from onnxprune.torch_export import export_onnx

    torch.manual_seed(0)
    model = export_onnx(Gated().eval(), torch.randn(1, am.SEQ, dim), exporter="dynamo")
    pruned = prune_checked(model)
    assert _widths(pruned.model) == sorted([(dim, 3 * hd), (dim, 2 * hd), (dim, 2 * hd), (3 * hd, dim)])
    assert same_outputs(model, pruned.model, seed=2)


def test_a_query_head_goes_alone_while_its_kv_heads_reach_a_graph_output():
    """The keys before the repeat are also a graph output (a KV cache): every K/V head stays, and query head
    ``LONE`` (o_proj columns zero) still goes with ``assume_finite``, through the Gather of the kept copies."""
    hd, dim = am.HEAD_DIM, am.DIM

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = am.GQAttention()
            with torch.no_grad():
                self.attn.o.weight[:, LONE * hd : (LONE + 1) * hd] = 0

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, (b, s, _) = self.attn, x.shape
            q = a.q(x).view(b, s, -1, a.head_dim).transpose(1, 2)
            k = a.k(x).view(b, s, -1, a.head_dim).transpose(1, 2)
            v = a.repeat_kv(a.v(x).view(b, s, -1, a.head_dim).transpose(1, 2), a.heads // a.kv_heads)
            o = torch.nn.functional.scaled_dot_product_attention(q, a.repeat_kv(k, a.heads // a.kv_heads), v)
            return a.o(o.transpose(1, 2).reshape(b, s, -1)), k

    from onnxprune.torch_export import export_onnx

    torch.manual_seed(0)
    model = export_onnx(WithCache().eval(), torch.randn(1, am.SEQ, dim), exporter="dynamo")
    assert prune_checked(model).report.plan.removed_channels == 0
    pruned = prune_checked(model, assume_finite=True)
    assert _widths(pruned.model) == sorted([(dim, 3 * hd), (dim, 2 * hd), (dim, 2 * hd), (3 * hd, dim)])
    assert same_outputs(model, pruned.model, seed=6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_lone_query_head_of_hugging_face_llama_goes_with_assume_finite(exporter):
    """Hugging Face's LlamaModel (random weights, grouped-query attention, rotary): query head 3 read only by zero
    o_proj columns goes with --assume-finite, its K/V head stays for query head 2; exact on ONNX Runtime."""
    from onnxprune.torch_export import export_onnx
    from tests.vision import import_transformers

    tr = import_transformers()
    torch.manual_seed(0)
    config = tr.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_implementation="eager")
    llama = tr.LlamaModel(config).eval()
    with torch.no_grad():
        llama.layers[0].self_attn.o_proj.weight[:, 24:32] = 0

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.llama = llama

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.llama(input_ids=ids).last_hidden_state

    model = export_onnx(Hidden(), torch.randint(0, 50, (2, 7)), exporter=exporter)
    kept = prune_model(model, target="none")
    pruned = prune_model(model, target="none", assume_finite=True)
    assert pruned.report.verification.ok and same_outputs(model, pruned.model)
    assert float_parameters(kept.model) - float_parameters(pruned.model) == 2 * 8 * 32  # q_proj rows, o_proj columns
