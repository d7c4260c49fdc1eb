"""Pruning for a target with a measured guarantee: the written model is not slower than the input.

Candidates are pruned afresh from the input and timed side by side with it on
the target (interleaved runs, medians); the fastest one that beats the input
is verified and kept. If none does, the fall-back rungs of
:data:`~onnxprune.latency.planner.ATTEMPTS` are tried; the last prunes nothing.
The report records every attempt.

Models are timed as they run on the target (``Target.prepare``): on an int8
target the quantized input against each quantized candidate. The model
returned and written is the float32 candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from onnxprune.channels.plan import PrunePlan
from onnxprune.checked_write import check_in_memory, input_blamed, runtime_reference, write_checked
from onnxprune.latency.cache import LatencyCache
from onnxprune.latency.planner import ALTERNATIVES, FALL_BACKS, LATENCY_MODEL, LatencyPlanner, Rung
from onnxprune.latency.search import GroupChoice, LatencyChoice
from onnxprune.latency.target import Target
from onnxprune.latency.timing import clear_winner, interleaved
from onnxprune.modelio import LoadedModel, as_loaded, check_output_path
from onnxprune.pass_infra import GraphPass
from onnxprune.progress import PhaseCallback, phase
from onnxprune.pruner import Pruner
from onnxprune.report import RunResult
from onnxprune.runtime import input_specs, random_feed

logger = logging.getLogger(__name__)

CHECK_BUDGET_S = 0.6
CHECK_ROUNDS = 60
CHECK_MIN_ROUNDS = 8

# Timed beside a candidate whose layers skip zero inputs through a Gather (read drops): the
# same widths with every input read. The Gather's copy can cost more than the columns it saves.
READS_ALL = "{}, every input read"
UNCHANGED = "no channel removed: the model is unchanged"


@dataclasses.dataclass(frozen=True)
class Lowering:
    """A pass that computes the same function in other ops: each first-rung candidate it changes is also timed in
    the form it gives."""

    make: Callable[[], GraphPass]
    label: str  # the candidate's label in "{}"
    needs_finite: bool = False  # exact only where the input model's activations are finite (tried with assume_finite)
    # Plans whose rewrite adds what the lowering changes (tried on them even where the input has nothing it changes)
    also_on: Callable[[PrunePlan], bool] | None = None


def lowerings(target: Target | None = None) -> tuple[Lowering, ...]:
    """The lowerings tried on each candidate on ``target`` (passes are imported here: they import the library).
    On an int8 target the phase convs get the output channels ORT's int8 conv runs without im2col."""
    from passes.gather_rows import GatherRowsPass
    from passes.pool_phases import PoolPhasesPass

    int8 = target is not None and target.precision == "int8"
    return (Lowering(lambda: PoolPhasesPass(int8_kernels=int8), "{}, conv+pool in phases", needs_finite=True),
            Lowering(lambda: PoolPhasesPass(first_only=True, int8_kernels=int8), "{}, first conv+pool in phases",
                     needs_finite=True),
            Lowering(GatherRowsPass, "{}, kept inputs gathered as rows", also_on=lambda plan: bool(plan.read_drops)))


def time_side_by_side(
    target: Target,
    reference: onnx.ModelProto | str | os.PathLike[str],
    candidates: dict[str, onnx.ModelProto],
    *,
    budget_s: float = CHECK_BUDGET_S,
) -> dict[str, float]:
    """Median latency (ms) of the input ("input") and each candidate on ``target``, interleaved, each as it runs
    there (``target.prepare``: quantized on an int8 target; a model already prepared is timed as given)."""
    reference = target.prepare(reference)
    ref = target.session(reference.SerializeToString() if isinstance(reference, onnx.ModelProto) else os.fspath(reference))
    sessions = {"input": ref, **{k: target.session(target.prepare(m).SerializeToString()) for k, m in candidates.items()}}
    feed = random_feed(input_specs(ref, symbolic_dim=target.batch), np.random.default_rng(0))
    runners = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    timings = interleaved(runners, repeats=CHECK_ROUNDS, warmup=2, budget_s=budget_s, min_repeats=CHECK_MIN_ROUNDS,
                          until=clear_winner)
    return {k: t.median_ms for k, t in timings.items()}


