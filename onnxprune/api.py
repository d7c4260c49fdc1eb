"""The Python API: ``prune`` and ``run_passes`` on a model or a path."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxprune import __version__
from onnxprune.channels.analysis import ChannelAnalysis, analyze
from onnxprune.channels.plan import PrunePlan, WidthPolicy, make_plan, round_to
from onnxprune.channels.rewrite import apply_plan
from onnxprune.cost import CostSummary, model_cost
from onnxprune.errors import InputError, OnnxPruneError, PassError
from onnxprune.graphio import to_graph, to_model
from onnxprune.modelio import LoadedModel, as_loaded, check_output_path, needs_external_data, staged_write
from onnxprune.pass_infra import GraphPass, PassManager, PassRecord
from onnxprune.verify import VerifyResult, verify_same_function


@dataclass
class RunReport:
    """What a pass pipeline did, how long each stage took, and what it cost before and after."""

    input: str | None
    output: str | None
    before: CostSummary
    after: CostSummary
    passes: list[PassRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    verification: VerifyResult | None = None
    plan: PrunePlan | None = None
    notes: list[str] = field(default_factory=list)
    latency: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "onnxprune_version": __version__,
            "input": self.input,
            "output": self.output,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": [
                {"name": r.name, "modified": r.result.modified, "summary": r.result.summary, "seconds": r.seconds, "auto": r.auto}
                for r in self.passes
            ],
            "timings_s": self.timings,
            "notes": self.notes,
        }
        if self.latency is not None:
            out["latency"] = self.latency
        if self.verification is not None:
            out["verification"] = {
                "trials": self.verification.trials,
                "max_relative_error": self.verification.max_relative_error,
                "tolerance": self.verification.tolerance,
            }
        if self.plan is not None:
            out["groups"] = group_report(self.plan)
            out["barriers"] = self.plan.analysis.barriers
        return out


@dataclass
class RunResult:
    model: onnx.ModelProto
    report: RunReport


def group_report(plan: PrunePlan) -> list[dict]:
    """Per channel group: size, live, dead, removed, and why dead channels were kept."""
    rows = []
    for d in plan.groups:
        g = d.group
        first = plan.keep_mask(g.tensors[0]) if g.tensors else np.ones(0, dtype=bool)
        comps = plan.analysis.components_of(g.tensors[0])
        in_group = np.isin(comps, g.components)
        rows.append(
            {
                "group": g.name,
                "tensors": g.tensors,
                "layers": g.producers,
                "channels": d.channels,
                "live": d.live,
                "dead": d.dead,
                "removed": d.removed,
                "kept": d.kept,
                "kept_dead": d.kept_dead,
                "removed_index": np.flatnonzero(~first[in_group]).tolist(),
            }
        )
    return rows


def _removed_metadata(plan: PrunePlan) -> dict[str, object]:
    removed = {
        row["group"]: {"tensor": row["tensors"][0], "channels": row["channels"], "removed": row["removed_index"]}
        for row in group_report(plan)
        if row["removed"]
    }
    return {"onnxprune.version": __version__, "onnxprune.removed": removed}


def _check_output_model(model: onnx.ModelProto, path: Path | None, source: onnx.ModelProto | Path) -> None:
    """Full ONNX check of the result; if it fails, find out whether the input already did."""
    try:
        if path is not None:
            onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            onnx.checker.check_model(source if isinstance(source, onnx.ModelProto) else str(source), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e_in:
            first_in = str(e_in).strip().splitlines()[0] if str(e_in).strip() else type(e_in).__name__
            raise InputError(f"the input model fails the ONNX checker ({first_in}); nothing was written") from None
        raise PassError(f"internal error: the rewritten model fails the ONNX checker ({first}); nothing was written") from None


def _source(model_or_path) -> LoadedModel:
    return model_or_path if isinstance(model_or_path, LoadedModel) else as_loaded(model_or_path)


def _reference(loaded: LoadedModel) -> onnx.ModelProto | Path:
    """What the runtime compares against: the input file, unless its IR version had to be lowered."""
    return loaded.path if loaded.path is not None and loaded.ir_lowered_from is None else loaded.model


def run_passes(
    model_or_path: onnx.ModelProto | str | os.PathLike[str] | LoadedModel,
    passes: list[GraphPass],
    *,
    output: str | os.PathLike[str] | None = None,
    verify: bool = True,
    metadata: dict[str, object] | None = None,
    external_data: bool | None = None,
    progress=None,
) -> RunResult:
    """Run ``passes`` on a model; check, verify on ONNX Runtime and (optionally) write it atomically.

    Nothing is written if the result fails the ONNX checker or differs from the
    input on ONNX Runtime (unless ``verify`` is False).
    """
    from passes import PROVIDERS
    from passes.structure import InferShapesPass

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    owned = not isinstance(model_or_path, LoadedModel)
    loaded = _source(model_or_path)
    if output is not None:
        check_output_path(output, loaded)
    graph = to_graph(loaded.model)
    timings["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    manager = PassManager([], PROVIDERS, on_pass=progress)
    holds: set[str] = set()
    records = manager.run(graph, [InferShapesPass()], holds=holds)
    before = model_cost(graph)
    records += manager.run(graph, passes, holds=holds)
    plan = next((r.result.details["plan"] for r in reversed(records) if "plan" in r.result.details), None)
    after = model_cost(graph)
    meta = dict(metadata or {})
    if plan is not None:
        meta.update(_removed_metadata(plan))
    result_model = to_model(graph, loaded.model, meta)
    timings["analysis+rewrite"] = time.perf_counter() - t1

    report = RunReport(
        input=str(loaded.path) if loaded.path else None,
        output=str(output) if output is not None else None,
        before=before,
        after=after,
        passes=records,
        timings=timings,
        plan=plan,
    )
    if loaded.ir_lowered_from is not None:
        report.notes.append(f"IR version lowered from {loaded.ir_lowered_from} to {loaded.model.ir_version} for onnxruntime")
    reference = _reference(loaded)
    use_external = loaded.uses_external_data if external_data is None else external_data
    if plan is not None:
        plan.release_graph()
    del graph
    if owned:
        del loaded  # free the parsed copy before the runtime loads anything
    if output is None:
        if not needs_external_data(result_model):
            _check_output_model(result_model, None, reference)
        if verify:
            t2 = time.perf_counter()
            report.verification = verify_same_function(reference, result_model)
            timings["verify"] = time.perf_counter() - t2
        return RunResult(result_model, report)
    write_checked(result_model, output, reference, report, verify=verify, external_data=use_external)
    return RunResult(result_model, report)


def write_checked(
    model: onnx.ModelProto,
    output: str | os.PathLike[str],
    reference: onnx.ModelProto | Path,
    report: RunReport,
    *,
    verify: bool,
    external_data: bool = False,
) -> None:
    """Stage ``model`` beside ``output``, check (and verify) it there, then move it into place."""
    big = needs_external_data(model)
    timings = report.timings
    t3 = time.perf_counter()
    with staged_write(model, output, external_data=external_data or big) as staged:
        timings["save"] = time.perf_counter() - t3
        _check_output_model(model, staged if big else None, reference)
        if verify:
            t2 = time.perf_counter()
            report.verification = verify_same_function(reference, staged)
            timings["verify"] = time.perf_counter() - t2
        t4 = time.perf_counter()
    timings["save"] += time.perf_counter() - t4  # the move into place
    report.output = str(output)


def prune_model(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    target: str = "ort-cpu",
    threads: int | None = None,
    batch: int = 1,
    round_to_n: int | None = None,
    width_policy: WidthPolicy | None = None,
    verify: bool = True,
    external_data: bool | None = None,
    progress=None,
    measure_progress=None,
) -> RunResult:
    """Delete provably dead channels; see :func:`prune` (this variant also returns the report).

    ``progress`` is called with each pass record; ``measure_progress(done, total)``
    while layer latencies are measured for the target (cold cache only).
    """
    from onnxprune.latency.target import make_target
    from passes.prune_channels import PruneChannelsPass

    if round_to_n is not None and round_to_n < 1:
        raise OnnxPruneError("--round-to must be a positive integer")
    policy = width_policy or (round_to(round_to_n) if round_to_n and round_to_n > 1 else None)
    runtime_target = make_target(target, threads=threads, batch=batch)
    if policy is not None or runtime_target is None:  # --round-to is the manual override of --target
        from passes import preparation

        return run_passes(
            model_or_path, [*preparation(), PruneChannelsPass(policy)], output=output, verify=verify,
            external_data=external_data, progress=progress,
        )
    from onnxprune.latency.guarantee import prune_for_target

    return prune_for_target(
        model_or_path, runtime_target, output=output, verify=verify, external_data=external_data, measure_progress=measure_progress
    )


def prune(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    *,
    output: str | os.PathLike[str] | None = None,
    target: str = "ort-cpu",
    round_to: int | None = None,
    verify: bool = True,
) -> onnx.ModelProto:
    """Return a smaller model computing the same function: provably dead channels deleted.

    ``target`` ("ort-cpu", "ort-cuda" or "none") keeps dead channels where the
    width that results runs faster there, and guarantees by measurement that the
    result is not slower than the input; "none" deletes every dead channel.
    ``round_to`` instead keeps just enough dead channels that every pruned width
    is a multiple of it. With ``verify`` (default) the result is run on ONNX
    Runtime against the input and a mismatch raises VerificationError. With
    ``output`` the result is also written there atomically.
    """
    return prune_model(model_or_path, output=output, target=target, round_to_n=round_to, verify=verify).model


class Pruner:
    """One analysis of a model; any number of prune plans turned into models.

    Each plan is applied to its own copy of the prepared graph (copies share the
    weight arrays; rewrites replace arrays, never change them), so candidates
    cost a rewrite and an export each, not a reload and a re-analysis.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        from passes import PROVIDERS, preparation

        self.loaded = loaded
        self.graph = to_graph(loaded.model)
        self.prepared = PassManager(preparation(), PROVIDERS).run(self.graph)
        self.graph.toposort()
        self.before = model_cost(self.graph)
        self.analysis = analyze(self.graph)

    def build(self, plan: PrunePlan) -> RunResult:
        t = time.perf_counter()
        graph = self.graph.copy()
        if plan.changes_graph:
            apply_plan(graph, plan)
        after = model_cost(graph)
        model = to_model(graph, self.loaded.model, _removed_metadata(plan))
        report = RunReport(
            input=str(self.loaded.path) if self.loaded.path else None,
            output=None,
            before=self.before,
            after=after,
            passes=list(self.prepared),
            timings={"analysis+rewrite": time.perf_counter() - t},
            plan=plan,
        )
        if self.loaded.ir_lowered_from is not None:
            report.notes.append(
                f"IR version lowered from {self.loaded.ir_lowered_from} to {self.loaded.model.ir_version} for onnxruntime"
            )
        return RunResult(model, report)


def inspect_model(model_or_path: onnx.ModelProto | str | os.PathLike[str]) -> tuple[ChannelAnalysis, PrunePlan, CostSummary, LoadedModel]:
    """Analyse a model without changing it: channel groups, dead channels, barriers, cost."""
    from passes import PROVIDERS, preparation

    loaded = as_loaded(model_or_path)
    graph = to_graph(loaded.model)
    PassManager(preparation(), PROVIDERS).run(graph)
    graph.toposort()
    analysis = analyze(graph)
    return analysis, make_plan(analysis), model_cost(graph), loaded
