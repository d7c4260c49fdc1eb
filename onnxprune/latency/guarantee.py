"""Pruning for a target with a measured guarantee: the written model is not slower than the input.

Each rung of :data:`~onnxprune.latency.planner.ATTEMPTS` prunes the input
afresh, verifies the result, and times input and result side by side on the
target (interleaved runs, medians). The first result that is faster is kept;
if none is, the last rung prunes nothing. The report records every attempt.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnx

from onnxprune.api import RunResult, _reference, run_passes, write_checked
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.planner import ATTEMPTS, LatencyPlanner
from onnxprune.latency.target import Target
from onnxprune.latency.timing import interleaved
from onnxprune.modelio import LoadedModel, as_loaded, check_output_path
from onnxprune.runtime import input_specs, random_feed

CHECK_BUDGET_S = 0.6
CHECK_ROUNDS = 40


def compare_latency(target: Target, reference, candidate, *, budget_s: float = CHECK_BUDGET_S) -> dict:
    """Median latency of two models on ``target``, timed side by side (milliseconds)."""
    ref = target.session(os.fspath(reference) if not isinstance(reference, onnx.ModelProto) else reference.SerializeToString())
    cand = target.session(candidate.SerializeToString() if isinstance(candidate, onnx.ModelProto) else os.fspath(candidate))
    feed = random_feed(input_specs(ref, symbolic_dim=target.batch), np.random.default_rng(0))
    timings = interleaved(
        {"input": lambda: ref.run(None, feed), "output": lambda: cand.run(None, feed)},
        repeats=CHECK_ROUNDS,
        warmup=2,
        budget_s=budget_s,
    )
    return {"input_ms": timings["input"].median_ms, "output_ms": timings["output"].median_ms, "runs": timings["input"].runs}


def prune_for_target(
    model_or_path,
    target: Target,
    *,
    output=None,
    verify: bool = True,
    external_data: bool | None = None,
    cache: LatencyCache | None = None,
    measure_progress=None,
) -> RunResult:
    """Prune, choosing widths for ``target``; never return a model measured slower than the input.

    ``measure_progress(done, total)`` is called while layer latencies are measured (cold cache).
    """
    from passes.prune_channels import PruneChannelsPass

    loaded: LoadedModel = as_loaded(model_or_path)
    if output is not None:
        check_output_path(output, loaded)
    cache = cache or LatencyCache(target)
    reference = _reference(loaded)
    attempts = []
    result: RunResult | None = None
    choice = None
    search_s = check_s = 0.0
    for i, attempt in enumerate(ATTEMPTS):
        planner = LatencyPlanner(target, cache, attempt, progress=measure_progress)
        t = time.perf_counter()
        result = run_passes(loaded, [PruneChannelsPass(planner=planner)], verify=verify)
        search_s += time.perf_counter() - t - result.report.timings.get("verify", 0.0)
        choice = planner.choice or choice
        removed = result.report.plan.removed_channels if result.report.plan else 0
        entry = {"attempt": attempt, "removed_channels": removed}
        last = i == len(ATTEMPTS) - 1
        if removed == 0:
            entry.update(accepted=True, why="no channel removed: the model is unchanged")
            attempts.append(entry)
            break
        t = time.perf_counter()
        measured = compare_latency(target, reference, result.model)
        check_s += time.perf_counter() - t
        faster = measured["output_ms"] < measured["input_ms"]
        entry.update(measured, accepted=faster or last)
        attempts.append(entry)
        if faster or last:
            break
    report = result.report
    accepted = attempts[-1]
    report.latency = {
        "target": target.name,
        "threads": target.threads,
        "batch": target.batch,
        "cache": str(cache.path),
        "attempts": attempts,
        "accepted": accepted["attempt"],
        "measured_ms": {"input": accepted.get("input_ms"), "output": accepted.get("output_ms")},
        "search_s": search_s,
        "check_s": check_s,
    }
    if choice is not None:
        report.latency.update(choice.to_dict())
        report.latency["groups"] = [
            {
                "group": c.name,
                "channels": c.total,
                "kept_by_max_pruning": c.live_or_kept,
                "chosen": c.chosen,
                "kept_for_speed": c.kept_for_speed,
                "predicted_ms": {k: v / 1000.0 for k, v in c.predicted_us.items()},
            }
            for c in choice.groups
        ]
    if len(attempts) > 1:
        report.notes.append(
            f"on {target.name} the first plan was not faster than the input; used '{accepted['attempt']}' instead"
        )
    if output is not None:
        write_checked(result.model, output, reference, report, verify=False, external_data=bool(loaded.uses_external_data if external_data is None else external_data))
    return result
