"""ONNX Runtime helpers: sessions, what the installed runtime can load, random inputs."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

# onnxruntime's type strings -> numpy dtypes for the inputs we can fabricate.
_ORT_TYPES: Mapping[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}

ModelSource = onnx.ModelProto | bytes | str | os.PathLike
ORT_LOG_FATAL = 4  # SessionOptions.log_severity_level: fatal errors only


def _ort():
    import onnxruntime

    return onnxruntime


def lean_session_options(threads: int | None = None):
    """Options for checking results rather than speed: no graph rewrites, no weight prepacking,
    no memory arena, so a session holds little beyond the model's own weights; nodes run in priority order
    (the default order may convert every float16 weight to float32 first, each copy alive till its MatMul)."""
    so = session_options(threads, optimize=False)
    so.enable_cpu_mem_arena = False
    so.execution_order = _ort().ExecutionOrder.PRIORITY_BASED
    so.add_session_config_entry("session.disable_prepacking", "1")
    return so


_global_pool_threads: int | None = None


def use_global_thread_pool(threads: int) -> None:
    """Make every CPU session this process creates share one pool of ``threads`` threads.

    Must run before the first session. For measuring models side by side: a
    session with its own pool keeps spinning after a run and steals the cores
    of the next one.
    """
    global _global_pool_threads
    if _global_pool_threads == threads:
        return
    if _global_pool_threads is not None:
        raise RuntimeError(f"the global thread pool already has {_global_pool_threads} threads")
    _ort().set_global_thread_pool_sizes(threads, 1)
    _global_pool_threads = threads


def session_options(threads: int | None = None, *, optimize: bool = True, quiet: bool = True):
    """SessionOptions with a fixed thread count (or the global pool) and logging kept quiet."""
    ort = _ort()
    so = ort.SessionOptions()
    if _global_pool_threads is not None:
        so.use_per_session_threads = False
    elif threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if quiet:  # failures reach the caller as exceptions; the runtime's own error log would be a second report
        so.log_severity_level = ORT_LOG_FATAL
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


def make_session(
    model: ModelSource,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    options=None,
):
    """An InferenceSession from a path, serialised bytes or a ModelProto."""
    ort = _ort()
    so = options if options is not None else session_options(threads)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    return ort.InferenceSession(model, sess_options=so, providers=list(providers))


@functools.lru_cache(maxsize=64)
def _probe(ir_version: int, opsets: tuple[tuple[str, int], ...]) -> str | None:
    """Try loading an empty model with this IR version and these opsets."""
    ort = _ort()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    imports = [helper.make_opsetid(d, v) for d, v in opsets]
    if not any(d in ("", "ai.onnx") for d, _ in opsets):
        imports.append(helper.make_opsetid("", 13))
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = ir_version
    so = session_options()
    try:
        ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        return str(e)
    return None


def max_loadable_ir(model: onnx.ModelProto) -> int | None:
    """The highest IR version (up to the model's) at which onnxruntime loads the model's opsets."""
    opsets = tuple(sorted((o.domain, o.version) for o in model.opset_import))
    for ir in range(model.ir_version, 2, -1):
        if _probe(ir, opsets) is None:
            return ir
    return None


def ort_load_problem(model: onnx.ModelProto) -> str | None:
    """Why onnxruntime would refuse this model's IR version or opsets (None if it would not)."""
    opsets = tuple(sorted((o.domain, o.version) for o in model.opset_import))
    message = _probe(max(model.ir_version, 3), opsets)
    if message is None:
        return None
    ort = _ort()
    default = [v for d, v in opsets if d in ("", "ai.onnx")]
    if "opset" in message.lower() and default:
        return f"opset {default[0]} cannot be loaded by onnxruntime {ort.__version__}"
    if "ir version" in message.lower() or "ir_version" in message.lower():
        return f"IR version {model.ir_version} is newer than onnxruntime {ort.__version__} can load"
    return f"onnxruntime {ort.__version__} cannot load this model's opsets {list(opsets)}: {message.splitlines()[0][:200]}"


def input_specs(session, symbolic_dim: int = 2) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, concrete shape, dtype) for each input the session needs fed."""
    specs = []
    for arg in session.get_inputs():
        if arg.type not in _ORT_TYPES:
            raise ValueError(f"input '{arg.name}' has type {arg.type}, which onnxprune cannot fabricate")
        shape = tuple(d if isinstance(d, int) and d >= 0 else symbolic_dim for d in arg.shape)
        specs.append((arg.name, shape, _ORT_TYPES[arg.type]))
    return specs


def random_feed(specs, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs: standard normal floats, small non-negative integers, random booleans."""
    feed = {}
    for name, shape, dtype in specs:
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feed[name] = rng.integers(0, 2, shape).astype(dtype)
    return feed