@dataclasses.dataclass
class Candidate:
    """A pruned model to time against the input, and the rung that planned its widths."""

    rung: Rung
    result: RunResult
    reads_all: bool = False  # the rung's widths with every input read (no Gathers)
    lowering: Lowering | None = None  # the candidate computed in the form this lowering gives

    @property
    def label(self) -> str:
        """What the report and the command line call it."""
        label = READS_ALL.format(self.rung.label) if self.reads_all else self.rung.label
        return self.lowering.label.format(label) if self.lowering else label

    @property
    def changes(self) -> bool:
        """True when the candidate differs from the input."""
        plan = self.result.report.plan
        return self.lowering is not None or bool(plan and plan.changes_graph)

    @property
    def removed(self) -> int:
        """Channels the candidate deleted."""
        plan = self.result.report.plan
        return plan.removed_channels if plan else 0


@dataclasses.dataclass
class Ladder:
    """One analysis of the input and the measurements that decide between its candidates."""

    pruner: Pruner
    target: Target
    cache: LatencyCache
    reference: onnx.ModelProto | Path
    attempts: list[dict] = dataclasses.field(default_factory=list)
    timed_reference: onnx.ModelProto | Path | None = None  # the input as it runs on the target, prepared once

    def build(self, rung: Rung) -> Candidate:
        """The candidate ``rung`` plans (a fresh planner: its latency choice is not the report's)."""
        plan = LatencyPlanner(self.target, self.cache, rung)(self.pruner.analysis)
        return Candidate(rung, self.pruner.build(plan))

    def time(self, candidates: list[Candidate]) -> dict[str, float]:
        """Median milliseconds of the input ("input") and of each candidate (by label), timed side by side as
        they run on the target."""
        if self.timed_reference is None:
            self.timed_reference = self.target.prepare(self.reference)
        return time_side_by_side(self.target, self.timed_reference, {c.label: c.result.model for c in candidates})

    def record_unchanged(self, candidate: Candidate) -> Candidate:
        """Record ``candidate`` as accepted without timing: it is the input's own graph."""
        self.attempts.append({"attempt": candidate.label, "removed_channels": 0, "accepted": True, "why": UNCHANGED})
        return candidate

    def record_timed(self, candidate: Candidate, ms: dict[str, float], *, accepted: bool) -> None:
        """Record ``candidate``'s measured time beside the input's."""
        record = {"attempt": candidate.label, "removed_channels": candidate.removed, "input_ms": ms["input"],
                  "output_ms": ms[candidate.label], "accepted": accepted}
        if candidate.lowering is not None:
            record["lowering"] = lowering_record(candidate)
        self.attempts.append(record)


def lowering_record(candidate: Candidate) -> dict:
    """What the candidate's lowering pass rewrote, and why it left each other site (for the JSON report)."""
    last = candidate.result.report.passes[-1]
    details = last.result.details
    return {"pass": last.name, "rewritten": list(details.get("rewritten", [])),
            "left": dict(details.get("refused", details.get("skipped", {})))}


def _changes_input(lowering: Lowering, ladder: Ladder) -> bool | None:
    """Whether ``lowering`` changes the prepared input; None if it may not run (it needs finite activations and
    ``assume_finite`` is off)."""
    if lowering.needs_finite and not ladder.pruner.assume_finite:
        return None
    return lowering.make()(ladder.pruner.graph.copy()).modified


