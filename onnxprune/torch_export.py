"""Exporting PyTorch models to ONNX the way onnxprune's tools and tests do (needs torch).

Two exporters: "dynamo" (``torch.onnx.export(dynamo=True)``, built on ``torch.export``; the
default) and "torchscript" (the TorchScript tracer, deprecated since torch 2.9, kept for models
``torch.export`` cannot capture). The pruning engine handles what either one writes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import onnx

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
TORCHSCRIPT_OPSET = 17
# The opset torch.onnx's function library is written in: no version conversion after export.
DYNAMO_OPSET = 18
DEFAULT_OPSET = TORCHSCRIPT_OPSET  # kept for callers that imported it
# Newest IR version every ONNX Runtime this project supports loads (onnx >= 1.23 would write 14).
MAX_IR_VERSION = 10
# Loggers of the dynamo exporter's stack, routed to this module's logger at DEBUG while it runs.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
# torch's structured trace (artifacts for tlparse, logged at DEBUG on every export): dropped while it runs.
_DROPPED_LOGGERS = ("torch.__trace",)


def io_names(n_inputs: int, n_outputs: int) -> tuple[list[str], list[str]]:
    """Graph input and output names: input, input_1, ...; logits, output_1, ..."""
    inputs = ["input"] + [f"input_{i}" for i in range(1, n_inputs)]
    outputs = ["logits"] + [f"output_{i}" for i in range(1, n_outputs)]
    return inputs, outputs


def export_onnx(
    model,
    example,
    *,
    exporter: str = DEFAULT_EXPORTER,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Export ``model`` (eval mode, no grad) for ``example`` (a tensor or a tuple of tensors).

    Inputs are named input, input_1, ...; outputs logits, output_1, ...; with ``dynamic_batch``
    axis 0 of each is the dimension "batch". ``exporter`` is "dynamo" (default, opset 18) or
    "torchscript" (opset 17); ``opset`` overrides the version. A dynamo export failure is raised
    as is (no fallback), with a note suggesting ``exporter="torchscript"``.
    """
    import torch
    from torch.utils._pytree import tree_leaves

    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; known exporters: {', '.join(EXPORTERS)}")
    args = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    model = model.eval()
    with torch.no_grad():
        outputs = model(*args)
    n_outputs = sum(isinstance(t, torch.Tensor) for t in tree_leaves(outputs))
    inputs, output_names = io_names(len(args), n_outputs)
    if exporter == "torchscript":
        proto = _export_torchscript(model, args, inputs, output_names, opset or TORCHSCRIPT_OPSET, dynamic_batch)
    else:
        proto = _export_dynamo(model, args, inputs, output_names, opset or DYNAMO_OPSET, dynamic_batch)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


def batch_of_two(value):
    """A tensor with a batch of one repeated to two (torch.export specialises an axis of size 1), others as they are."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(2, *value.shape[1:]).clone()
    return value


def _export_torchscript(model, args: tuple, inputs: list[str], outputs: list[str], opset: int,
                        dynamic_batch: bool) -> onnx.ModelProto:
    """The TorchScript exporter's model (constant-folded, BatchNorm folded into Conv by torch)."""
    import torch

    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in inputs + outputs} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def _export_dynamo(model, args: tuple, inputs: list[str], outputs: list[str], opset: int,
                   dynamic_batch: bool) -> onnx.ModelProto:
    """The dynamo exporter's model (``torch.export`` then onnxscript's optimizer), its chatter logged at DEBUG."""
    import torch

    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
        # torch.export specialises an axis of size 1: trace a batch of one as two equal examples
        args = tuple(batch_of_two(a) for a in args)
    captured: list[str] = []
    try:
        with _quiet(captured), torch.no_grad():
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=inputs,
                                        output_names=outputs, dynamic_shapes=shapes, verbose=False)
    except Exception as e:
        e.add_note(f'onnxprune: the dynamo ONNX exporter failed on {type(model).__name__}; '
                   'export_onnx(..., exporter="torchscript") may export it')
        raise
    finally:
        for line in captured:
            logger.debug("dynamo exporter: %s", line)
    return program.model_proto


class _Forward(logging.Handler):
    """Re-logs records of the exporter's loggers as DEBUG records of this module's logger."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger.debug("%s: %s", record.name, record.getMessage())
        except Exception:  # noqa: BLE001 - a record that does not format: logging's own policy
            self.handleError(record)


@contextlib.contextmanager
def _quiet(captured: list[str]) -> Iterator[None]:
    """Capture stdout, stderr and warnings into ``captured`` (lines) and forward the exporter's loggers at DEBUG."""
    out, err = io.StringIO(), io.StringIO()
    forward, drop = _Forward(), logging.NullHandler()
    saved = []
    for name in _NOISY_LOGGERS + _DROPPED_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, lg.handlers[:]))
        lg.handlers = [drop if name in _DROPPED_LOGGERS else forward]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                text = out.getvalue() + err.getvalue()
                captured.extend(s for s in text.splitlines() if s.strip())
                captured.extend(f"warning: {w.category.__name__}: {w.message}" for w in caught)
    finally:
        for lg, propagate, handlers in saved:
            lg.propagate = propagate
            lg.handlers = handlers
