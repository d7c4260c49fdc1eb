"""What a run did: the report (passes, costs, timings, verification), the result, and per-group rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune import __version__
from onnxprune.channels.plan import PrunePlan
from onnxprune.cost import CostSummary
from onnxprune.modelio import LoadedModel
from onnxprune.pass_infra import PassRecord
from onnxprune.verify import VerifyResult


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

    @classmethod
    def of(cls, loaded: LoadedModel, *, before: CostSummary, after: CostSummary, **fields) -> RunReport:
        """A report on ``loaded``: its path as the input, a note if its IR version was lowered."""
        fields.setdefault("output", None)
        report = cls(input=str(loaded.path) if loaded.path else None, before=before, after=after, **fields)
        if loaded.ir_lowered_from is not None:
            report.notes.append(f"IR version lowered from {loaded.ir_lowered_from} to {loaded.model.ir_version} for onnxruntime")
        return report

    def to_dict(self) -> dict:
        """The report as JSON-ready data (what ``--report`` writes)."""
        out = {
            "onnxprune_version": __version__,
            "input": self.input,
            "output": self.output,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "passes": [_pass_dict(r) for r in self.passes],
            "timings_s": self.timings,
            "notes": self.notes,
        }
        if self.latency is not None:
            out["latency"] = self.latency
        if self.verification is not None:
            out["verification"] = self.verification.to_dict()
        if self.plan is not None:
            out["groups"] = group_report(self.plan)
            out["barriers"] = self.plan.analysis.barriers
        return out


def _pass_dict(record: PassRecord) -> dict:
    return {
        "name": record.name,
        "modified": record.result.modified,
        "summary": record.result.summary,
        "seconds": record.seconds,
        "auto": record.auto,
    }


@dataclass
class RunResult:
    """The rewritten model and the report on how it was made."""

    model: onnx.ModelProto
    report: RunReport


def group_report(plan: PrunePlan) -> list[dict]:
    """Per channel group: size, live, dead, removed, and why dead channels were kept."""
    rows = []
    for decision in plan.groups:
        group = decision.group
        first = plan.keep_mask(group.tensors[0]) if group.tensors else np.ones(0, dtype=bool)
        in_group = np.isin(plan.analysis.components_of(group.tensors[0]), group.components)
        rows.append(
            {
                "group": group.name,
                "tensors": group.tensors,
                "layers": group.producers,
                "channels": decision.channels,
                "live": decision.live,
                "dead": decision.dead,
                "removed": decision.removed,
                "kept": decision.kept,
                "kept_dead": decision.kept_dead,
                "read_only_by_zero_weights": decision.zero_read,
                "removed_index": np.flatnonzero(~first[in_group]).tolist(),
            }
        )
    return rows


def removed_metadata(plan: PrunePlan) -> dict[str, object]:
    """The model metadata that records which channels each group lost (and which onnxprune removed them)."""
    removed = {
        row["group"]: {"tensor": row["tensors"][0], "channels": row["channels"], "removed": row["removed_index"]}
        for row in group_report(plan)
        if row["removed"]
    }
    return {"onnxprune.version": __version__, "onnxprune.removed": removed}
