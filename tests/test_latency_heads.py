"""The latency model decides per attention block whether removing its dead heads pays (issue #25).

A head group (a head's Q, K, V rows, its scores and its share of the output projection: one channel
group whose channels are whole heads) is charged its projections and its products of two activations,
``Q @ K^T`` and ``P @ V`` (MatMul, or Einsum), each timed as a micro-benchmark on ONNX Runtime at the
head counts the search considers. Real sessions throughout; speed is never asserted (timings on a
shared machine are noisy; speed goals live in the benchmarks): the tests check that the products are
found, sized, measured and counted, that a plan removes whole heads or keeps the block, and that the
pruned model computes what the input does.

Models: the hand-written SDPA block and grouped-query attention of tests/attention_models.py (four heads
of eight channels, heads 1 and 3 dead; for GQA one of two K/V heads), exported as tests/test_attention_heads.py
exports them, and a hand-built ONNX attention whose products are Einsum nodes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxprune.api import inspect_model, prune_model
from onnxprune.channels.plan import make_plan
from onnxprune.cli import main
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.measure import measure
from onnxprune.latency.planner import LatencyPlanner, heads_reason
from onnxprune.latency.products import OperandShapes, product_nodes, product_specs, runtime_shapes, static_shapes
from onnxprune.latency.search import choose_widths
from onnxprune.latency.target import Int8Target, Target
from onnxprune.modelio import as_loaded
from onnxprune.pruner import Pruner
from tests.conftest import single_torch_thread
from tests.graphs import GraphBuilder
from tests.prune_helpers import layer_widths, same_outputs

torch = pytest.importorskip("torch")
from tests import attention_models as am  # noqa: E402

TARGET = Target("ort-cpu", threads=2, batch=1)
SEQ, DIM, HEADS, HEAD_DIM = am.SEQ, am.DIM, am.HEADS, am.HEAD_DIM
DEAD_HEADS = am.DEAD_HEADS  # (1, 3) of 4
EINSUM_PRODUCTS = ("qk", "pv")


def einsum_attention() -> onnx.ModelProto:
    """x -> Q, K, V (MatMul) -> [B, S, H, D] -> Einsum scores -> Softmax -> Einsum with V -> merge -> out + x.
    V's columns of heads 1 and 3 are zero: those heads are dead."""
    g = GraphBuilder(seed=3)
    x = g.input("x", ["batch", SEQ, DIM])
    dead = [h * HEAD_DIM + i for h in DEAD_HEADS for i in range(HEAD_DIM)]
    q, k = g.matmul(x, DIM, HEADS * HEAD_DIM, name="q"), g.matmul(x, DIM, HEADS * HEAD_DIM, name="k")
    v = g.matmul(x, DIM, HEADS * HEAD_DIM, dead=dead, name="v")
    split = g.ints("split", [-1, SEQ, HEADS, HEAD_DIM])
    q4, k4, v4 = (g.node("Reshape", [t, split], name=f"{t}_heads") for t in (q, k, v))
    scores = g.node("Einsum", [q4, k4], equation="bqhd,bkhd->bhqk", name="qk")
    probs = g.node("Softmax", [scores], axis=-1, name="softmax")
    heads = g.node("Einsum", [probs, v4], equation="bhqk,bkhd->bqhd", name="pv")
    merged = g.node("Reshape", [heads, g.ints("merge", [-1, SEQ, HEADS * HEAD_DIM])], name="merge_heads")
    g.output(g.node("Add", [g.matmul(merged, HEADS * HEAD_DIM, DIM, name="out"), x], name="residual"))
    return g.build()