def lowered(ladder: Ladder, candidates: list[Candidate]) -> list[Candidate]:
    """Each candidate in the form each lowering gives, where it changes the candidate (an unpruned candidate too:
    the input may be pruned already)."""
    out, seen = [], set()
    for lowering in lowerings(ladder.target):
        on_input = _changes_input(lowering, ladder)
        if on_input is None or (not on_input and lowering.also_on is None):
            continue
        for index, candidate in enumerate(candidates):
            plan = candidate.result.report.plan
            if not on_input and not lowering.also_on(plan):
                continue
            result = ladder.pruner.build(plan, [lowering.make()])
            record = result.report.passes[-1]  # the lowering's own (after any pass it required)
            same_form = (index, record.name, tuple(record.result.details.get("rewritten", ())))
            if record.result.modified and same_form not in seen:  # two lowerings rewriting the same nodes: one
                seen.add(same_form)
                out.append(dataclasses.replace(candidate, result=result, lowering=lowering))
    return out


def first_rung_candidates(ladder: Ladder, planner: LatencyPlanner) -> list[Candidate]:
    """The latency model's choice, the alternatives that differ from it, each with every input read, and each in
    the forms the lowerings give."""
    candidates = [Candidate(LATENCY_MODEL, ladder.pruner.build(planner(ladder.pruner.analysis)))]
    for rung in ALTERNATIVES:
        alternative = ladder.build(rung)
        if not any(np.array_equal(alternative.result.report.plan.remove, c.result.report.plan.remove) for c in candidates):
            candidates.append(alternative)
    for candidate in list(candidates):
        plan = candidate.result.report.plan
        if plan.read_drops and plan.remove.any():
            reads_all = ladder.pruner.build(dataclasses.replace(plan, read_drops={}))
            candidates.append(Candidate(candidate.rung, reads_all, reads_all=True))
    return candidates + lowered(ladder, candidates)


def pick_first_rung(ladder: Ladder, candidates: list[Candidate]) -> Candidate | None:
    """The fastest candidate if it beats the input (the latency model's if nothing is pruned), else None."""
    pruning = [c for c in candidates if c.changes]
    if not pruning:
        return ladder.record_unchanged(candidates[0])
    ms = ladder.time(pruning)
    best = min(pruning, key=lambda c: ms[c.label])
    faster = ms[best.label] < ms["input"]
    for candidate in pruning:
        ladder.record_timed(candidate, ms, accepted=candidate is best and faster)
    return best if faster else None


def fall_back(ladder: Ladder) -> Candidate:
    """Try the fall-back rungs in order; the first not slower than the input (or the last) wins."""
    for rung in FALL_BACKS:
        candidate = ladder.build(rung)
        if not candidate.changes:
            return ladder.record_unchanged(candidate)
        ms = ladder.time([candidate])
        accepted = ms[candidate.label] < ms["input"] or rung is FALL_BACKS[-1]
        ladder.record_timed(candidate, ms, accepted=accepted)
        if accepted:
            return candidate
    raise AssertionError("the last fall-back rung is always accepted")


def _product_dict(row: dict) -> dict:
    """A product of activations in the report: its operands' shapes and measured milliseconds per choice."""
    out = {"node": row["node"], "op": row["op"]}
    for label in ("max_pruned", "chosen", "unpruned"):
        at = row[label]
        out[label] = {"a": at["a"], "b": at["b"], "ms": None if at["us"] is None else at["us"] / 1000.0}
    return out


def _group_choice_dict(group: GroupChoice) -> dict:
    """One group's decision in the report; a group of attention heads counts heads and lists its products."""
    out = {
        "group": group.name,
        "channels": group.total,
        "kept_by_max_pruning": group.live_or_kept,
        "chosen": group.chosen,
        "kept_for_speed": group.kept_for_speed,
        "predicted_ms": {k: v / 1000.0 for k, v in group.predicted_us.items()},
    }
    if group.heads:
        out["unit"] = "heads"
    if group.products:
        out["attention_products"] = [_product_dict(row) for row in group.products]
    return out


