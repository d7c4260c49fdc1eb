"""The engine prints nothing: what its graph library would print goes to logging, silent by default.

A pruned transformer block (the shape of a BERT export: computed Reshape targets,
Softmax attention, LayerNorm, an Erf GELU feed-forward with dead neurons) leaves the
terminal untouched.

onnx-graphsurgeon prints its warnings on stdout (e.g. "Datatype: BFLOAT16 could not be
converted to a NumPy type" whenever the values of a bfloat16 constant are read, as
shape inference once did for every constant). Inside a pass they go to the
``onnxprune.graphsurgeon`` logger instead. The model is imported before the
capture starts: importing is the loader's business, not the passes'.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.logger import G_LOGGER

from onnxprune.api import prune_model
from onnxprune.cost import model_cost
from onnxprune.graphio import to_graph
from onnxprune.pass_infra import GraphPass, PassManager, PassResult
from passes import PROVIDERS, preparation
from passes.prune_channels import PruneChannelsPass
from tests.prune_helpers import layer_widths

GRAPHSURGEON_LOGGER = "onnxprune.graphsurgeon"
HIDDEN, INNER, SEQUENCE = 16, 24, 8


def _transformer_block_export() -> onnx.ModelProto:
    """One post-norm encoder block over token ids, a third of its feed-forward neurons dead (TorchScript export)."""
    import torch
    from torch import nn

    from onnxprune.torch_export import export_onnx

    class Block(nn.Module):
        def __init__(self, vocab: int = 50, heads: int = 2) -> None:
            super().__init__()
            self.heads = heads
            self.embed = nn.Embedding(vocab, HIDDEN)
            self.position = nn.Parameter(torch.randn(1, SEQUENCE, HIDDEN) * 0.1)
            self.qkv, self.out = nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)
            self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.up, self.down = nn.Linear(HIDDEN, INNER), nn.Linear(INNER, HIDDEN)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids) + self.position[:, : ids.shape[1]]
            b, s, h = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
            attention = torch.softmax(q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5, dim=-1)
            x = self.norm1(x + self.out((attention @ v).transpose(1, 2).reshape(b, s, h)))
            return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))

    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():
        block.up.weight[::3] = 0.0
        block.up.bias[::3] = 0.0
    return export_onnx(block, torch.randint(0, 50, (1, SEQUENCE)), exporter="torchscript")  # names layers by module


def _model_with_a_bfloat16_constant() -> onnx.ModelProto:
    """x -> Gemm (one dead output) -> CastLike(bfloat16 constant) -> Cast to float -> y."""
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    weight[1] = 0.0
    like = helper.make_tensor("like", TensorProto.BFLOAT16, [1], [0.0])
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
        helper.make_node("CastLike", ["h", "like"], ["h_bf16"], name="to_bf16"),
        helper.make_node("Cast", ["h_bf16"], ["y"], name="to_float", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(weight, "w"), like],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


class _GraphsurgeonWarningPass(GraphPass):
    """A pass whose graph library warns, as onnx-graphsurgeon does about types numpy lacks."""

    name = "graphsurgeon-warning"
    summary = "emit one onnx-graphsurgeon warning"

    def call(self, graph) -> PassResult:
        G_LOGGER.warning("a note from onnx-graphsurgeon")
        return PassResult(modified=False)


def test_pruning_a_transformer_block_prints_nothing_and_drops_its_dead_neurons(capfd):
    model = _transformer_block_export()
    capfd.readouterr()
    pruned = prune_model(model, target="none").model
    assert capfd.readouterr() == ("", "")
    assert layer_widths(pruned)["/up/MatMul"] == (HIDDEN, INNER - INNER // 3)


def test_preparing_and_pruning_a_model_with_a_bfloat16_constant_prints_nothing(capfd):
    graph = to_graph(_model_with_a_bfloat16_constant())
    capfd.readouterr()
    PassManager([*preparation(), PruneChannelsPass()], PROVIDERS).run(graph)
    cost = model_cost(graph)
    assert capfd.readouterr() == ("", "")
    assert cost.params == 12 + 1  # the Gemm's weight and the bfloat16 constant


def test_graphsurgeon_warnings_inside_a_pass_reach_logging_not_the_terminal(capfd, caplog):
    graph = to_graph(_model_with_a_bfloat16_constant())
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger=GRAPHSURGEON_LOGGER):
        PassManager([_GraphsurgeonWarningPass()]).run(graph)
    assert capfd.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records if r.name == GRAPHSURGEON_LOGGER] == ["a note from onnx-graphsurgeon"]


def test_graphsurgeon_warnings_are_silent_when_no_logging_is_configured(capfd):
    graph = to_graph(_model_with_a_bfloat16_constant())
    capfd.readouterr()
    _GraphsurgeonWarningPass()(graph)
    assert capfd.readouterr() == ("", "")


def test_graphsurgeon_prints_as_before_outside_the_passes(capfd):
    graph = to_graph(_model_with_a_bfloat16_constant())
    _GraphsurgeonWarningPass()(graph)
    capfd.readouterr()
    G_LOGGER.warning("a note outside onnxprune")
    assert "a note outside onnxprune" in capfd.readouterr().out
