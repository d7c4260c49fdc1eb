"""One analysis of a model, any number of prune plans turned into models."""

from __future__ import annotations

import time
from collections.abc import Sequence

from onnxprune.channels.analysis import analyze
from onnxprune.channels.plan import PrunePlan
from onnxprune.channels.rewrite import apply_plan
from onnxprune.cost import model_cost
from onnxprune.graphio import to_graph, to_model
from onnxprune.modelio import LoadedModel
from onnxprune.pass_infra import GraphPass, PassManager
from onnxprune.progress import PhaseCallback, phase, report
from onnxprune.report import RunReport, RunResult, removed_metadata


class Pruner:
    """One analysis of a model; any number of prune plans turned into models.

    Each plan is applied to its own copy of the prepared graph (copies share the
    weight arrays; rewrites replace arrays, never change them), so candidates
    cost a rewrite and an export each, not a reload and a re-analysis.
    """

    def __init__(self, loaded: LoadedModel, *, on_phase: PhaseCallback | None = None, assume_finite: bool = False) -> None:
        """``assume_finite``: see :func:`onnxprune.channels.analysis.analyze`."""
        from passes import PROVIDERS, preparation

        self.loaded = loaded
        self.assume_finite = assume_finite
        self.graph = to_graph(loaded)
        manager = PassManager(preparation(), PROVIDERS, on_start=lambda p: report(on_phase, f"pass {p.name}", 0, 1),
                              on_pass=lambda r: report(on_phase, f"pass {r.name}", 1, 1))
        self.prepared = manager.run(self.graph)
        self.graph.toposort()
        self.before = model_cost(self.graph)
        with phase(on_phase, "analysis"):
            self.analysis = analyze(self.graph, assume_finite=assume_finite)

    def build(self, plan: PrunePlan, lowering: Sequence[GraphPass] = ()) -> RunResult:
        """The model ``plan`` makes of the prepared graph, with its report; ``lowering``: passes run after the
        pruning ones (their records in the report)."""
        from passes import PROVIDERS, finishing

        start = time.perf_counter()
        graph = self.graph.copy()
        if plan.changes_graph:
            apply_plan(graph, plan)
            PassManager(finishing(), PROVIDERS).run(graph)
        lowered = PassManager(lowering, PROVIDERS).run(graph) if lowering else []
        after = model_cost(graph)
        model = to_model(graph, self.loaded, removed_metadata(plan))
        report = RunReport.of(
            self.loaded,
            before=self.before,
            after=after,
            passes=list(self.prepared) + lowered,
            timings={"analysis+rewrite": time.perf_counter() - start},
            plan=plan,
        )
        return RunResult(model, report)
