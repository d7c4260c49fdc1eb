"""Errors that reach the user as one line on stderr and exit code 2."""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class OnnxPruneError(Exception):
    """Base class for errors onnxprune reports to the user (CLI exit code 2)."""


class InputError(OnnxPruneError):
    """The input model (or a path argument) cannot be used: missing, not ONNX, unsupported."""


class VerificationError(OnnxPruneError):
    """The rewritten model does not compute the same function as the input: nothing is written."""


class PassError(OnnxPruneError):
    """A pass failed, or a pass name is unknown."""
