"""Where a model will run: the runtime, execution provider, threads, batch size and precision to measure on.

A target's precision is how the model runs there: float32 as written (:class:`Target`) or
int8-quantized (:class:`Int8Target`). ``prepare`` turns a float32 model into what the target
runs; every timing on the target (layer tables, the guarantee) times prepared models, while
the model onnxprune writes stays float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import onnx

from onnxprune.errors import InputError
from onnxprune.quantization import Int8Settings, quantize_static_int8, quantized_ops, random_feeds

TARGETS = ("ort-cpu", "ort-cpu-int8", "ort-cuda", "none")
INT8_CALIBRATION_BATCHES = 2  # random batches: values do not change an int8 kernel's speed

ModelRef = onnx.ModelProto | str | os.PathLike[str]


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            return m.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Target:
    """A runtime configuration that latencies are measured for."""

    name: str
    threads: int
    batch: int = 1
    precision: ClassVar[str] = "float32"
    activation_bytes: ClassVar[int] = 4  # bytes per activation element between layers

    def prepare(self, model: ModelRef) -> ModelRef:
        """``model`` as it runs on this target (a float32 target runs it as given)."""
        return model

    def precision_info(self) -> dict:
        """How models are prepared for this target (recorded in reports)."""
        return {"precision": self.precision}

    def float_counterpart(self) -> Target:
        """The float32 target on the same runtime, threads and batch (this one, for a float32 target)."""
        return self

    @property
    def providers(self) -> tuple[str, ...]:
        return ("CUDAExecutionProvider",) if self.name == "ort-cuda" else ("CPUExecutionProvider",)

    @cached_property
    def fingerprint(self) -> dict:
        """What the cached measurements depend on."""
        import onnxruntime

        info = {
            "target": self.name,
            "onnxruntime": onnxruntime.__version__,
            "cpu": _cpu_name(),
            "cpus": os.cpu_count(),
            "threads": self.threads,
        }
        if self.name == "ort-cuda":
            info["gpu"] = _gpu_name()
        if self.precision != Target.precision:  # float32 fingerprints stay as they were: existing caches stay valid
            info.update(self.precision_info())
        return info

    @property
    def cache_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.name}-{digest}"

    def session_options(self, *, profile: bool = False):
        """Options for timing on this target.

        If the process opted into one shared thread pool (the CLI does, see
        onnxprune.runtime.use_global_thread_pool), sessions use it; a library
        call never changes that process-wide setting, so otherwise each session
        gets its own pool with spinning off (an idle spinning pool would steal
        the cores of the session timed next to it).
        """
        from onnxprune import runtime

        so = runtime.session_options(self.threads)
        if so.use_per_session_threads:
            # Own pool: do not spin after a run, or it steals the next session's cores.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile:
            # A private folder: ORT names profiles by the millisecond, so processes profiling in one working
            # directory at once would read (and delete) each other's files.
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="onnxprune-profile-"), "ort")
        return so

    def session(self, model, *, profile: bool = False):
        from onnxprune.runtime import make_session

        return make_session(model, providers=self.providers, options=self.session_options(profile=profile))


@dataclass(frozen=True)
class Int8Target(Target):
    """ONNX Runtime CPU running the model int8-quantized with ``settings`` (onnxprune.quantization's QDQ)."""

    settings: Int8Settings = field(default_factory=Int8Settings)
    precision: ClassVar[str] = "int8"
    activation_bytes: ClassVar[int] = 1

    def prepare(self, model: ModelRef) -> onnx.ModelProto:
        """``model`` quantized, calibrated on random inputs at the target's batch (a quantized model as given)."""
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(Path(model))
        if quantized_ops(proto):
            return proto
        feeds = random_feeds(proto, self.batch, INT8_CALIBRATION_BATCHES)
        return quantize_static_int8(proto, feeds, settings=self.settings)

    def precision_info(self) -> dict:
        return {"precision": self.precision, "quantization": self.settings.to_dict()}

    def float_counterpart(self) -> Target:
        return Target("ort-cpu", self.threads, self.batch)


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown GPU"
    except OSError:
        return "unknown GPU"


def make_target(name: str, *, threads: int | None = None, batch: int = 1) -> Target | None:
    """A Target for ``name`` (None for "none"); raises InputError if the runtime lacks the provider."""
    if name not in TARGETS:
        raise InputError(f"unknown target '{name}'; choose one of {', '.join(TARGETS)}")
    if name == "none":
        return None
    if batch < 1:
        raise InputError("--batch must be a positive integer")
    if name == "ort-cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise InputError(
                "--target ort-cuda needs onnxruntime-gpu with CUDAExecutionProvider; this onnxruntime has "
                + ", ".join(onnxruntime.get_available_providers())
            )
    if name == "ort-cpu-int8":
        return Int8Target(name, threads or os.cpu_count() or 1, batch)
    return Target(name, threads or os.cpu_count() or 1, batch)
