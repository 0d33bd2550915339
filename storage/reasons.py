"""Reasons written for people (a job's reason, an image left out): one line, whole, and never
a traceback with install paths; the full exception goes to the log."""

from __future__ import annotations

# A reason is kept whole up to this (several gate checks, a send failure with its fix run
# to 500-800 characters); past it, it is cut where a word ends. Bounded: a library that puts
# a megabyte into one line does not fill the audit log.
MAX_REASON_CHARS = 4000


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters. Some libraries put
    a whole traceback in an exception's message (pydicom's tag_in_exception does)."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) <= limit:
        return first
    cut = first[:limit - 3]
    return (cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut) + "..."


def describe_error(exc: BaseException) -> str:
    """``Kind: first line of the message`` for an unexpected exception."""
    message = one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
