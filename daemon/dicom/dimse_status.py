"""DIMSE C-STORE statuses (PS3.4 B.2.3) on both sides: the one table that maps what went
wrong on receive to the status the SCP answers, and what a destination's answer means when the
node sends (``is_stored``, ``describe``).

No other module writes or reads a status code: handlers raise, ``status_for`` answers, and
the SCU asks ``is_stored``.
"""

from __future__ import annotations

import errno
import logging
from enum import IntEnum

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
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
    # Error: Cannot understand: a STOW-RS request to /studies/{uid} carried another study's
    # instance (DICOMweb only; daemon/dicomweb).
    CANNOT_UNDERSTAND_NOT_THIS_STUDY = 0xC003
    # Refused: Out of Resources: the index could not be written (database down or locked).
    OUT_OF_RESOURCES_INDEX = 0xA702
    # Processing failure: anything unexpected. Never success.
    PROCESSING_FAILURE = 0x0110
    # C-ECHO success and the generic failure for ECHO.
    ECHO_SUCCESS = 0x0000


class StoreWarning(IntEnum):
    """Warnings a destination may answer: the instance was stored all the same."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007


STORED = frozenset({int(Status.SUCCESS), *map(int, StoreWarning)})


def is_stored(code: int) -> bool:
    """Did the destination keep the instance (success, or a warning that it kept it)?"""
    return int(code) in STORED


def describe(code: int) -> str:
    """``0xA700 (Refused: Out of Resources)``: the code and its meaning (pynetdicom's tables)."""
    known = STORAGE_SERVICE_CLASS_STATUS.get(int(code)) or GENERAL_STATUS.get(int(code))
    meaning = known[1] if known else "not a status the standard defines for C-STORE"
    return f"0x{int(code):04X} ({meaning})"


class ReceiveError(Exception):
    """An instance could not be kept."""


class UnreadableDataset(ReceiveError):
    """The received bytes are not a readable DICOM dataset (truncated or corrupt)."""


class InstanceTooLarge(ReceiveError):
    """The instance is larger than the configured limit (node.max_instance_mb)."""


class SeriesInOtherStudy(ReceiveError):
    """The instance names a series the node keeps under another study: a series belongs to
    one study, and a derived series must never mix two."""


class NotTheRequestedStudy(ReceiveError):
    """A STOW-RS request for one study (POST /studies/{uid}) carried another study's instance."""


class SOPClassMismatch(ReceiveError):
    """The dataset's SOP Class UID differs from the presentation context's abstract syntax."""


_TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    (OutOfSpace, Status.OUT_OF_RESOURCES),
    (InstanceTooLarge, Status.OUT_OF_RESOURCES_TOO_LARGE),
    (SOPClassMismatch, Status.DATASET_DOES_NOT_MATCH),
    (UnreadableDataset, Status.CANNOT_UNDERSTAND),
    (InvalidUID, Status.CANNOT_UNDERSTAND_UID),
    (SeriesInOtherStudy, Status.CANNOT_UNDERSTAND_STUDY),
    (NotTheRequestedStudy, Status.CANNOT_UNDERSTAND_NOT_THIS_STUDY),
    (SQLAlchemyError, Status.OUT_OF_RESOURCES_INDEX),
    (MemoryError, Status.OUT_OF_RESOURCES),
)


def status_for(exc: BaseException) -> Status:
    """The status to answer for ``exc``: the first matching row of the table, else a
    processing failure (an OSError for a full disk counts as out of resources)."""
    for kind, status in _TABLE:
        if isinstance(exc, kind):
            return status
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return Status.OUT_OF_RESOURCES
    return Status.PROCESSING_FAILURE