class Exports:
    """Each (case, exporter) exported once per module."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, bool], onnx.ModelProto] = {}

    def get(self, name: str, exporter: str, *, heads: bool = True) -> onnx.ModelProto:
        if name == "einsum":
            return einsum_attention()
        if (name, exporter, heads) not in self._models:
            from onnxprune.torch_export import export_onnx

            case = am.build(name, heads=heads)
            self._models[(name, exporter, heads)] = export_onnx(case.model, case.example, exporter=exporter)
        return self._models[(name, exporter, heads)]


@pytest.fixture(scope="module")
def exports():
    with single_torch_thread():  # a shared, busy CPU: tiny models run faster on one thread
        yield Exports()


@pytest.fixture
def cache(tmp_path) -> LatencyCache:
    """A cold cache of this test's own (measurements are real; nothing is read from the user's cache)."""
    return LatencyCache(TARGET, tmp_path / "latency.json")


def head_group(analysis) -> int:
    """The index of the one channel group whose channels are heads (it reaches the products)."""
    shapes = OperandShapes(analysis, make_plan(analysis))
    groups = {g for node in product_nodes(analysis) for t in node.inputs for g in shapes.groups(t.name)}
    assert len(groups) == 1, f"expected one head group, found {groups}"
    return groups.pop()


# -- finding and sizing the products ---------------------------------------------------------------------------


def test_einsum_products_are_found_and_sized_at_the_target_batch():
    analysis, base, _, _ = inspect_model(einsum_attention())
    specs = {s.name: s for s in product_specs(analysis, batch=3)}
    assert set(specs) == set(EINSUM_PRODUCTS)  # the projections have constant weights: layers, not products
    qk, pv = specs["qk"], specs["pv"]
    assert (qk.op, qk.equation) == ("Einsum", "bqhd,bkhd->bhqk")
    assert qk.a_shape == qk.b_shape == (3, SEQ, HEADS, HEAD_DIM)
    assert pv.a_shape == (3, HEADS, SEQ, SEQ) and pv.b_shape == (3, SEQ, HEADS, HEAD_DIM)
    g = head_group(analysis)
    shapes = OperandShapes(analysis, base)
    kept = {g: HEADS - len(DEAD_HEADS)}
    assert shapes.at(qk.a_tensor, qk.a_shape, kept) == (3, SEQ, 2, HEAD_DIM)  # whole heads: D stays 8
    assert shapes.at(pv.a_tensor, pv.a_shape, kept) == (3, 2, SEQ, SEQ)
    assert shapes.at(pv.b_tensor, pv.b_shape, {g: 3}) == (3, SEQ, 3, HEAD_DIM)


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_exported_attention_products_are_sized_at_the_target_batch(exports, exporter):
    """Shape inference sizes them (batch fixed), and a run of the model on ONNX Runtime finds the same shapes."""
    analysis = inspect_model(exports.get("sdpa_block", exporter))[0]
    specs = product_specs(analysis, batch=2)
    assert len(specs) == 2 and {s.op for s in specs} == {"MatMul"}
    names = [t for s in specs for t in (s.a_tensor, s.b_tensor)]
    assert runtime_shapes(analysis.graph, names, 2) == {t: shape for s in specs for t, shape in
                                                        ((s.a_tensor, s.a_shape), (s.b_tensor, s.b_shape))}
    for spec in specs:
        assert spec.a_shape[:2] == spec.b_shape[:2] == (2, HEADS), spec
        assert sorted(spec.a_shape[2:]) == sorted(spec.b_shape[2:]) == [HEAD_DIM, SEQ]


def test_operands_shape_inference_cannot_size_are_sized_by_a_run_of_the_model(exports):
    """TorchScript's BERT computes its head split from ``Shape`` of the batch: at batch 1 ONNX shape inference
    (onnx 1.x, data propagation on) leaves its products' operands unsized; running the model sizes them."""
    analysis = inspect_model(exports.get("hf_bert_eager", "torchscript"))[0]
    nodes = product_nodes(analysis)
    names = [t.name for n in nodes for t in n.inputs]
    assert len(nodes) == 4 and set(static_shapes(analysis.graph, names, 1)) < set(names)
    specs = product_specs(analysis, batch=1)
    assert len(specs) == 4
    assert all(spec.a_shape[:2] == spec.b_shape[:2] == (1, HEADS) for spec in specs), specs


def test_with_no_dead_head_the_products_are_not_sized(exports, cache):
    """Only the FFN has dead channels: nothing the products reach can change, so the model is not run to size them."""
    analysis, base, _, _ = inspect_model(exports.get("sdpa_block", "torchscript", heads=False))
    assert len(product_nodes(analysis)) == 2
    choice = choose_widths(analysis, base, TARGET, cache)
    assert choice.to_dict()["products_timed"] == 0 and [c.attention for c in choice.groups] == [False]
    assert not any(key.startswith("product|") for key in cache.entries)


