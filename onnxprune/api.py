"""The Python API: ``prune`` and ``run_passes`` on a model or a path.

The report and result types, the checked write and :class:`Pruner` live in
their own modules (shared with the latency guarantee) and are re-exported here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import onnx
import onnx_graphsurgeon as gs

from onnxprune.channels.analysis import ChannelAnalysis
from onnxprune.channels.plan import PrunePlan, WidthPolicy, make_plan, round_to
from onnxprune.checked_write import check_in_memory, check_output_model, input_blamed, runtime_reference, write_checked
from onnxprune.cost import CostSummary, model_cost
from onnxprune.errors import OnnxPruneError
from onnxprune.graphio import to_graph, to_model
from onnxprune.graphutil import read_initializers
from onnxprune.latency.guarantee import prune_for_target
from onnxprune.latency.target import make_target
from onnxprune.modelio import LoadedModel, as_loaded, check_output_path
from onnxprune.pass_infra import GraphPass, PassManager, PassRecord
from onnxprune.progress import PhaseCallback, phase, report
from onnxprune.pruner import Pruner
from onnxprune.report import RunReport, RunResult, group_report, removed_metadata

__all__ = [
    "Pruner",
    "RunReport",
    "RunResult",
    "check_output_model",
    "group_report",
    "inspect_model",
    "prune",
    "prune_model",
    "removed_metadata",
    "run_passes",
    "runtime_reference",
    "write_checked",
]

ModelInput = onnx.ModelProto | str | os.PathLike[str]


def run_passes(
    model_or_path: ModelInput | LoadedModel,
    passes: list[GraphPass],
    *,
    output: str | os.PathLike[str] | None = None,
    verify: bool | str = True,
    metadata: dict[str, object] | None = None,
    external_data: bool | None = None,
    progress: Callable[[PassRecord], None] | None = None,
    on_phase: PhaseCallback | None = None,
) -> RunResult:
    """Run ``passes`` on a model; check, verify on ONNX Runtime and (optionally) write it atomically.

    Nothing is written if the result fails the ONNX checker or differs from the
    input on ONNX Runtime (unless ``verify`` is False). ``verify``: True ("auto":
    the whole model, or block by block for a large one), "whole", "blocks" or
    False. ``progress`` gets each pass's record; ``on_phase`` each phase's
    progress (:mod:`onnxprune.progress`).
    """
    start = time.perf_counter()
    owned = not isinstance(model_or_path, LoadedModel)
    with phase(on_phase, "load"):
        loaded = as_loaded(model_or_path)
        if output is not None:
            check_output_path(output, loaded)
        with input_blamed(loaded):
            graph = to_graph(loaded)  # external data memory-mapped, not read
            read_initializers(graph)  # weights held in the protobuf copied out of it: part of loading
    timings = {"load": time.perf_counter() - start}
    with input_blamed(loaded):
        result = _rewrite(graph, loaded, passes, metadata=metadata, progress=progress, timings=timings, on_phase=on_phase)
    reference, size = runtime_reference(loaded), loaded.size_bytes
    use_external = loaded.uses_external_data if external_data is None else external_data
    if result.report.plan is not None:
        result.report.plan.release_graph()
    del graph
    if owned:
        del loaded  # free the parsed copy before the runtime loads anything
    checks = {"verify": verify, "weight_bytes": size, "on_phase": on_phase}
    if output is None:
        check_in_memory(result.model, reference, result.report, **checks)
    else:
        write_checked(result.model, output, reference, result.report, external_data=use_external, **checks)
    return result


def _pass_hooks(progress: Callable[[PassRecord], None] | None, on_phase: PhaseCallback | None) -> dict:
    """PassManager's callbacks: each pass a phase of its own ("pass NAME"), and ``progress`` with each record."""
    def started(p: GraphPass) -> None:
        report(on_phase, f"pass {p.name}", 0, 1)

    def finished(record: PassRecord) -> None:
        report(on_phase, f"pass {record.name}", 1, 1)
        if progress is not None:
            progress(record)

    return {"on_start": started, "on_pass": finished}


