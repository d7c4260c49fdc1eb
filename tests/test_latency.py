"""Latency-aware pruning: measured layer costs, width choice, the not-slower guarantee (real ORT sessions)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from onnxprune.api import inspect_model, prune_model
from onnxprune.checked_write import runtime_reference
from onnxprune.cli import main
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.guarantee import Ladder, fall_back, first_rung_candidates, pick_first_rung
from onnxprune.latency.layers import layer_specs
from onnxprune.latency.measure import measure
from onnxprune.latency.planner import (
    ALTERNATIVES,
    ATTEMPTS,
    FEWER_PRUNED_GROUPS,
    NOTHING_PRUNED,
    ROUND_TO_COARSE,
    RUNGS,
    LatencyPlanner,
)
from onnxprune.latency.search import candidates, choose_widths
from onnxprune.latency.target import Target, make_target
from onnxprune.modelio import as_loaded
from onnxprune.pruner import Pruner
from tests.graphs import GraphBuilder
from tests.prune_helpers import layer_widths, same_outputs

torch = pytest.importorskip("torch")
import models  # noqa: E402
from onnxprune.kill import kill_channels  # noqa: E402
from onnxprune.torch_export import export_onnx  # noqa: E402

TARGET = Target("ort-cpu", threads=2, batch=1)


@pytest.fixture(scope="module")
def dead_mobilenet() -> onnx.ModelProto:
    """MobileNetV2 (CIFAR size) with 40 % of every prunable group's channels dead."""
    torch.manual_seed(0)
    net = models.build("mobilenetv2_cifar").eval()
    models.randomize_batchnorm(net)
    dense = export_onnx(net, torch.rand(1, 3, 32, 32))
    return kill_channels(dense, 0.4, seed=3)[0]


def test_candidates_are_max_pruning_block_roundings_and_unpruned():
    assert candidates(21, 64) == [21, 24, 32, 64]
    assert candidates(37, 40) == [37, 40]
    assert candidates(16, 16) == [16]


def test_layer_specs_describe_every_conv_and_gemm(dead_mobilenet):
    analysis = inspect_model(dead_mobilenet)[0]
    specs = layer_specs(analysis.graph)
    kinds = {s.kind for s in specs}
    assert {"conv", "dwconv", "gemm"} <= kinds
    dw = next(s for s in specs if s.kind == "dwconv")
    assert dw.widths(24, 999) == (24, 24 * dw.multiplier)
    assert dw.key(24, 24, 1) != dw.key(32, 32, 1)


def test_measurements_are_cached_on_disk_and_reused(tmp_path, dead_mobilenet):
    analysis = inspect_model(dead_mobilenet)[0]
    specs = layer_specs(analysis.graph)[:6]
    requests = [(s, s.in_width, s.out_width) for s in specs] + [(s, 16, 16) for s in specs]
    cache = LatencyCache(TARGET, tmp_path / "c.json")
    assert measure(requests, TARGET, cache) == len({s.key(a, b, 1) for s, a, b in requests})
    cache.save()
    entry = cache.get(specs[0].key(specs[0].in_width, specs[0].out_width, 1))
    assert entry["us"] > 0 and entry["layout"] in ("nchwc", "plain")
    reloaded = LatencyCache(TARGET, tmp_path / "c.json")
    assert measure(requests, TARGET, reloaded) == 0
    other = LatencyCache(Target("ort-cpu", threads=1, batch=1), tmp_path / "c.json")
    assert not other.entries  # another fingerprint: never reuse


def test_choice_lies_between_every_dead_channel_deleted_and_unpruned(dead_mobilenet):
    analysis, base, _, _ = inspect_model(dead_mobilenet)
    choice = choose_widths(analysis, base, TARGET, LatencyCache(TARGET))
    for g in choice.groups:
        assert g.live_or_kept <= g.chosen <= g.total
        assert g.chosen in candidates(g.live_or_kept, g.total)
    assert choice.predicted_us["output"] <= choice.predicted_us["max_pruned"] + 1e-6


def test_prune_for_cpu_is_verified_and_not_slower_than_the_input(dead_mobilenet):
    result = prune_model(dead_mobilenet, target="ort-cpu", threads=2)
    lat = result.report.latency
    chosen = [a for a in lat["attempts"] if a["accepted"]]
    assert len(chosen) == 1 and lat["accepted"] == chosen[0]["attempt"]
    accepted = chosen[0]
    if "output_ms" in accepted:
        assert accepted["output_ms"] < accepted["input_ms"] or accepted["attempt"] == "nothing pruned"
        timed_together = [a for a in lat["attempts"] if a.get("input_ms") == accepted["input_ms"]]
        assert accepted["output_ms"] == min(a["output_ms"] for a in timed_together)  # the fastest candidate wins
    assert result.report.verification.ok
    assert same_outputs(dead_mobilenet, result.model, seed=5)
    exact = layer_widths(prune_model(dead_mobilenet, target="none").model)
    for name, (_, cout) in layer_widths(result.model).items():
        assert cout >= exact[name][1]  # only dead channels are kept for speed


