"""Dead attention heads are deleted as compactly as in PyTorch, on real exports of real attention code.

Each case (tests/attention_models.py) is a tiny model with random weights in which some heads are dead
(their V rows and biases zero, so their attention output is zero whatever Q and K are) beside live ones,
and some FFN neurons are dead (fc1 row and bias zero). It is exported with each torch exporter, pruned
with ``target="none"`` (every dead channel deleted), and then:

* the pruned model computes what the exported one does: ONNX Runtime (CPU, real sessions), a fresh random
  input of batch 2, max abs difference <= 1e-4 x max(1, output scale);
* its float parameters fell by at least what removing those heads and neurons in PyTorch removes
  (``AttentionCase.removed_params``: per head its Q, K, V rows and biases and the output projection's
  input columns; with grouped-query attention a K/V head with all its query heads; per neuron fc1's row
  and bias and fc2's column), less ``SLACK``.

With no dead head the attention keeps every parameter (only the dead FFN neurons go), and with nothing
dead nothing is deleted. A fused com.microsoft Attention (ONNX Runtime's transformer optimizer) is a
barrier that the explanation names.

Parameters are compared with the exported model after onnxprune's preparation passes alone (constant
folding, shape inference: what the channel pass starts from), so folding that has nothing to do with
channels (BERT's position table sliced to the sequence by the dynamo export, a causal mask folded into a
constant) counts neither way. They are counted as distinct float constants (initializers and Constant
nodes, each distinct value once): the TorchScript exporter shares equal weights through Identity nodes,
which preparation materialises as copies; that does not change how many parameters the model has.
Random weights make distinct parameters distinct values (the builders randomise biases and norms too).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests import attention_models as am
from tests.conftest import single_torch_thread
from tests.prune_helpers import layer_widths

EXPORTERS = ("dynamo", "torchscript")
# The least float parameters one deleted unit holds is a neuron of a 16-wide MLP (16 + 1 + 16 = 33) and a head
# holds hundreds: a slack of 8 floats leaves room for a few scalar float constants a rewrite may add or copy
# (a scale or a fill value split off a shared subgraph), and no room to keep a single dead head or neuron.
SLACK = 8
TOLERANCE = 1e-4  # max abs difference, relative to max(1, max |output|)

_FAST_PATH = ("the TorchScript exporter cannot export nn.MultiheadAttention's fast path "
              "(aten::_native_multi_head_attention, taken in eval mode with batch_first=True)")
NOT_EXPORTABLE = {
    ("mha_batch_first_block", "torchscript"): _FAST_PATH,
    ("mha_need_weights_block", "torchscript"): _FAST_PATH,
    ("torchvision_vit", "torchscript"): _FAST_PATH + "; torchvision's ViT uses nn.MultiheadAttention that way",
    ("timm_vit", "torchscript"): "the TorchScript exporter cannot export timm's attention (a tensor where a bool is due)",
}
# What TorchScript's export hides from the engine (each prunes exactly with the dynamo exporter, torch's default):
# the dead heads stay, and the test shows they still do (strict xfail). None now: the engine follows TorchScript's
# computed sizes (``embed_dim // num_heads``, ``batch * num_heads``, torch.chunk's Slice bounds) and its attention
# masks (Expand to a computed shape, Range; see onnxprune/channels/shape_values.py).
TORCHSCRIPT_KEEPS_HEADS: dict[str, str] = {}
# In the default run (the rest under -m slow): one of each kind of attention code, both exporters where they export.
DEFAULT = {
    "sdpa_block": EXPORTERS,
    "manual_causal_block": EXPORTERS,
    "mha_batch_first_block": ("dynamo",),
    "mha_seq_first_block": ("dynamo",),
    "gqa_block": EXPORTERS,
    "hf_bert_eager": EXPORTERS,
    "torchvision_vit": ("dynamo",),
}
# The controls (no dead head; nothing dead) in the default run.
DEFAULT_CONTROLS = {"sdpa_block": EXPORTERS, "gqa_block": ("dynamo",), "hf_bert_eager": ("torchscript",)}


def _params(default: dict[str, tuple[str, ...]], known_limits: bool = False) -> list:
    out = []
    for name in am.BUILDERS:
        for exporter in EXPORTERS:
            marks = [] if exporter in default.get(name, ()) else [pytest.mark.slow]
            if known_limits and exporter == "torchscript" and name in TORCHSCRIPT_KEEPS_HEADS:
                marks.append(pytest.mark.xfail(strict=True, reason=TORCHSCRIPT_KEEPS_HEADS[name]))
            out.append(pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}"))
    return out


# ---------------------------------------------------------------------------------------------
# Building, exporting and measuring (cached per module: each case is built and exported once)
# ---------------------------------------------------------------------------------------------


@dataclass
class Exported:
    case: am.AttentionCase
    model: onnx.ModelProto


class Cache:
    """Cases and their exports, built once per (name, heads, neurons[, exporter])."""

    def __init__(self) -> None:
        self._cases: dict[tuple, am.AttentionCase] = {}
        self._exports: dict[tuple, Exported | BaseException] = {}

    def case(self, name: str, *, heads: bool = True, neurons: bool = True) -> am.AttentionCase:
        key = (name, heads, neurons)
        if key not in self._cases:
            self._cases[key] = am.build(name, heads=heads, neurons=neurons)
        return self._cases[key]

    def exported(self, name: str, exporter: str, *, heads: bool = True, neurons: bool = True) -> Exported:
        if (name, exporter) in NOT_EXPORTABLE:
            pytest.skip(NOT_EXPORTABLE[(name, exporter)])
        key = (name, exporter, heads, neurons)
        if key not in self._exports:
            from onnxprune.torch_export import export_onnx

            case = self.case(name, heads=heads, neurons=neurons)
            try:
                self._exports[key] = Exported(case, export_onnx(case.model, case.example, exporter=exporter))
            except Exception as e:  # noqa: BLE001 - kept so every test of this export reports the same error
                self._exports[key] = e
        result = self._exports[key]
        if isinstance(result, BaseException):
            raise result
        return result


@pytest.fixture(scope="module")
def cache():
    with single_torch_thread():  # a shared, busy CPU: tiny models run faster on one thread
        yield Cache()


def float_parameters(model: onnx.ModelProto) -> int:
    """Elements of the distinct float constants (initializers and Constant nodes) of the main graph."""
    seen: set[tuple] = set()
    total = 0
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    arrays.append(numpy_helper.to_array(attr.t))
                elif attr.name in ("value_float", "value_floats"):
                    arrays.append(np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.float32))
    for a in arrays:
        if not np.issubdtype(a.dtype, np.floating):
            continue
        key = (a.dtype.str, a.shape, hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())
        if key not in seen:
            seen.add(key)
            total += int(a.size)
    return total


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def assert_same_outputs(reference: onnx.ModelProto, pruned: onnx.ModelProto, case: am.AttentionCase) -> None:
    """Both models on ONNX Runtime, a fresh random input of batch 2: outputs equal within TOLERANCE."""
    torch.manual_seed(123)
    fresh = case.make_input(2)
    fresh = fresh if isinstance(fresh, tuple) else (fresh,)
    ref, new = _session(reference), _session(pruned)
    feeds = {i.name: t.numpy() for i, t in zip(ref.get_inputs(), fresh, strict=True)}
    expected, got = ref.run(None, feeds), new.run(None, feeds)
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape, f"{case.name}: output shape {g.shape}, exported {e.shape}"
        diff, scale = float(np.abs(e - g).max()), max(1.0, float(np.abs(e).max()))
        assert diff <= TOLERANCE * scale, f"{case.name}: pruned output differs by {diff:.3g} (scale {scale:.3g})"


@dataclass
class Pruned:
    baseline: onnx.ModelProto  # the export after the preparation passes alone
    result: object  # onnxprune.api.RunResult

    @property
    def model(self) -> onnx.ModelProto:
        return self.result.model

    @property
    def removed(self) -> int:
        """Float parameters the pruning removed (see the module docstring)."""
        return float_parameters(self.baseline) - float_parameters(self.model)


def prune_exported(exported: Exported) -> Pruned:
    """``onnxprune.api.prune(model, target="none")`` (as prune_model, to keep the report: why dead channels stayed),
    and the same export through the preparation passes alone."""
    from onnxprune.api import prune_model, run_passes
    from passes import preparation

    baseline = run_passes(exported.model, preparation(), verify=False).model
    return Pruned(baseline, prune_model(exported.model, target="none"))


def _kept_dead(report) -> str:
    plan = report.plan
    if plan is None:
        return "no plan"
    rows = [f"{d.group.name}: {d.dead} dead, {d.removed} removed; " + "; ".join(f"{n} kept: {why}" for why, n in
                                                                            d.kept_dead.items())
            for d in plan.groups if d.kept_dead]
    return "\n  ".join(rows) or "no dead channel kept"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "exporter"), _params(DEFAULT, known_limits=True))
def test_dead_heads_and_neurons_are_deleted_as_compactly_as_in_pytorch(cache, name, exporter):
    exported = cache.exported(name, exporter)
    case = exported.case
    pruned = prune_exported(exported)
    assert_same_outputs(exported.model, pruned.model, case)
    removed, expected = pruned.removed, case.removed_params
    assert removed >= expected - SLACK, (
        f"{name} ({exporter}): {removed} float parameters removed; removing its {case.dead_heads} dead head(s) "
        f"and {case.dead_neurons} dead FFN neuron(s) in PyTorch removes {expected} (slack {SLACK}).\n  "
        + _kept_dead(pruned.result.report)
    )


@pytest.mark.parametrize(("name", "exporter"), _params(DEFAULT_CONTROLS))
def test_with_no_dead_head_the_attention_keeps_every_parameter(cache, name, exporter):
    """Only the dead FFN neurons go: exactly their parameters are removed, nothing of the live attention."""
    exported = cache.exported(name, exporter, heads=False)
    case = exported.case
    assert case.dead_heads == 0 and case.dead_neurons > 0
    pruned = prune_exported(exported)
    assert_same_outputs(exported.model, pruned.model, case)
    removed, expected = pruned.removed, case.removed_params
    assert abs(removed - expected) <= SLACK, (
        f"{name} ({exporter}): {removed} float parameters removed; its {case.dead_neurons} dead FFN neuron(s) "
        f"hold {expected} and no head is dead.\n  " + _kept_dead(pruned.result.report)
    )
    assert pruned.result.report.plan.removed_channels == case.dead_neurons


@pytest.mark.parametrize(("name", "exporter"), _params(DEFAULT_CONTROLS))
def test_with_nothing_dead_nothing_is_deleted(cache, name, exporter):
    exported = cache.exported(name, exporter, heads=False, neurons=False)
    assert exported.case.removed_params == 0
    pruned = prune_exported(exported)
    assert pruned.result.report.plan.removed_channels == 0
    assert layer_widths(pruned.model) == layer_widths(pruned.baseline)
    assert pruned.removed == 0
    assert_same_outputs(exported.model, pruned.model, exported.case)


def test_torchscript_still_cannot_export_the_multihead_attention_fast_path(cache):
    """NOT_EXPORTABLE is up to date: when TorchScript exports this, its combinations should run."""
    from onnxprune.torch_export import export_onnx

    case = cache.case("mha_batch_first_block")
    with pytest.raises(Exception, match="_native_multi_head_attention"):
        export_onnx(case.model, case.example, exporter="torchscript")


def test_explain_names_a_fused_com_microsoft_attention_as_a_barrier(cache, tmp_path, capsys):
    """ONNX Runtime's transformer optimizer fuses BERT's attention into com.microsoft Attention (packed QKV
    weights inside the op): its heads cannot be followed, and `onnxprune prune --explain` must say so, naming
    each Attention node and the op. The model still prunes and verifies."""
    pytest.importorskip("onnxruntime.transformers.optimizer")
    from onnxruntime.transformers.optimizer import optimize_model

    from onnxprune.api import inspect_model
    from onnxprune.cli import main

    exported = cache.exported("hf_bert_masked", "torchscript")
    source = tmp_path / "bert.onnx"
    onnx.save(exported.model, source)
    optimized = optimize_model(str(source), model_type="bert", num_heads=4, hidden_size=32)
    fused = tmp_path / "bert_fused.onnx"
    optimized.save_model_to_file(str(fused))
    attention = [n.name for n in optimized.model.graph.node if (n.domain, n.op_type) == ("com.microsoft", "Attention")]
    assert len(attention) == 2, "ONNX Runtime's optimizer no longer fuses this BERT's attention"

    capsys.readouterr()
    assert main(["prune", str(fused), "-o", str(tmp_path / "pruned.onnx"), "--target", "none", "--explain"]) == 0
    out = capsys.readouterr().out
    barriers = inspect_model(str(fused))[0].barriers
    for node in attention:
        assert node in barriers and "Attention" in barriers[node], (
            f"fused attention node {node} is not reported as a barrier naming its op; barriers: {barriers}")
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"{node}:")), None)
        assert line is not None and "Attention" in line, f"--explain does not name {node}:\n{out}"
