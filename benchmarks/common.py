"""Shared pieces of the benchmark scripts: machine description, timing, memory (results files: store.py)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu)
        info["cpu"] = model.group(1).strip() if model else platform.processor()
        flags = re.search(r"Flags:\s*(.+)", lscpu)
        if flags:
            info["avx512"] = "avx512f" in flags.group(1).split()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def interleaved_latency(
    runners: dict[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 3, budget_s: float | None = None
) -> dict[str, dict]:
    """Side-by-side timing (see onnxprune.latency.timing.interleaved), as plain dicts for result files."""
    from onnxprune.latency.timing import interleaved

    return {k: t.to_dict() for k, t in interleaved(runners, repeats=repeats, warmup=warmup, budget_s=budget_s).items()}


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def run_measured(args: list[str], *, env: dict | None = None) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run ``python ARGS`` (e.g. ``["-m", "onnxprune", ...]`` or ``["script.py", ...]``), the repository importable.

    Returns (wall seconds, peak RSS in bytes of that interpreter, completed process).
    The peak is read inside the child after exec (see benchmarks/peak_rss.py).
    """
    env = python_env(env)
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        cmd = [sys.executable, "-m", "benchmarks.peak_rss", rss.name, *args]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        peak = int(rss.read().strip() or 0)
    return wall, peak, done


def python_env(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with the repository on PYTHONPATH, for ``python -m benchmarks.NAME``."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def python_peak_rss(code: str) -> int:
    """Peak RSS (bytes) of a fresh interpreter running ``code`` (e.g. just the imports: a baseline)."""
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "baseline.py"
        script.write_text(code + "\n")
        _, rss, _ = run_measured([str(script)])
    return rss


def use_global_ort_threads(threads: int = 2) -> None:
    """Every ONNX Runtime CPU session in this process shares one pool of ``threads`` threads.

    Call before any session exists. Sessions with their own pools keep spinning
    after a run and steal the cores of the next session measured side by side
    (on 2 cores this tripled latencies); one shared pool removes that.
    """
    from onnxprune.runtime import use_global_thread_pool

    use_global_thread_pool(threads)


def ort_runner(path_or_bytes, feed: dict, *, threads: int = 2, providers=("CPUExecutionProvider",)):
    """A zero-argument callable running one inference on ONNX Runtime (CPU: the shared pool)."""
    from onnxprune.runtime import make_session

    if providers[0] == "CPUExecutionProvider":
        use_global_ort_threads(threads)
    session = make_session(path_or_bytes, providers=providers, threads=threads)
    return lambda: session.run(None, feed)