def test_rungs_have_distinct_ids_and_the_labels_reports_show():
    assert [r.label for r in ATTEMPTS] == ["latency model", "round to 32", "fewer pruned groups", "nothing pruned"]
    assert [r.label for r in ALTERNATIVES] == ["every dead channel", "round to 16"]
    assert len(RUNGS) == len(ATTEMPTS) + len(ALTERNATIVES)
    assert all(RUNGS[r.id] is r for r in (*ATTEMPTS, *ALTERNATIVES))


@pytest.mark.parametrize("rung", [ROUND_TO_COARSE, NOTHING_PRUNED, FEWER_PRUNED_GROUPS], ids=lambda r: r.id)
def test_fallback_rungs_prune_less(dead_mobilenet, rung):
    from onnxprune.api import run_passes
    from passes.prune_channels import PruneChannelsPass

    planner = LatencyPlanner(TARGET, LatencyCache(TARGET), rung)
    out = run_passes(dead_mobilenet, [PruneChannelsPass(planner=planner)]).model
    dense = layer_widths(dead_mobilenet)
    widths = layer_widths(out)
    if rung is NOTHING_PRUNED:
        assert widths == dense
    elif rung is ROUND_TO_COARSE:
        assert all(w[1] % 32 == 0 or w[1] == dense[n][1] for n, w in widths.items())
    else:
        full = layer_widths(run_passes(dead_mobilenet, [PruneChannelsPass(planner=LatencyPlanner(TARGET, LatencyCache(TARGET)))]).model)
        assert sum(w[1] for w in widths.values()) >= sum(w[1] for w in full.values())
    assert same_outputs(dead_mobilenet, out)


class InputAlwaysFaster(Ladder):
    """Timings in which the input beats every candidate (a runtime that gains nothing from pruning)."""

    def time(self, candidates):
        return {"input": 1.0, **{c.label: 2.0 for c in candidates}}


def test_when_no_candidate_beats_the_input_every_fall_back_is_tried_and_nothing_pruned_is_kept(dead_mobilenet):
    loaded = as_loaded(dead_mobilenet)
    ladder = InputAlwaysFaster(Pruner(loaded), TARGET, LatencyCache(TARGET), runtime_reference(loaded))
    assert pick_first_rung(ladder, first_rung_candidates(ladder, LatencyPlanner(TARGET, ladder.cache))) is None
    winner = fall_back(ladder)
    assert winner.rung is NOTHING_PRUNED and not winner.changes
    labels = [a["attempt"] for a in ladder.attempts]
    assert labels[0] == "latency model" and labels[-3:] == ["round to 32", "fewer pruned groups", "nothing pruned"]
    assert [a["accepted"] for a in ladder.attempts] == [False] * (len(labels) - 1) + [True]


def test_model_without_dead_channels_is_accepted_unchanged():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    y = g.conv(x, 3, 8, k=3)
    g.output(g.conv(g.relu(y), 8, 4, k=1))
    model = g.build()
    result = prune_model(model, target="ort-cpu")
    assert result.report.latency["attempts"] == [
        {"attempt": "latency model", "removed_channels": 0, "accepted": True, "why": "no channel removed: the model is unchanged"}
    ]


def test_unknown_target_is_refused():
    from onnxprune.errors import InputError

    with pytest.raises(InputError, match="unknown target"):
        make_target("tpu")


def test_cli_prune_reports_measured_latency_and_calibrate_fills_cache(tmp_path, capsys, dead_mobilenet):
    src = tmp_path / "m.onnx"
    onnx.save(dead_mobilenet, src)
    assert main(["calibrate", str(src), "--threads", "2"]) == 0
    assert "cache:" in capsys.readouterr().out
    report = tmp_path / "r.json"
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--threads", "2", "--report", str(report), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "target ort-cpu (2 threads, batch 1):" in out and "measured side by side" in out
    data = json.loads(report.read_text())
    assert data["latency"]["layers_measured"] == 0  # everything came from the calibrated cache
    assert {"input", "output", "max_pruned"} <= set(data["latency"]["predicted_ms"])


def test_library_call_leaves_the_users_runtime_settings_alone(dead_mobilenet):
    """After a latency-aware prune, a plain session of the user's still works (no process-wide pool)."""
    import onnxruntime

    prune_model(dead_mobilenet, target="ort-cpu", threads=2)
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(dead_mobilenet.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)


def test_profiles_of_sessions_timed_at_once_go_to_private_folders(tmp_path, monkeypatch, dead_mobilenet):
    """ORT names a profile by the millisecond: two processes timing in one folder once removed each other's."""
    monkeypatch.chdir(tmp_path)
    first, second = TARGET.session_options(profile=True), TARGET.session_options(profile=True)
    assert os.path.dirname(first.profile_file_prefix) != os.path.dirname(second.profile_file_prefix)
    assert not os.path.dirname(first.profile_file_prefix).startswith(str(tmp_path))
    for options in (first, second):  # no session made: their folders stay empty
        os.rmdir(os.path.dirname(options.profile_file_prefix))
    specs = layer_specs(inspect_model(dead_mobilenet)[0].graph)[:2]
    assert measure([(s, s.in_width, s.out_width) for s in specs], TARGET, LatencyCache(TARGET, tmp_path / "c.json")) > 0
    assert list(tmp_path.iterdir()) == []  # nothing written to the working folder, no profile left behind