def test_a_matmul_by_constant_weights_is_a_layer_not_a_product(cache):
    g = GraphBuilder()
    x = g.input("x", ["batch", DIM])
    g.output(g.matmul(g.relu(g.matmul(x, DIM, 16, dead=[2, 5], name="fc1")), 16, 4, name="fc2"))
    analysis, base, _, _ = inspect_model(g.build())
    assert product_nodes(analysis) == []
    choice = choose_widths(analysis, base, TARGET, cache)
    assert choice.to_dict()["products_timed"] == 0 and not any(c.attention for c in choice.groups)


# -- the latency model counts them -----------------------------------------------------------------------------


def test_the_head_group_is_charged_its_products_at_each_head_count(cache):
    analysis, base, _, _ = inspect_model(einsum_attention())
    choice = choose_widths(analysis, base, TARGET, cache)
    assert choice.to_dict()["products_timed"] == 2
    (group,) = [c for c in choice.groups if c.attention]
    assert (group.total, group.live_or_kept) == (HEADS, HEADS - len(DEAD_HEADS))
    assert group.chosen in (HEADS - len(DEAD_HEADS), HEADS)  # candidates(2, 4): every dead head, or none
    assert [row["node"] for row in group.products] == list(EINSUM_PRODUCTS)
    specs = {s.name: s for s in product_specs(analysis, TARGET.batch)}
    for row in group.products:
        spec = specs[row["node"]]
        assert row["unpruned"]["a"] == list(spec.a_shape)
        assert HEADS - len(DEAD_HEADS) in row["max_pruned"]["a"] and HEADS not in row["max_pruned"]["a"]
        for label in ("max_pruned", "unpruned"):  # measured (real sessions) and cached at both head counts
            at = row[label]
            assert at["us"] is not None and at["us"] > 0
            assert cache.get(spec.key(tuple(at["a"]), tuple(at["b"]), TARGET.batch))["us"] == at["us"]
    for label in ("max_pruned", "unpruned"):  # the group's predicted cost holds its products
        assert group.predicted_us[label] >= sum(row[label]["us"] for row in group.products)


def _inflate_products(cache: LatencyCache, analysis, heads: int) -> None:
    """Make every product of the head group cost a second more at ``heads`` heads (the measured table edited)."""
    g = head_group(analysis)
    shapes = OperandShapes(analysis, make_plan(analysis))
    for spec in product_specs(analysis, TARGET.batch):
        key = spec.key(shapes.at(spec.a_tensor, spec.a_shape, {g: heads}), shapes.at(spec.b_tensor, spec.b_shape, {g: heads}),
                       TARGET.batch)
        cache.put(key, {**cache.get(key), "us": cache.get(key)["us"] + 1e6})


@pytest.mark.parametrize("costly", ["fewer heads", "every head"])
def test_the_products_decide_whether_removing_heads_pays(cache, costly):
    """With the table edited so that the products cost far more at the pruned head count, the block keeps its
    heads (and --explain's reason says so); at the full count, every dead head goes. Either plan prunes to a
    model that matches the input on ONNX Runtime."""
    model = einsum_attention()
    pruner = Pruner(as_loaded(model))
    analysis = pruner.analysis
    choose_widths(analysis, make_plan(analysis), TARGET, cache)  # measure everything for real
    live = HEADS - len(DEAD_HEADS)
    _inflate_products(cache, analysis, live if costly == "fewer heads" else HEADS)
    plan = LatencyPlanner(TARGET, cache)(analysis)
    (decision,) = [d for d in plan.groups if d.group.index == head_group(analysis)]
    if costly == "fewer heads":
        assert decision.removed == 0 and decision.kept_dead == {heads_reason(TARGET): len(DEAD_HEADS)}
    else:
        assert decision.removed == len(DEAD_HEADS)
    pruned = pruner.build(plan).model
    assert same_outputs(model, pruned, seed=4)
    assert layer_widths(pruned)["q"] == (DIM, HEAD_DIM * (HEADS - decision.removed))


# -- pruning for the target ------------------------------------------------------------------------------------


CASES = [("einsum", "-"), ("sdpa_block", "torchscript"), ("sdpa_block", "dynamo"), ("gqa_block", "torchscript")]


