"""The check on data: top-1 agreement of each deployed row with the float32 input, and test error with labels.

Quantization is lossy, so the check is on held-out samples rather than exactness. A row agreeing with
the input (or with its own reference row, e.g. model.ort with model.onnx) on less than the minimum
raises AgreementError: nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from onnxprune.deploy.runtimes import Artifact, Runner
from onnxprune.deploy.sources import Samples
from onnxprune.errors import VerificationError

CHECK_BATCH = 256
INPUT_LABEL = "input"


class AgreementError(VerificationError):
    """A deployed model agrees with the float32 input less often than required."""


@dataclass
class CheckResult:
    """Per row label: agreement with the input, test error (None without labels), agreement with its reference."""

    samples: int
    agreement: dict[str, float] = field(default_factory=dict)
    error: dict[str, float | None] = field(default_factory=dict)
    reference_agreement: dict[str, float] = field(default_factory=dict)


def classes(output: np.ndarray) -> np.ndarray:
    """Top-1 class per sample (and per position for outputs with more axes): argmax over axis 1."""
    return output.argmax(axis=1) if output.ndim >= 2 else output


def predict(run: Runner, held_out: dict[str, np.ndarray], batch: int, count: int, bar) -> np.ndarray:
    """Top-1 classes of the first ``count`` held-out samples, in batches of ``batch``."""
    found = []
    for start in range(0, count, batch):
        found.append(classes(run({name: x[start:start + batch] for name, x in held_out.items()})))
        bar.update(1)
    return np.concatenate(found)


def check_rows(rows: list[Artifact], samples: Samples, *, min_agreement: float, progress: bool = False) -> CheckResult:
    """Run every row on the held-out samples; AgreementError if a written row agrees too rarely."""
    from tqdm import tqdm

    batch = samples.fixed_batch or CHECK_BATCH
    count = samples.held_out_count - samples.held_out_count % batch if samples.fixed_batch else samples.held_out_count
    threads = os.cpu_count() or 1
    predictions = {}
    with tqdm(total=len(rows) * -(-count // batch), desc="checking on held-out data", unit="batch",
              disable=None if progress else True, leave=False) as bar:
        for row in rows:
            predictions[row.label] = predict(row.open(threads), samples.held_out, batch, count, bar)
    result = CheckResult(count)
    labels = None if samples.labels is None else samples.labels[:count]
    for row in rows:
        got = predictions[row.label]
        result.agreement[row.label] = float((got == predictions[INPUT_LABEL]).mean())
        result.error[row.label] = None if labels is None or got.ndim != 1 else float((got != labels).mean())
        if row.reference:
            result.reference_agreement[row.label] = float((got == predictions[row.reference]).mean())
    refuse_below(rows, result, min_agreement)
    return result


def refuse_below(rows: list[Artifact], result: CheckResult, min_agreement: float) -> None:
    """AgreementError naming the first written row below ``min_agreement``, with the numbers."""
    for row in rows:
        if not row.written:
            continue
        pairs = [("the float32 input", result.agreement[row.label])]
        if row.reference:
            pairs.append((row.reference, result.reference_agreement[row.label]))
        for other, agreement in pairs:
            if agreement < min_agreement:
                raise AgreementError(
                    f"{row.label} agrees with {other} on {agreement:.2%} of {result.samples} held-out samples, below "
                    f"--min-agreement {min_agreement:.2%}{_errors_text(result, row.label)}; nothing written")


def _errors_text(result: CheckResult, label: str) -> str:
    """' (test error A -> B)' when there are labels."""
    before, after = result.error.get(INPUT_LABEL), result.error.get(label)
    return "" if before is None or after is None else f" (test error {before:.2%} -> {after:.2%})"
