"""Latency of every row at the batch deploy is fast at, timed side by side: interleaved runs, medians, one thread
count at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from onnxprune.deploy.runtimes import Artifact, Runner
from onnxprune.deploy.sources import Samples
from onnxprune.latency.timing import Timing, interleaved

logger = logging.getLogger(__name__)

MAX_ROUNDS = 2000
MIN_ROUNDS = 10
WARMUP_RUNS = 5


def timing_feed(samples: Samples, batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` held-out samples, as one batch to time."""
    return {name: _filled(x, batch) for name, x in samples.held_out.items()}


def _filled(x: np.ndarray, batch: int) -> np.ndarray:
    """The first ``batch`` rows of ``x``; where ``x`` has fewer, its rows repeated in order until there are ``batch``
    (latency depends on the shape, not on which samples fill it)."""
    rows = np.arange(batch) % len(x)
    return np.ascontiguousarray(x[rows])


def _bound(run: Runner, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    """``run`` with ``feed`` as its argument, for timing."""
    return lambda: run(feed)


def time_rows(rows: list[Artifact], feed: dict[str, np.ndarray], thread_counts: list[int], *,
              budget_s: float) -> dict[str, dict[int, Timing]]:
    """Per row label, per thread count: the timing of ``feed``, all rows interleaved within a thread count."""
    timings: dict[str, dict[int, Timing]] = {row.label: {} for row in rows}
    for threads in thread_counts:
        batch = len(next(iter(feed.values())))
        runners = {row.label: _bound(row.open(threads, batch), feed) for row in rows}
        measured = interleaved(runners, repeats=MAX_ROUNDS, warmup=WARMUP_RUNS, budget_s=budget_s,
                               min_repeats=MIN_ROUNDS)
        for label, timing in measured.items():
            timings[label][threads] = timing
        logger.debug("timed %d rows at %d thread(s): %s", len(rows), threads,
                     {k: round(t.median_ms, 4) for k, t in measured.items()})
    return timings
