"""The last steps of every run: check the result, verify it on ONNX Runtime, write it atomically.

Shared by the pass pipeline (:mod:`onnxprune.api`) and the latency guarantee
(:mod:`onnxprune.latency.guarantee`). Nothing is written unless the result
passes the ONNX checker and (when asked) computes what the input computes.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxprune.atomic_write import needs_external_data, staged_write
from onnxprune.errors import InputError, OnnxPruneError, PassError, first_line
from onnxprune.external_data import forget_pending, materialize_pending
from onnxprune.modelio import LoadedModel
from onnxprune.progress import PhaseCallback, counter, phase
from onnxprune.report import RunReport
from onnxprune.verify import run_on_random_inputs
from onnxprune.verify_blocks import verify_method, verify_model

_CHECK_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)


def checker_problem(model: onnx.ModelProto | Path) -> str | None:
    """The first line of the full ONNX checker's complaint about ``model``, or None if it passes."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except _CHECK_ERRORS as e:
        return first_line(e)
    return None


def check_output_model(model: onnx.ModelProto, path: Path | None, source: onnx.ModelProto | Path) -> None:
    """Full ONNX check of the result (by ``path`` if given); if it fails, blame the input or the rewrite.

    Raises :class:`InputError` when ``source`` fails the checker too, else :class:`PassError`.
    """
    problem = checker_problem(path if path is not None else model)
    if problem is None:
        return
    input_problem = checker_problem(source)
    if input_problem is not None:
        raise InputError(f"the input model fails the ONNX checker ({input_problem}); nothing was written")
    raise PassError(f"internal error: the rewritten model fails the ONNX checker ({problem}); nothing was written")


def unusable_input(loaded: LoadedModel) -> str | None:
    """Why the input cannot be used (the ONNX checker rejects it, or onnxruntime cannot run it), or None."""
    source = runtime_reference(loaded)
    try:
        problem = checker_problem(source)
    except Exception as e:  # the checker itself fails on some damaged models (an unknown data type)
        problem = first_line(e)
    if problem is not None:
        return f"it fails the ONNX checker ({problem})"
    try:
        run_on_random_inputs(source)
    except Exception as e:  # onnxruntime raises its own exception types
        return f"onnxruntime cannot run it ({first_line(e)[:300]})"
    return None


@contextlib.contextmanager
def input_blamed(loaded: LoadedModel) -> Iterator[None]:
    """Report an unexpected failure of the work inside as an :class:`InputError` when the input is unusable.

    A damaged model can pass every check made when it is read and still break
    the analysis; if the ONNX checker or onnxruntime rejects it, the input is at
    fault (exit 2), not onnxprune. A failure on a usable input stays a bug.
    """
    try:
        yield
    except OnnxPruneError:
        raise
    except Exception as error:
        problem = unusable_input(loaded)
        if problem is None:
            raise
        raise InputError(f"the input model is not usable: {problem}; nothing was written") from error


def runtime_reference(loaded: LoadedModel) -> onnx.ModelProto | Path:
    """What the runtime compares against: the input file, unless its IR version had to be lowered."""
    return loaded.path if loaded.path is not None and loaded.ir_lowered_from is None else loaded.model


def weight_bytes_of(source: onnx.ModelProto | Path) -> int:
    """Bytes of a model's initializers, from their types and dims (a file's structure is read, not its weights)."""
    from onnxprune.cuts import tensor_bytes

    model = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)
    return sum(tensor_bytes(t) for t in model.graph.initializer)


# Below this many bytes of weights a full garbage collection frees too little to matter, and in a process holding
# many objects (a training script, a test session) it costs up to seconds.
COLLECT_ABOVE_BYTES = 64 << 20


def collect_garbage_if_large(model: onnx.ModelProto, weight_bytes: int | None) -> None:
    """Free cyclic garbage (a dropped graph still holding weight arrays) before a step that needs memory, when the
    model's weights (``weight_bytes``, else counted from ``model``) are large enough for it to pay."""
    size = weight_bytes if weight_bytes is not None else weight_bytes_of(model)
    if size >= COLLECT_ABOVE_BYTES:
        gc.collect()


def verify_into(
    report: RunReport,
    reference: onnx.ModelProto | Path,
    candidate: onnx.ModelProto | Path,
    method: str = "auto",
    *,
    weight_bytes: int | None = None,
    on_phase: PhaseCallback | None = None,
) -> None:
    """Verify ``candidate`` against ``reference`` on ONNX Runtime (``method``: "auto", "whole" or "blocks";
    auto decides from ``weight_bytes``, the input's size); record the result and its time in ``report``."""
    start = time.perf_counter()
    size = weight_bytes if weight_bytes is not None else weight_bytes_of(reference)
    report.verification = verify_model(reference, candidate, method, weight_bytes=size, on_phase=on_phase)
    report.timings["verify"] = time.perf_counter() - start


def check_in_memory(
    model: onnx.ModelProto,
    reference: onnx.ModelProto | Path,
    report: RunReport,
    *,
    verify: bool | str,
    weight_bytes: int | None = None,
    on_phase: PhaseCallback | None = None,
) -> None:
    """Check a result that is not written (a model too large for one protobuf is checked when written).

    Deferred tensors (:func:`onnxprune.external_data.defer`) are first put into the protobuf: the caller
    gets a self-contained model. ``verify``: True (auto), False, or a method of :func:`verify_into`."""
    method = verify_method(verify)
    collect_garbage_if_large(model, weight_bytes)
    materialize_pending(model)
    start = time.perf_counter()
    if not needs_external_data(model):
        with phase(on_phase, "check"):
            check_output_model(model, None, reference)
    report.timings["check"] = time.perf_counter() - start
    if method is not None:
        verify_into(report, reference, model, method, weight_bytes=weight_bytes, on_phase=on_phase)


def write_checked(
    model: onnx.ModelProto,
    output: str | os.PathLike[str],
    reference: onnx.ModelProto | Path,
    report: RunReport,
    *,
    verify: bool | str,
    external_data: bool = False,
    weight_bytes: int | None = None,
    on_phase: PhaseCallback | None = None,
) -> None:
    """Stage ``model`` beside ``output``, check (and verify) it there, then move it into place.

    Timed as ``save`` (writing, and the move into place), ``check`` (the ONNX checker) and ``verify``.
    A model with deferred tensors is streamed into the staged files and left pointing at the written
    external data (its location relative to ``output``'s folder); if anything fails, nothing is written.
    ``verify``: True (auto), False, or a method of :func:`verify_into`; ``on_phase``: see :mod:`onnxprune.progress`.
    """
    method = verify_method(verify)
    external = external_data or needs_external_data(model)
    timings = report.timings
    start = time.perf_counter()
    collect_garbage_if_large(model, weight_bytes)  # the arrays the write streams and drops
    try:
        with staged_write(model, output, external_data=external, progress=counter(on_phase, "save")) as staged:
            timings["save"] = time.perf_counter() - start
            start = time.perf_counter()
            with phase(on_phase, "check"):
                check_output_model(model, staged if external else None, reference)  # by path: no second copy
            timings["check"] = time.perf_counter() - start
            if method is not None:
                verify_into(report, reference, staged, method, weight_bytes=weight_bytes, on_phase=on_phase)
            start = time.perf_counter()
    finally:
        forget_pending(model)
    timings["save"] += time.perf_counter() - start  # the move into place
    report.output = str(output)