def _product_operand_shapes(model: onnx.ModelProto) -> set[tuple[int, ...]]:
    """Operand shapes of the products of ``model`` at batch 1, each sorted: (1, heads, 8, 8), as S = D = 8 > heads."""
    return {tuple(sorted(s)) for spec in product_specs(inspect_model(model)[0], 1) for s in (spec.a_shape, spec.b_shape)}


@pytest.mark.parametrize(("name", "exporter"), CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_prune_for_cpu_removes_whole_heads_or_keeps_the_block(exports, tmp_path, monkeypatch, name, exporter):
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path))
    model = exports.get(name, exporter)
    result = prune_model(model, target="ort-cpu", threads=2)
    assert result.report.verification.ok
    assert same_outputs(model, result.model, seed=5)
    latency = result.report.latency
    assert latency["products_timed"] == 2
    # the query heads' group (GQA: each K/V head is a group of its own, in the k and v projections, kept while
    # one of its query heads is; the products are charged to the query heads)
    (block,) = [g for g in latency["groups"] if g.get("unit") == "heads" and g.get("attention_products")]
    assert len(block["attention_products"]) == 2
    for product in block["attention_products"]:
        assert product["max_pruned"]["ms"] > 0 and product["unpruned"]["ms"] > 0
    # Whole heads or none: every width the attention changed is a multiple of the head size, and each product's
    # operands keep 8-wide heads (S = D = 8) at a head count the plan allows.
    dense = layer_widths(model)
    for layer, widths in layer_widths(result.model).items():
        for new, old in zip(widths, dense.get(layer, widths)):
            if new != old and old != am.HIDDEN:  # every width but the FFN's hidden one is a multiple of heads
                assert new % HEAD_DIM == 0, f"{layer}: {old} -> {new} channels, part of a head"
    (decision,) = [d for d in result.report.plan.groups if d.group.name == block["group"]]
    assert decision.removed in range(decision.dead + 1)
    assert decision.channels == HEADS  # one component per query head (GQA too)
    kept_heads = HEADS - decision.removed
    assert _product_operand_shapes(result.model) == {(1, kept_heads, SEQ, HEAD_DIM)}


def test_cli_report_and_explain_show_the_attention_block(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path))
    src, report = tmp_path / "attention.onnx", tmp_path / "report.json"
    onnx.save(einsum_attention(), src)
    capsys.readouterr()
    assert main(["prune", str(src), "-o", str(tmp_path / "out.onnx"), "--threads", "2", "--explain", "--report",
                 str(report)]) == 0
    out = capsys.readouterr().out
    data = json.loads(report.read_text())["latency"]
    (block,) = [g for g in data["groups"] if g.get("unit") == "heads"]
    assert block["group"] == "q" and block["channels"] == HEADS
    assert [p["node"] for p in block["attention_products"]] == list(EINSUM_PRODUCTS)
    assert all(set(p) == {"node", "op", "max_pruned", "chosen", "unpruned"} for p in block["attention_products"])
    explained = out[out.index("Channel groups"):]
    row = next(line.split() for line in explained.splitlines() if line.startswith("q "))
    assert row[1] == str(HEADS) and int(row[2]) in (0, len(DEAD_HEADS))  # channels, removed: whole heads
    if int(row[2]) == 0:  # the block kept its dead heads: the row says why
        assert f"{len(DEAD_HEADS)} dead kept:" in " ".join(row)


def test_products_are_measured_quantized_on_the_int8_target(tmp_path):
    analysis, base, _, _ = inspect_model(einsum_attention())
    target = Int8Target("ort-cpu-int8", threads=2, batch=1)
    cache = LatencyCache(target, tmp_path / "int8.json")
    g = head_group(analysis)
    shapes = OperandShapes(analysis, base)
    requests = [(s, shapes.at(s.a_tensor, s.a_shape, {g: k}), shapes.at(s.b_tensor, s.b_shape, {g: k}))
                for s in product_specs(analysis, 1) for k in (2, 4)]
    assert measure(requests, target, cache) == 4
    for spec, a, b in requests:
        entry = cache.get(spec.key(a, b, 1))
        assert entry is not None and entry["us"] > 0 and np.isfinite(entry["in_us"])
