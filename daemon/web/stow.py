"""The STOW-RS receiver: POST /dicom-web/studies[/{StudyInstanceUID}] on the node's HTTP
endpoint (http.stow_rs = true), behind the same authentication as the pages.

Each application/dicom part is streamed from the request body into a spool in the store's
incoming/ folder and handed to the very Receiver that C-STORE uses (parse, size limit,
free-space watermark, fsync, rename, index commit), so an instance the answer lists in its
ReferencedSOPSequence is kept exactly as one that was answered 0x0000 over DIMSE. A refused
one is listed in the FailedSOPSequence with the DIMSE status the node would have answered
(daemon/status.py). The body is read a chunk at a time: memory is bounded by a chunk, never
by the request (waitress keeps a large body in a temporary file until the request is whole).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence as DicomSequence

from denoised_node.daemon.dicom.dimse_status import Status, UnreadableDataset
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.spool import Spool
from denoised_node.daemon.dicomweb.multipart import (
    DICOM,
    MediaType,
    MultipartError,
    MultipartReader,
)
from denoised_node.daemon.dicomweb.status import answer_for, failure_reason
from denoised_node.daemon.web.request import Response
from denoised_node.storage.files import InvalidUID, check_uid

log = logging.getLogger(__name__)

PATH = re.compile(r"^/dicom-web/studies(?:/([0-9.]+))?/?$")
_DICOM_JSON = "application/dicom+json"
_MULTIPART_RELATED = "multipart/related"


class InstanceCounts(Protocol):
    """The SCP's per-instance metrics (daemon.metrics), shared with C-STORE."""

    def instance(self, outcome: str, size: int = 0) -> None: ...


class _NoCounts:
    def instance(self, outcome: str, size: int = 0) -> None:
        pass


@dataclass
class _Outcome:
    """What one request did: the response dataset's two lists, and per series what it kept
    (an early-completion hint, as an association's release is) and only resent."""

    referenced: list[Dataset] = field(default_factory=list)
    failed: list[Dataset] = field(default_factory=list)
    stored: Counter[int] = field(default_factory=Counter)
    duplicates: Counter[int] = field(default_factory=Counter)

    def refuse(self, sop_class: str, sop_instance: str, reason: int) -> None:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        item.FailureReason = reason
        self.failed.append(item)

    def keep(self, sop_class: str, sop_instance: str) -> None:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        self.referenced.append(item)


def source_of(user: str | None) -> str:
    """A series' received_via for a STOW-RS caller (the pages and `jobs show` show it)."""
    if user is None:
        return "STOW-RS, no login (loopback)"
    if user == "token":  # the guard's name for a bearer token
        return "STOW-RS, bearer token"
    return f"STOW-RS, user {user}"


