"""Timing several callables side by side (used by the latency check and the benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Summary of repeated runs, in milliseconds."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Timing:
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(float(np.median(a)), float(np.percentile(a, 25)), float(np.percentile(a, 75)), int(a.size))

    def to_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms, "runs": self.runs}


def interleaved(
    runners: dict[str, Callable[[], object]],
    *,
    repeats: int = 30,
    warmup: int = 3,
    budget_s: float | None = None,
    min_repeats: int = 5,
    until: Callable[[dict[str, list[float]]], bool] | None = None,
) -> dict[str, Timing]:
    """Run each callable in turn, ``repeats`` rounds (alternating order), so drifts in machine load
    affect all of them alike. After ``min_repeats`` rounds, stop early once ``budget_s`` is spent
    or ``until(samples)`` says the answer is clear."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    start = time.perf_counter()
    items = list(runners.items())
    for i in range(repeats):
        for name, fn in items if i % 2 == 0 else items[::-1]:
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000.0)
        if i + 1 >= min_repeats:
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
            if until is not None and until(samples):
                break
    return {k: Timing.of(v) for k, v in samples.items()}


def clear_winner(samples: dict[str, list[float]], *, tie: float = 0.02, reference: str = "input") -> bool:
    """True once the ordering is settled: the fastest entry's upper quartile is below the lower
    quartile of every other entry, except other candidates within ``tie`` of it (equally good),
    and the ``reference`` entry is clearly slower than it."""
    q = {k: np.percentile(v, [25, 50, 75]) for k, v in samples.items() if v}
    best = min(q, key=lambda k: q[k][1])
    for k in q:
        if k == best:
            continue
        separated = q[best][2] < q[k][0]
        equal = k != reference and abs(q[k][1] / q[best][1] - 1.0) < tie
        if not (separated or equal):
            return False
    return True