def latency_report(ladder: Ladder, choice: LatencyChoice | None, *, search_s: float, check_s: float) -> dict:
    """The report's ``latency`` section: every attempt, the accepted one, and the latency model's prediction."""
    accepted = next(a for a in ladder.attempts if a["accepted"])
    target = ladder.target
    latency = {
        "target": target.name,
        "threads": target.threads,
        "batch": target.batch,
        **target.precision_info(),
        "cache": str(ladder.cache.path),
        "attempts": ladder.attempts,
        "accepted": accepted["attempt"],
        "measured_ms": {"input": accepted.get("input_ms"), "output": accepted.get("output_ms")},
        "search_s": search_s,
        "check_s": check_s,
    }
    if choice is not None:
        latency.update(choice.to_dict())
        latency["groups"] = [_group_choice_dict(c) for c in choice.groups]
    return latency


def choose_candidate(
    loaded: LoadedModel,
    target: Target,
    cache: LatencyCache,
    reference: onnx.ModelProto | Path,
    measure_progress: Callable[[int, int], None] | None = None,
    on_phase: PhaseCallback | None = None,
    assume_finite: bool = False,
) -> tuple[Candidate, dict]:
    """The candidate to keep, and the report's ``latency`` section on how it was chosen.

    The analysis and the other candidates are freed on return, before the winner is verified.
    """
    with input_blamed(loaded):
        start = time.perf_counter()
        ladder = Ladder(Pruner(loaded, on_phase=on_phase, assume_finite=assume_finite), target, cache, reference)
        planner = LatencyPlanner(target, cache, LATENCY_MODEL, progress=measure_progress)
        candidates = first_rung_candidates(ladder, planner)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        with phase(on_phase, "timing candidates"):
            winner = pick_first_rung(ladder, candidates) or fall_back(ladder)
        check_s = time.perf_counter() - start
    logger.debug("on %s kept '%s' after %d attempt(s)", target.name, winner.label, len(ladder.attempts))
    winner.result.report.plan.release_graph()
    return winner, latency_report(ladder, planner.choice, search_s=search_s, check_s=check_s)


def prune_for_target(
    model_or_path: onnx.ModelProto | str | os.PathLike[str] | LoadedModel,
    target: Target,
    *,
    output: str | os.PathLike[str] | None = None,
    verify: bool | str = True,
    external_data: bool | None = None,
    cache: LatencyCache | None = None,
    measure_progress: Callable[[int, int], None] | None = None,
    on_phase: PhaseCallback | None = None,
    assume_finite: bool = False,
) -> RunResult:
    """Prune, choosing widths for ``target``; never return a model measured slower than the input.

    The latency model's choice is timed side by side with the input, together
    with the alternatives (every dead channel deleted; widths rounded to 16;
    a candidate's widths with every input read instead of Gathers; each candidate
    in the form each of :func:`lowerings` gives, e.g. Conv -> MaxPool in phases,
    which needs ``assume_finite``); the fastest wins. If none is faster than the input, the remaining rungs of
    :data:`~onnxprune.latency.planner.ATTEMPTS` are tried.
    ``measure_progress(done, total)`` is called while layer latencies are
    measured (cold cache); ``on_phase`` with each phase's progress (:mod:`onnxprune.progress`).
    ``assume_finite``: see :func:`onnxprune.api.prune`.
    """
    with phase(on_phase, "load"):
        loaded = as_loaded(model_or_path)
        if output is not None:
            check_output_path(output, loaded)
    reference = runtime_reference(loaded)
    winner, latency = choose_candidate(loaded, target, cache or LatencyCache(target), reference, measure_progress,
                                       on_phase, assume_finite)
    report = winner.result.report
    check_in_memory(winner.result.model, reference, report, verify=verify, weight_bytes=loaded.size_bytes,
                    on_phase=on_phase)
    report.latency = latency
    if winner.rung in FALL_BACKS:
        report.notes.append(f"on {target.name} no first-rung candidate was faster than the input; used '{winner.label}'")
    if output is not None:
        use_external = loaded.uses_external_data if external_data is None else external_data
        write_checked(winner.result.model, output, reference, report, verify=False, external_data=bool(use_external),
                      on_phase=on_phase)
    return winner.result
