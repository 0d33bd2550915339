"""The one table that maps what went wrong on receive to a DIMSE C-STORE status (PS3.4 B.2.3).

No other module writes a status code: handlers raise, and ``status_for`` answers.
"""

from __future__ import annotations

import logging
from enum import IntEnum

from sqlalchemy.exc import SQLAlchemyError

from denoised_node.storage.files import InvalidUID, OutOfSpace

log = logging.getLogger(__name__)


class Status(IntEnum):
    SUCCESS = 0x0000
    # Refused: Out of Resources. The sender may retry later.
    OUT_OF_RESOURCES = 0xA700
    # Refused: the instance is larger than node.max_instance_mb.
    OUT_OF_RESOURCES_TOO_LARGE = 0xA701
    # Error: Data Set does not match SOP Class (the dataset says another SOP class).
    DATASET_DOES_NOT_MATCH = 0xA900
    # Error: Cannot understand: the bytes are not a readable dataset.
    CANNOT_UNDERSTAND = 0xC000
    # Error: Cannot understand: a UID needed to file the instance is malformed.
    CANNOT_UNDERSTAND_UID = 0xC001
    # Error: Cannot understand: the series is already kept under another Study Instance UID.
    CANNOT_UNDERSTAND_STUDY = 0xC002
    # Refused: Out of Resources: the index could not be written (database down or locked).
    OUT_OF_RESOURCES_INDEX = 0xA702
    # Processing failure: anything unexpected. Never success.
    PROCESSING_FAILURE = 0x0110
    # C-ECHO success and the generic failure for ECHO.
    ECHO_SUCCESS = 0x0000


class ReceiveError(Exception):
    """An instance could not be kept."""


class UnreadableDataset(ReceiveError):
    """The received bytes are not a readable DICOM dataset (truncated or corrupt)."""


class InstanceTooLarge(ReceiveError):
    """The instance is larger than the configured limit (node.max_instance_mb)."""


class SeriesInOtherStudy(ReceiveError):
    """The instance names a series the node keeps under another study: a series belongs to
    one study, and a derived series must never mix two."""


class SOPClassMismatch(ReceiveError):
    """The dataset's SOP Class UID differs from the presentation context's abstract syntax."""


_TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    (OutOfSpace, Status.OUT_OF_RESOURCES),
    (InstanceTooLarge, Status.OUT_OF_RESOURCES_TOO_LARGE),
    (SOPClassMismatch, Status.DATASET_DOES_NOT_MATCH),
    (UnreadableDataset, Status.CANNOT_UNDERSTAND),
    (InvalidUID, Status.CANNOT_UNDERSTAND_UID),
    (SeriesInOtherStudy, Status.CANNOT_UNDERSTAND_STUDY),
    (SQLAlchemyError, Status.OUT_OF_RESOURCES_INDEX),
    (MemoryError, Status.OUT_OF_RESOURCES),
)


def status_for(exc: BaseException) -> Status:
    """The status to answer for ``exc``: the first matching row of the table, else a
    processing failure (an OSError for a full disk counts as out of resources)."""
    for kind, status in _TABLE:
        if isinstance(exc, kind):
            return status
    if isinstance(exc, OSError) and exc.errno == 28:
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE
