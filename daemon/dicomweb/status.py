"""DICOMweb statuses on both sides: what HTTP status the STOW-RS receiver answers (PS3.18
10.5.3), and what a destination's HTTP status and per-instance FailureReason mean when the
node sends (retry with the send backoff, or fail for good and say what to fix).

The per-instance FailureReason is the DIMSE status the node would answer over DIMSE
(daemon/status.py's table): one table, two transports.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import IntEnum
from http import HTTPStatus

from denoised_node.daemon.dicom.dimse_status import describe, status_for


class StowAnswer(IntEnum):
    """The receiver's HTTP status for a STOW-RS request."""

    ALL_STORED = 200  # every instance was kept
    SOME_FAILED = 202  # some were kept, the FailedSOPSequence lists the others
    NONE_STORED = 409  # none was kept; each failure has its FailureReason
    BAD_REQUEST = 400  # not a multipart body of DICOM parts: nothing to store
    UNSUPPORTED_MEDIA_TYPE = 415  # parts of another type than application/dicom
    TOO_LARGE = 413  # the body is larger than http.max_stow_mb


def answer_for(stored: int, failed: int) -> StowAnswer:
    """The status of a request whose parts were read: ``stored`` kept, ``failed`` not."""
    if failed == 0 and stored > 0:
        return StowAnswer.ALL_STORED
    if stored > 0:
        return StowAnswer.SOME_FAILED
    if failed > 0:
        return StowAnswer.NONE_STORED
    return StowAnswer.BAD_REQUEST


def failure_reason(exc: BaseException) -> int:
    """The FailureReason (0008,1197) for an instance that could not be kept."""
    return int(status_for(exc))


# --- sending ---------------------------------------------------------------------------------

# The answers that will not change by asking again, and what to change instead.
_FOR_GOOD: dict[int, str] = {
    400: "the destination finds the request malformed; see its log",
    401: "check the destination's username + password_file, or token_file",
    403: "let the destination's user store instances (its access rules), or use another",
    404: "check the destination's url: it should be the DICOMweb service root "
         "(POST {url}/studies is STOW-RS)",
    405: "check the destination's url: it does not take STOW-RS (POST {url}/studies)",
    406: "the destination cannot answer in application/dicom+json",
    411: "the destination wants a body without Content-Length; see its log",
    413: "lower the destination's batch_mb, or raise the server's request size limit",
    415: "the destination does not take application/dicom parts (multipart/related)",
}


@dataclass(frozen=True)
class Verdict:
    """What an unsuccessful STOW-RS answer means for the send."""

    permanent: bool
    fix: str = ""


def out_of_resources(reason: int) -> bool:
    """0xA7xx: the destination may take it later (PS3.4 B.2.3 "Refused: Out of Resources")."""
    return reason & 0xFF00 == 0xA700


def verdict_for(http_status: int, reasons: Collection[int]) -> Verdict:
    """A failed attempt: ``http_status`` and the FailureReasons of the refused instances.

    400, 401, 403 (and the like, _FOR_GOOD) and a 409 that gives reasons fail for good;
    out-of-resources reasons, 408, 429, 5xx and a 409 without reasons are retried, as are
    instances refused (or left out of the answer) under a 200 or 202."""
    if http_status in _FOR_GOOD:
        return Verdict(True, _FOR_GOOD[http_status])
    if http_status == 409 and reasons and not all(out_of_resources(r) for r in reasons):
        return Verdict(True, "the destination refuses these instances for good (the reasons "
                             "above); see its log")
    return Verdict(False)


def describe_http(http_status: int) -> str:
    try:
        return f"HTTP {http_status} {HTTPStatus(http_status).phrase}"
    except ValueError:
        return f"HTTP {http_status}"


def describe_reason(reason: int) -> str:
    """A FailureReason as people read it: the DIMSE status and its meaning."""
    return describe(reason)
