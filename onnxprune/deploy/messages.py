"""One-line accounts of what the quantizer and the runtimes raised, for the user's single line on stderr."""

from __future__ import annotations

MAX_CHARS = 200


def first_line(error: BaseException) -> str:
    """``Type: the first line of the message`` (at most MAX_CHARS characters of it)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:MAX_CHARS]}" if text else type(error).__name__
