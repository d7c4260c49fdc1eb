"""Shared pieces of the benchmark scripts: machine description, timing, memory (results files: store.py)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

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


def python_floor(code: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a fresh interpreter running ``code`` (e.g. just the imports: a baseline)."""
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "baseline.py"
        script.write_text(code + "\n")
        wall, rss, _ = run_measured([str(script)])
    return wall, rss


def python_peak_rss(code: str) -> int:
    """Peak RSS (bytes) of a fresh interpreter running ``code``."""
    return python_floor(code)[1]


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


# -- what the train-then-measure benchmarks (resnet18_dataloader, vit_heads) share ------------------------------


class Stages:
    """Wall time of each stage of ``experiment``, and a log line as each ends."""

    def __init__(self, experiment: str, log: logging.Logger) -> None:
        self.experiment, self.log = experiment, log
        self.times: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        self.log.info("[%s] %s ...", self.experiment, key)
        t = time.perf_counter()
        yield
        self.times[key] = round(time.perf_counter() - t, 2)
        self.log.info("[%s] %s done in %.1f s (%.1f s so far)", self.experiment, key, self.times[key],
                      time.perf_counter() - self.start)


def exported(make: Callable[[str], Any], exporter: str, key: str, notes: dict[str, str],
             experiment: str) -> tuple[Any, str]:
    """``make(exporter)``'s ONNX model and the exporter that made it: ``exporter``, and where dynamo fails,
    torchscript (the failure recorded in ``notes``)."""
    try:
        return make(exporter), exporter
    except Exception as exc:  # noqa: BLE001 - any dynamo failure: record it, then the other exporter
        if exporter != "dynamo":
            raise
        notes[key] = f"dynamo failed ({type(exc).__name__}: {str(exc).strip()[:400]}); exported with torchscript"
        logging.getLogger("benchmarks").warning("[%s] %s: %s", experiment, key, notes[key])
        return make("torchscript"), "torchscript"


def ort_cuda() -> bool:
    """Whether this onnxruntime has the CUDA provider (onnxruntime-gpu)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cuda_side_by_side(files: dict[str, Path], image_size: int, batches: Sequence[int], rounds: int) -> dict:
    """ORT CUDA latency of every model per batch (IO binding) where onnxruntime has the CUDA provider, else why not."""
    if not ort_cuda():
        return {"skipped": "onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)"}
    from benchmarks.cuda_timing import cuda_latency as timed

    try:
        return {f"batch{b}": timed(files, (b, 3, image_size, image_size), rounds=rounds) for b in batches}
    except Exception as exc:  # noqa: BLE001 - a provider listed but not loadable: skip, say why
        return {"skipped": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}


def last_test_error(history: list[dict]) -> float | None:
    """The last epoch's test error in PyTorch, in percent (None: not evaluated)."""
    accuracy = history[-1].get("eval_accuracy") if history else None
    return None if accuracy is None else 100 * (1 - accuracy)


def shown(path: Path) -> str:
    """A path relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


EXTERNAL_ALIGN = 4096  # offsets of tensors of 1 MB or more in an external data file, as onnx aligns them


class ExternalDataWriter:
    """Appends tensors to one external data file and makes the TensorProtos that point into it."""

    def __init__(self, path: Path) -> None:
        self.path, self.file, self.offset = path, open(path, "wb"), 0

    def add(self, name: str, array: np.ndarray):
        import onnx
        from onnx import helper

        if array.nbytes >= 2**20 and self.offset % EXTERNAL_ALIGN:
            self.file.write(b"\0" * (EXTERNAL_ALIGN - self.offset % EXTERNAL_ALIGN))
            self.offset += EXTERNAL_ALIGN - self.offset % EXTERNAL_ALIGN
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        self.file.write(data.tobytes())
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", data.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        self.offset += data.nbytes
        return tensor

    def close(self) -> None:
        self.file.close()
