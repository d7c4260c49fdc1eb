"""Rotary position embeddings are no barrier for attention heads (onnxprune/channels/within_head.py).

``rotate_half`` (the two halves of the head width sliced or split, ``Neg``, ``Concat`` along the width) and the
cos/sin tables broadcast over the heads act alike on every head, so a dead head goes through them; the positions
inside a head keep every value (the slice bounds and the tables name them).

* Hand-made graphs (a projection, heads, rotary, heads merged, a projection; no attention product): a dead head
  goes, a dead pair of positions in every head stays (with its reason), and what the engine cannot follow (a table
  that varies per head, a Concat with data that carries no heads) stays a barrier with its reason.
* Real exports (tests/rotary_models.py), each with a dead head beside live ones and dead FFN neurons, exported by
  each torch exporter and pruned with ``target="none"``: the pruned model computes what the export does on ONNX
  Runtime, and exactly as many float parameters go as removing those heads and neurons in PyTorch removes:
  hand-written rotary attention (multi-head, grouped-query, ``torch.chunk``), Hugging Face's LlamaModel (eager
  and sdpa attention, multi-head and grouped-query, where a K/V head goes with all its query heads).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from tests import rotary_models as rm
from tests.conftest import single_torch_thread
from tests.graphs import GraphBuilder, group_of_tensor, prune_ok
from tests.prune_helpers import layer_widths
from tests.test_attention_heads import Exported, assert_same_outputs, prune_exported
from tests.vision import import_transformers

# -- hand-made graphs --------------------------------------------------------------------------------------

S, H, D, E = 3, 4, 4, 8  # sequence, heads, head width, model width


def _rotary_graph(*, dead_heads=(), dead_positions=(), table_heads: int = 1, rotate: str = "slice",
                  second: str | None = None, opset: int = 18):
    """x [1, S, E] -> q_proj (H*D) -> [B, H, S, D] -> x*cos + rotate_half(x)*sin -> [B, S, H*D] -> o_proj (E).

    ``dead_heads`` and ``dead_positions`` (inside every head) get zero q_proj columns; the tables have
    ``table_heads`` rows along the head axis; ``second`` replaces rotate_half's first half by a constant
    ("constant")."""
    g = GraphBuilder(opset=opset)
    x = g.input("x", [1, S, E])
    dead = [h * D + d for h in dead_heads for d in range(D)] + [h * D + d for h in range(H) for d in dead_positions]
    q = g.matmul(x, E, H * D, dead=dead, name="q_proj")
    heads = g.node("Transpose", [g.node("Reshape", [q, g.ints("split", [-1, S, H, D])])], perm=[0, 2, 1, 3])
    if rotate == "split":
        x1, x2 = g.node("Split", [heads], axis=-1, outputs=2, num_outputs=2, name="halves")
    else:
        last, half, end = g.ints("last", [-1]), g.ints("half", [D // 2]), g.ints("end", [D])
        x1 = g.node("Slice", [heads, g.ints("zero", [0]), half, last], name="x1")
        x2 = g.node("Slice", [heads, half, end, last], name="x2")
    if second == "constant":
        x1 = g.const("filler", np.ones((1, H, S, D // 2), np.float32))
    rotated = g.node("Concat", [g.node("Neg", [x2]), x1], axis=-1, name="rotate_half")
    cos = g.const("cos", g.randn(1, table_heads, S, D))
    sin = g.const("sin", g.randn(1, table_heads, S, D))
    roped = g.node("Add", [g.node("Mul", [heads, cos], name="times_cos"), g.node("Mul", [rotated, sin], name="times_sin")])
    merged = g.node("Reshape", [g.node("Transpose", [roped], perm=[0, 2, 1, 3]), g.ints("merge", [-1, S, H * D])])
    g.output(g.matmul(merged, H * D, E, name="o_proj"))
    return g.build()


@pytest.mark.parametrize("rotate", ["slice", "split"])
def test_a_dead_head_goes_through_rotary_and_positions_inside_every_head_stay(rotate):
    """Head 1 dead goes (its q_proj columns and o_proj rows); positions 0 and 2 dead in every head (a pair that
    rotate_half swaps) stay: the slices and the tables name every position of the head width."""
    model = _rotary_graph(dead_heads=[1], dead_positions=[0, 2], rotate=rotate)
    result = prune_ok(model)
    assert layer_widths(result.model) == {"q_proj": (E, (H - 1) * D), "o_proj": ((H - 1) * D, E)}
    kept = {why: n for d in group_of_tensor(result, "q_proj") for why, n in d.kept_dead.items()}
    assert sum(kept.values()) == H - 1 and all("position" in why for why in kept), kept  # a pair per live head


def test_a_table_that_varies_per_head_keeps_the_heads_and_says_why():
    result = prune_ok(_rotary_graph(dead_heads=[1], table_heads=H))
    assert layer_widths(result.model)["q_proj"] == (E, H * D)
    assert any("varies along the heads" in why for why in result.report.plan.analysis.barriers.values())


def test_a_concat_of_heads_with_data_that_carries_none_keeps_the_heads_and_says_why():
    result = prune_ok(_rotary_graph(dead_heads=[1], second="constant"))
    assert layer_widths(result.model)["q_proj"] == (E, H * D)
    barriers = result.report.plan.analysis.barriers
    assert "carry attention heads with data that does not" in barriers["rotate_half"], barriers


def test_a_concat_of_heads_along_the_sequence_keeps_each_head_at_its_head():
    """Concat along an axis that holds no channels (a key/value cache appended): every input carries the same
    heads, and a dead head goes from both."""
    g = GraphBuilder(opset=18)
    x = g.input("x", [1, S, E])
    q = g.matmul(x, E, H * D, dead=range(D, 2 * D), name="q_proj")
    k = g.matmul(x, E, H * D, dead=range(D, 2 * D), name="k_proj")
    split = g.ints("split", [-1, S, H, D])
    qh, kh = (g.node("Transpose", [g.node("Reshape", [t, split])], perm=[0, 2, 1, 3]) for t in (q, k))
    both = g.node("Concat", [qh, kh], axis=2, name="cache")  # [B, H, 2S, D]
    merged = g.node("Reshape", [g.node("Transpose", [both], perm=[0, 2, 1, 3]), g.ints("merge", [-1, 2 * S, H * D])])
    g.output(g.matmul(merged, H * D, E, name="o_proj"))
    out = prune_ok(g.build()).model
    assert layer_widths(out) == {"q_proj": (E, 3 * D), "k_proj": (E, 3 * D), "o_proj": (3 * D, E)}


# -- real exports ------------------------------------------------------------------------------------------

EXPORTERS = ("dynamo", "torchscript")
BUILDERS = {
    "rotary_mha": rm.rotary_block,
    "rotary_gqa": partial(rm.rotary_block, gqa=True),
    "rotary_mha_chunk": partial(rm.rotary_block, chunk=True),
    "hf_llama_eager": partial(rm.hf_llama, "eager"),
    "hf_llama_sdpa": partial(rm.hf_llama, "sdpa"),
    "hf_llama_gqa_eager": partial(rm.hf_llama, "eager", gqa=True),
    "hf_llama_gqa_sdpa": partial(rm.hf_llama, "sdpa", gqa=True),
}
NOT_EXPORTABLE = {
    ("hf_llama_gqa_sdpa", "torchscript"): "the TorchScript exporter cannot convert scaled_dot_product_attention "
                                          "with enable_gqa (Llama's sdpa attention with fewer K/V heads)",
}
# In the default run (the rest under -m slow): each kind once, the quick TorchScript exports where they export and
# one dynamo export (several seconds each).
DEFAULT = {
    "rotary_mha": ("torchscript",),
    "rotary_gqa": ("torchscript",),
    "hf_llama_gqa_eager": ("torchscript",),
    "hf_llama_sdpa": ("dynamo",),
}


def _params(default: dict[str, tuple[str, ...]]) -> list:
    return [pytest.param(name, exporter, id=f"{name}-{exporter}",
                         marks=[] if exporter in default.get(name, ()) else [pytest.mark.slow])
            for name in BUILDERS for exporter in EXPORTERS]


class _Exports:
    """Each case built and exported once per module."""

    def __init__(self) -> None:
        self._done: dict[tuple, Exported] = {}

    def get(self, name: str, exporter: str, **kw) -> Exported:
        if (name, exporter) in NOT_EXPORTABLE:
            pytest.skip(NOT_EXPORTABLE[(name, exporter)])
        key = (name, exporter, tuple(sorted(kw.items())))
        if key not in self._done:
            from onnxprune.torch_export import export_onnx

            case = BUILDERS[name](**kw)
            self._done[key] = Exported(case, export_onnx(case.model, case.example, exporter=exporter))
        return self._done[key]


@pytest.fixture(scope="module")
def exports():
    with single_torch_thread():  # a shared, busy CPU: tiny models run faster on one thread
        yield _Exports()


@pytest.mark.parametrize(("name", "exporter"), _params(DEFAULT))
def test_dead_rotary_heads_go_exactly_as_in_pytorch(exports, name, exporter):
    exported = exports.get(name, exporter)
    case = exported.case
    assert case.dead_heads > 0 and case.dead_neurons > 0
    pruned = prune_exported(exported)
    assert_same_outputs(exported.model, pruned.model, case)
    assert pruned.removed == case.removed_params, (
        f"{name} ({exporter}): {pruned.removed} float parameters removed; removing its {case.dead_heads} dead "
        f"head(s) and {case.dead_neurons} dead FFN neuron(s) in PyTorch removes {case.removed_params}; "
        f"barriers: {pruned.result.report.plan.analysis.barriers}")


@pytest.mark.parametrize(("name", "exporter"), _params({"rotary_gqa": ("torchscript",), "hf_llama_eager": ("torchscript",)}))
def test_with_no_dead_head_only_the_dead_neurons_go(exports, name, exporter):
    exported = exports.get(name, exporter, heads=False)
    case = exported.case
    assert case.dead_heads == 0
    pruned = prune_exported(exported)
    assert_same_outputs(exported.model, pruned.model, case)
    assert pruned.removed == case.removed_params
    assert pruned.result.report.plan.removed_channels == case.dead_neurons


@pytest.mark.slow
def test_torchscript_still_cannot_export_llama_sdpa_with_grouped_query_attention():
    """NOT_EXPORTABLE is up to date: when TorchScript exports this, its combination should run."""
    from onnxprune.torch_export import export_onnx

    case = BUILDERS["hf_llama_gqa_sdpa"]()
    with pytest.raises(Exception, match="enable_gqa"):
        export_onnx(case.model, case.example, exporter="torchscript")


def test_the_hand_written_rotary_tables_are_what_llama_computes():
    """tests/rotary_models.py's cos/sin tables and rotate_half are HF Llama's (so the hand-written block is the
    same function as the library's rotary embedding)."""
    tr = import_transformers()
    from transformers.models.llama import modeling_llama as ml

    config = tr.LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8, max_position_embeddings=16)
    cos, sin = ml.LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(rm.SEQ)[None])
    mine_cos, mine_sin = rm.rotary_tables(rm.SEQ, 8)
    torch.testing.assert_close(mine_cos[0, 0], cos[0])
    torch.testing.assert_close(mine_sin[0, 0], sin[0])
    x = torch.randn(2, 4, rm.SEQ, 8)
    torch.testing.assert_close(rm.rotate_half(x), ml.rotate_half(x))
    torch.testing.assert_close(rm.rotate_half(x, chunk=True), ml.rotate_half(x))
