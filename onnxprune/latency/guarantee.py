"""Pruning for a target with a measured guarantee: the written model is not slower than the input.

Candidates are pruned afresh from the input and timed side by side with it on
the target (interleaved runs, medians); the fastest one that beats the input
is verified and kept. If none does, the fall-back rungs of
:data:`~onnxprune.latency.planner.ATTEMPTS` are tried; the last prunes nothing.
The report records every attempt.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import onnx

from onnxprune.api import Pruner, RunResult, _check_output_model, _reference, write_checked
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.planner import ALTERNATIVES, ATTEMPTS, LatencyPlanner
from onnxprune.latency.target import Target
from onnxprune.latency.timing import clear_winner, interleaved
from onnxprune.modelio import LoadedModel, as_loaded, check_output_path, needs_external_data
from onnxprune.runtime import input_specs, random_feed
from onnxprune.verify import verify_same_function

CHECK_BUDGET_S = 0.6
CHECK_ROUNDS = 60
CHECK_MIN_ROUNDS = 8


def time_side_by_side(target: Target, reference, candidates: dict[str, onnx.ModelProto], *, budget_s: float = CHECK_BUDGET_S) -> dict[str, float]:
    """Median latency (ms) of the input ("input") and each candidate on ``target``, interleaved."""
    ref = target.session(reference.SerializeToString() if isinstance(reference, onnx.ModelProto) else os.fspath(reference))
    sessions = {"input": ref, **{k: target.session(m.SerializeToString()) for k, m in candidates.items()}}
    feed = random_feed(input_specs(ref, symbolic_dim=target.batch), np.random.default_rng(0))
    runners = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    timings = interleaved(runners, repeats=CHECK_ROUNDS, warmup=2, budget_s=budget_s, min_repeats=CHECK_MIN_ROUNDS,
                          until=clear_winner)
    return {k: t.median_ms for k, t in timings.items()}


def _removed(result: RunResult) -> int:
    return result.report.plan.removed_channels if result.report.plan else 0


def _changes(result: RunResult) -> bool:
    return bool(result.report.plan and result.report.plan.changes_graph)


# Timed beside a candidate whose layers skip zero inputs through a Gather (read drops): the
# same widths with every input read. The Gather's copy can cost more than the columns it saves.
READS_ALL = "{}, every input read"


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

    The latency model's choice is timed side by side with the input, together
    with the alternatives (every dead channel deleted; widths rounded to 16;
    a candidate's widths with every input read instead of Gathers); the fastest
    wins. If none is faster than the input, the remaining rungs of
    :data:`ATTEMPTS` are tried.
    ``measure_progress(done, total)`` is called while layer latencies are
    measured (cold cache).
    """
    loaded: LoadedModel = as_loaded(model_or_path)
    if output is not None:
        check_output_path(output, loaded)
    cache = cache or LatencyCache(target)
    reference = _reference(loaded)
    t = time.perf_counter()
    pruner = Pruner(loaded)
    planner = LatencyPlanner(target, cache, ATTEMPTS[0], progress=measure_progress)
    first = pruner.build(planner(pruner.analysis))
    choice = planner.choice
    candidates = {ATTEMPTS[0]: first}
    for alt in ALTERNATIVES if choice is not None else ():
        plan = LatencyPlanner(target, cache, alt)(pruner.analysis)
        if not any(np.array_equal(plan.remove, c.report.plan.remove) for c in candidates.values()):
            candidates[alt] = pruner.build(plan)
    for name, r in list(candidates.items()):
        if r.report.plan.read_drops and r.report.plan.remove.any():
            candidates[READS_ALL.format(name)] = pruner.build(dataclasses.replace(r.report.plan, read_drops={}))
    search_s = time.perf_counter() - t
    attempts: list[dict] = []
    t = time.perf_counter()
    winner = None
    pruning = {k: r for k, r in candidates.items() if _changes(r)}
    if not pruning:
        attempts.append({"attempt": ATTEMPTS[0], "removed_channels": 0, "accepted": True,
                         "why": "no channel removed: the model is unchanged"})
        winner = first
    else:
        ms = time_side_by_side(target, reference, {k: r.model for k, r in pruning.items()})
        best = min(pruning, key=ms.get)
        for k, r in pruning.items():
            attempts.append({"attempt": k, "removed_channels": _removed(r), "input_ms": ms["input"], "output_ms": ms[k],
                             "accepted": k == best and ms[k] < ms["input"]})
        if ms[best] < ms["input"]:
            winner = pruning[best]
        for i, attempt in enumerate(ATTEMPTS[1:], start=1):
            if winner is not None:
                break
            result = pruner.build(LatencyPlanner(target, cache, attempt)(pruner.analysis))
            last = i == len(ATTEMPTS) - 1
            if not _changes(result):
                attempts.append({"attempt": attempt, "removed_channels": 0, "accepted": True,
                                 "why": "no channel removed: the model is unchanged"})
                winner = result
                break
            ms = time_side_by_side(target, reference, {attempt: result.model})
            faster = ms[attempt] < ms["input"]
            attempts.append({"attempt": attempt, "removed_channels": _removed(result), "input_ms": ms["input"],
                             "output_ms": ms[attempt], "accepted": faster or last})
            if faster or last:
                winner = result
    check_s = time.perf_counter() - t
    report = winner.report
    winner.report.plan.release_graph()
    del pruner
    if not needs_external_data(winner.model):
        _check_output_model(winner.model, None, reference)
    if verify:
        t = time.perf_counter()
        report.verification = verify_same_function(reference, winner.model)
        report.timings["verify"] = time.perf_counter() - t
    accepted = next(a for a in attempts if a["accepted"])
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
    if accepted["attempt"] in ATTEMPTS[1:]:
        report.notes.append(f"on {target.name} no first-rung candidate was faster than the input; used '{accepted['attempt']}'")
    if output is not None:
        write_checked(winner.model, output, reference, report, verify=False,
                      external_data=bool(loaded.uses_external_data if external_data is None else external_data))
    return winner
