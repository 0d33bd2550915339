"""Reasons written for people (a job's reason, an image left out): one line, short, and never
a traceback with install paths; the full exception goes to the log."""

from __future__ import annotations

MAX_REASON_CHARS = 300


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters. Some libraries put
    a whole traceback in an exception's message (pydicom's tag_in_exception does)."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[:limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    """``Kind: first line of the message`` for an unexpected exception."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