def _rewrite(
    graph: gs.Graph,
    loaded: LoadedModel,
    passes: list[GraphPass],
    *,
    metadata: dict[str, object] | None,
    progress: Callable[[PassRecord], None] | None,
    timings: dict[str, float],
    on_phase: PhaseCallback | None = None,
) -> RunResult:
    """Shape inference, then ``passes`` on ``graph``; the exported model and its report."""
    from passes import PROVIDERS
    from passes.structure import InferShapesPass

    start = time.perf_counter()
    manager = PassManager([], PROVIDERS, **_pass_hooks(progress, on_phase))
    holds: set[str] = set()
    records = manager.run(graph, [InferShapesPass()], holds=holds)
    before = model_cost(graph)
    records += manager.run(graph, passes, holds=holds)
    plan = next((r.result.details["plan"] for r in reversed(records) if "plan" in r.result.details), None)
    after = model_cost(graph)
    meta = dict(metadata or {})
    if plan is not None:
        meta.update(removed_metadata(plan))
    model = to_model(graph, loaded, meta, defer_data=loaded.uses_external_data, hand_over=True)  # streamed when written
    timings["analysis+rewrite"] = time.perf_counter() - start
    report = RunReport.of(loaded, before=before, after=after, passes=records, timings=timings, plan=plan)
    return RunResult(model, report)


def prune_model(
    model_or_path: ModelInput,
    *,
    output: str | os.PathLike[str] | None = None,
    target: str = "ort-cpu",
    threads: int | None = None,
    batch: int = 1,
    round_to_n: int | None = None,
    width_policy: WidthPolicy | None = None,
    verify: bool | str = True,
    external_data: bool | None = None,
    progress: Callable[[PassRecord], None] | None = None,
    measure_progress: Callable[[int, int], None] | None = None,
    on_phase: PhaseCallback | None = None,
    assume_finite: bool = False,
) -> RunResult:
    """Delete provably dead channels; see :func:`prune` (this variant also returns the report).

    ``progress`` is called with each pass record; ``measure_progress(done, total)``
    while layer latencies are measured for the target (cold cache only);
    ``on_phase`` with each phase's progress (:mod:`onnxprune.progress`).
    """
    from passes import finishing, preparation
    from passes.prune_channels import PruneChannelsPass

    if round_to_n is not None and round_to_n < 1:
        raise OnnxPruneError("--round-to must be a positive integer")
    policy = width_policy or (round_to(round_to_n) if round_to_n and round_to_n > 1 else None)
    runtime_target = make_target(target, threads=threads, batch=batch)
    if policy is not None or runtime_target is None:  # --round-to is the manual override of --target
        return run_passes(
            model_or_path, [*preparation(), PruneChannelsPass(policy, assume_finite=assume_finite), *finishing()],
            output=output, verify=verify, external_data=external_data, progress=progress, on_phase=on_phase,
        )
    return prune_for_target(
        model_or_path, runtime_target, output=output, verify=verify, external_data=external_data,
        measure_progress=measure_progress, on_phase=on_phase, assume_finite=assume_finite,
    )


def prune(
    model_or_path: ModelInput,
    *,
    output: str | os.PathLike[str] | None = None,
    target: str = "ort-cpu",
    round_to: int | None = None,
    verify: bool | str = True,
    assume_finite: bool = False,
) -> onnx.ModelProto:
    """Return a smaller model computing the same function: provably dead channels deleted.

    ``target`` ("ort-cpu", "ort-cuda" or "none") keeps dead channels where the
    width that results runs faster there, and guarantees by measurement that the
    result is not slower than the input; "none" deletes every dead channel.
    ``round_to`` instead keeps just enough dead channels that every pruned width
    is a multiple of it. With ``verify`` (default) the result is run on ONNX
    Runtime against the input and a mismatch raises VerificationError: the
    whole model, or block by block for a large one ("whole" or "blocks" to
    choose; :mod:`onnxprune.verify_blocks`). With
    ``output`` the result is also written there atomically.

    ``assume_finite`` also deletes channels whose only readers multiply them by all-zero weights (a zero
    ``down_proj`` column, a head with zero ``o_proj`` rows), and with a runtime ``target`` also times each
    candidate with Conv [-> Relu] -> MaxPool computed in phases (the ``pool-phases`` pass). Both are exact on
    every input on which the input model's activations are finite; where one is inf or NaN, the deleted channel
    made the input model's output NaN there (``0 * inf``), and a phase kernel's zero tap can make NaN of an
    output the input model computes as inf.
    """
    return prune_model(model_or_path, output=output, target=target, round_to_n=round_to, verify=verify,
                       assume_finite=assume_finite).model


def inspect_model(
    model_or_path: ModelInput, *, assume_finite: bool = False
) -> tuple[ChannelAnalysis, PrunePlan, CostSummary, LoadedModel]:
    """Analyse a model without changing it: channel groups, dead channels, barriers, cost."""
    loaded = as_loaded(model_or_path)
    with input_blamed(loaded):
        pruner = Pruner(loaded, assume_finite=assume_finite)
    return pruner.analysis, make_plan(pruner.analysis), pruner.before, pruner.loaded