class StowReceiver:
    """Answers STOW-RS requests; one per HTTP endpoint, shared by its request threads."""

    def __init__(self, receiver: Receiver, max_request_bytes: int,
                 counts: InstanceCounts | None = None) -> None:
        self.receiver = receiver
        self.max_request_bytes = max_request_bytes
        self.counts = counts or _NoCounts()

    def handle(self, method: str, path: str, headers: dict[str, str], body: BinaryIO,
               user: str | None) -> Response:
        """``headers`` with lower-case names; ``user``: who the guard let in (None: nobody
        had to log in)."""
        match = PATH.match(path)
        if match is None:
            return _refused(404, "not found: STOW-RS is POST /dicom-web/studies or "
                                      "/dicom-web/studies/{StudyInstanceUID}")
        if method != "POST":
            return Response(405, b"only STOW-RS (POST) is served under /dicom-web\n",
                            "text/plain; charset=utf-8", (("Allow", "POST"),))
        study_uid = match.group(1)
        if study_uid is not None:
            try:
                check_uid(study_uid, "StudyInstanceUID")
            except InvalidUID as exc:
                return _refused(400, str(exc))
        media = MediaType.parse(headers.get("content-type", ""))
        if media.essence != _MULTIPART_RELATED:
            return _refused(415, "STOW-RS takes multipart/related; "
                                      f"type=\"{DICOM}\" bodies")
        if media.parameters.get("type", DICOM).lower() != DICOM:
            return _refused(415, f"only {DICOM} parts are taken (not "
                                      f"{media.parameters['type']}: no metadata + bulk data)")
        boundary = media.parameters.get("boundary")
        if not boundary:
            return _refused(400, "the Content-Type has no boundary parameter")
        length = _length(headers.get("content-length"))
        if length is not None and length > self.max_request_bytes:
            return _refused(413, f"the body is larger than http.max_stow_mb "
                                      f"({self.max_request_bytes // 2**20} MiB); send fewer "
                                      "instances per request")
        accept = headers.get("accept", "")
        if accept and not _accepts_json(accept):
            return _refused(406, f"the answer is {_DICOM_JSON} (Accept does not allow it)")
        try:
            reader = MultipartReader(body, boundary, length)
        except MultipartError as exc:
            return _refused(400, str(exc))
        outcome, malformed = self._read(reader, study_uid, source_of(user))
        self._after_request(outcome, user)
        if malformed and not outcome.referenced and not outcome.failed:
            return _refused(400, f"not a multipart body of {DICOM} parts: {malformed}")
        status = answer_for(len(outcome.referenced), len(outcome.failed))
        log.info("STOW-RS request answered", extra={
            "status": int(status), "stored": len(outcome.referenced),
            "refused": len(outcome.failed), "user": user or "", "study_uid": study_uid or "",
            "malformed": malformed or ""})
        return Response(int(status), _answer(outcome), _DICOM_JSON)

    def _read(self, reader: MultipartReader, study_uid: str | None,
              source: str) -> tuple[_Outcome, str]:
        outcome = _Outcome()
        while True:
            try:
                head = reader.next_part()
            except MultipartError as exc:
                return outcome, str(exc)
            if head is None:
                return outcome, ""
            spool = Spool(self.receiver.store.incoming, self.receiver.max_bytes)
            try:
                whole = reader.read_part(spool.write)
                spool.close()
                self._one(spool, whole, head.media_type, study_uid, source, outcome)
            finally:
                spool.discard()  # kept: renamed into place; refused: not kept
            if not whole:
                return outcome, "the body ended inside a part (no closing delimiter)"

    def _one(self, spool: Spool, whole: bool, media: MediaType, study_uid: str | None,
             source: str, outcome: _Outcome) -> None:
        try:
            if media.essence != DICOM:
                raise UnreadableDataset(f"a part of type {media.essence}, not {DICOM}")
            if not whole:
                raise UnreadableDataset("the request ended inside this part; it was not kept")
            received = self.receiver.receive_spooled(spool, None, "", source=source,
                                                     study_uid=study_uid)
        except Exception as exc:
            reason = failure_reason(exc)
            sop_class, sop_instance = _uids_of(spool) if spool.keeping else ("", "")
            self.counts.instance("refused")
            level = logging.ERROR if reason == Status.PROCESSING_FAILURE else logging.WARNING
            log.log(level, "STOW-RS instance refused: %s", exc,
                    exc_info=reason == Status.PROCESSING_FAILURE,
                    extra={"status": f"0x{reason:04X}", "sop_instance_uid": sop_instance})
            outcome.refuse(sop_class, sop_instance, reason)
            return
        outcome.keep(received.sop_class_uid, received.sop_instance_uid)
        if received.ignored_reason is None:
            (outcome.duplicates if received.duplicate else outcome.stored)[
                received.series_id] += 1
        self.counts.instance("duplicate" if received.duplicate else "ignored"
                             if received.ignored_reason is not None else "stored", spool.size)

    def _after_request(self, outcome: _Outcome, user: str | None) -> None:
        """A request that ended is what a released association is: a series it delivered
        whole may complete early; one it only sent again is noted, not processed again."""
        try:
            self.receiver.mark_released(outcome.stored)
            resent = Counter({series: count for series, count in outcome.duplicates.items()
                              if not outcome.stored[series]})
            self.receiver.note_duplicates(resent, source_of(user))
        except Exception:
            log.exception("could not record the end of a STOW-RS request")


def _refused(status: int, reason: str) -> Response:
    """A request refused whole (no part was read): the caller is told why, and so is the log."""
    log.warning("STOW-RS request refused: %s", reason, extra={"status": status})
    return Response.text(status, reason)


def _uids_of(spool: Spool) -> tuple[str, str]:
    """The SOP class and instance a refused part names in its File Meta Information, for
    the FailedSOPSequence ("" where it cannot be read)."""
    try:
        meta = read_file_meta_info(spool.path)
        return (str(meta.get("MediaStorageSOPClassUID", "")),
                str(meta.get("MediaStorageSOPInstanceUID", "")))
    except Exception:  # noqa: BLE001 - garbage: the failure says so
        return "", ""


def _answer(outcome: _Outcome) -> bytes:
    """The PS3.18 10.5.3 response dataset as DICOM JSON."""
    dataset = Dataset()
    dataset.ReferencedSOPSequence = DicomSequence(outcome.referenced)
    dataset.FailedSOPSequence = DicomSequence(outcome.failed)
    return dataset.to_json().encode("utf-8")


def _length(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _accepts_json(accept: str) -> bool:
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return any(t in (_DICOM_JSON, "application/json", "*/*", "application/*") for t in types)

