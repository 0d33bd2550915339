"""Keeping a received instance: check it, write it durably, index it, then say success.

This holds the receive logic without pynetdicom, so it can be tested without a network:
the SCP handler (scp.py) passes the spooled dataset (spool.py) here and answers what this
returns or raises.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from sqlalchemy import Connection, Engine, bindparam, case, insert, select, update
from sqlalchemy.exc import IntegrityError

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.dimse_status import (
    InstanceTooLarge,
    NotTheRequestedStudy,
    SeriesInOtherStudy,
    SOPClassMismatch,
    UnreadableDataset,
)
from denoised_node.daemon.dicom.spool import Spool
from denoised_node.storage.db import SessionFactory, make_engine
from denoised_node.storage.files import FileStore, InstanceUIDs, check_uid
from denoised_node.storage.images.derive import is_own_output
from denoised_node.storage.images.series import MR_SOP_CLASSES
from denoised_node.storage.models import Instance, Series, SeriesState, utcnow
from denoised_node.storage.queue import add_note
from denoised_node.storage.reasons import one_line
from denoised_node.storage.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    series_id: int
    sop_instance_uid: str
    duplicate: bool  # the same bytes were already kept: nothing written, nothing changed
    ignored_reason: str | None
    sop_class_uid: str = ""


class _StrictReader:
    """A stream that notices a short read: pydicom accepts truncated values silently."""

    # pydicom's delimiter scan (non-standard encapsulated data) reads 128-byte chunks and
    # expects a short last chunk, then retries once: neither of those reads means truncation.
    _SCAN_CHUNK = 128

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.truncated = False
        self._scan_retry = False
        # pydicom calls these once or more per element: bound once, not through __getattr__.
        self.tell = stream.tell
        self.seek = stream.seek

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def read(self, size: int | None = -1) -> bytes:
        start = self._stream.tell()
        data = self._stream.read(-1 if size is None else size)
        if size is None or size <= 0 or len(data) >= size:
            self._scan_retry = False
            return data
        if self._scan_retry or (size == self._SCAN_CHUNK and start > 0):
            self._scan_retry = not self._scan_retry
        elif not (size == 8 and not data):  # 8 bytes at the very end: the next tag, none left
            self.truncated = True
        return data


# Values longer than this (Pixel Data) are not read into memory to check an instance: their
# length is checked against the file's instead.
_DEFER_BYTES = 64 * 1024
_INFLATE_CHUNK = 1 << 20
# The File Meta Information of a deflated instance names its transfer syntax early on.
_META_PEEK_BYTES = 4096
_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode()


def parse_dataset(data: bytes, limit_bytes: int | None = None) -> Dataset:
    """``parse_file`` for bytes in memory."""
    return _parse(io.BytesIO(data), len(data), limit_bytes)


def instance_ignored_reason(ds: Dataset, sop_class: str, modalities: Sequence[str]) -> str | None:
    """Why the node keeps this instance out of its series (None: it is one to denoise)."""
    if is_own_output(ds):
        return "produced by denoised-node (never processed again)"
    if sop_class not in MR_SOP_CLASSES:
        return f"not an MR image ({UID(sop_class).name or sop_class})"
    modality = str(ds.get("Modality", "") or "")
    if modality not in modalities:
        return f"modality {modality or '(none)'} is not in series.modalities"
    return None


def parse_file(path: Path, limit_bytes: int | None = None) -> Dataset:
    """Parse and sanity-check a received instance; raise UnreadableDataset if it is cut
    short or corrupt (the sender gets a 0xC000 failure and can resend), InstanceTooLarge if
    a deflated dataset inflates past ``limit_bytes``. Large values stay on disk."""
    with path.open("rb") as stream:
        return _parse(stream, path.stat().st_size, limit_bytes)


def _parse(stream: BinaryIO, size: int, limit_bytes: int | None) -> Dataset:
    if limit_bytes is not None:
        _check_inflated_size(stream, limit_bytes)
    reader = _StrictReader(stream)
    try:
        ds = pydicom.dcmread(reader, force=True, defer_size=_DEFER_BYTES)
        ds.SOPInstanceUID  # noqa: B018 - make sure the core attributes convert
        ds.SOPClassUID  # noqa: B018
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise UnreadableDataset(f"not a readable DICOM dataset: {one_line(str(exc))}") from exc
    # A deferred value is skipped with a seek: past the end means it was cut short.
    if reader.truncated or stream.tell() > size:
        raise UnreadableDataset("the dataset is truncated (an element is shorter than its length)")
    _check_pixel_data_length(ds)
    return ds


def _check_inflated_size(stream: BinaryIO, limit_bytes: int) -> None:
    """pydicom inflates a deflated dataset whole, in memory: a megabyte can inflate to
    gigabytes. Inflate it here first, a chunk at a time, counting."""
    try:
        head = stream.read(_META_PEEK_BYTES)
        if head[128:132] != b"DICM" or _DEFLATED_UID not in head:
            return  # the common case: no meta parse (it would cost as much as the check)
        stream.seek(132)
        meta = _read_file_meta_info(stream)
    except Exception:  # noqa: BLE001 - unreadable meta: the parse says so
        return
    finally:
        position = stream.tell()
        stream.seek(0)
    if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
        return
    stream.seek(position)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    try:
        while chunk := stream.read(_INFLATE_CHUNK):
            while chunk:
                inflated += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                chunk = inflater.unconsumed_tail
                if inflated > limit_bytes:
                    raise InstanceTooLarge(
                        f"the deflated dataset inflates to more than node.max_instance_mb "
                        f"({limit_bytes // 2**20} MiB)")
    except zlib.error:
        pass  # corrupt deflate data: the parse refuses it
    finally:
        stream.seek(0)


def _check_pixel_data_length(ds: Dataset) -> None:
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID is None:
        return
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        return  # encapsulated: the fragments' delimiters were checked by the reader
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = (int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.BitsAllocated)) // 8
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnreadableDataset(f"image attributes are missing or invalid: {exc}") from exc
    element = ds.get_item("PixelData")
    # A zero-length value converts to None, not b"".
    length = element.length if isinstance(element, RawDataElement) else len(ds.PixelData or b"")
    if length < expected:
        raise UnreadableDataset(f"pixel data holds {length} bytes, the image needs {expected}")


# The per-image statements, built once: building them per call cost more than running them.
_SERIES_LOCKED = (select(Series.id, Series.study_uid)
                  .where(Series.series_uid == bindparam("series_uid")).with_for_update())
_SERIES_ROW_LOCKED = select(Series.id).where(Series.id == bindparam("row_id")).with_for_update()
_INSTANCE_BY_UID = (select(Instance.id, Instance.sha256, Instance.series_id,
                           Instance.ignored_reason, Instance.path)
                    .where(Instance.sop_instance_uid == bindparam("sop_uid")))
_PATH_IN_USE = select(Instance.id).where(Instance.path == bindparam("path")).limit(1)
_INSERT_INSTANCE = insert(Instance)
_UPDATE_INSTANCE = update(Instance).where(Instance.id == bindparam("row_id"))
# An arrival reopens a purged or ignored series: it is judged again on what it now holds
# (MR instances after a series went idle with only ignored ones are denoised).
_REOPENED = (SeriesState.PURGED, SeriesState.IGNORED)
_COUNT_IN_SERIES = update(Series).where(Series.id == bindparam("row_id")).values(
    revision=Series.revision + 1,
    instance_count=Series.instance_count + bindparam("added", type_=Series.instance_count.type),
    last_received_at=bindparam("now", type_=Series.last_received_at.type), released_at=None,
    state=case((Series.state.in_(_REOPENED), SeriesState.RECEIVING), else_=Series.state),
    ignored_reason=case((Series.state == SeriesState.IGNORED, None),
                        else_=Series.ignored_reason),
    purged_at=case((Series.state == SeriesState.PURGED, None), else_=Series.purged_at))


@dataclass(frozen=True)
class _Indexed:
    received: Received
    # A file no row names any more (the instance moved to another series, or is ignored
    # now): removed once the transaction is committed.
    stale_path: str = ""
    stale_series_id: int = 0


class Receiver:
    """Receives instances into the store and the index; one per SCP, shared by its threads."""

    def __init__(self, store: FileStore, sessions: SessionFactory, settings: Settings,
                 index_engine: Engine | None = None) -> None:
        self.store = store
        self.sessions = sessions
        self.settings = settings
        self.max_bytes = settings.node.max_instance_mb * 2**20
        # The per-image index update runs on a plain connection: no ORM session to build.
        # A serving node's commits it without waiting for the disk (for_node).
        self.engine: Engine = index_engine or sessions.kw["bind"]
        # Called after each instance and release: completion wakes on it instead of polling.
        self.on_activity: Callable[[], None] = _nothing


    @classmethod
    def for_node(cls, runtime: Runtime) -> Receiver:
        """A serving node's receiver. The file of each instance is on disk before its
        success status; its index commit is not waited for, because a power loss that
        undoes it leaves a file no row names, which rescan.py indexes again at start-up
        (docs/reliability.md). One fsync per image fewer."""
        settings = runtime.settings
        engine = make_engine(settings.database_url, echo=settings.database.echo,
                             synced_commits=False)
        return cls(runtime.store, runtime.sessions, settings, index_engine=engine)

    def receive(self, data: bytes, context_sop_class: str | None, calling_ae: str) -> Received:
        """``receive_spooled`` for bytes in memory (tools and tests)."""
        spool = Spool.of_bytes(self.store.incoming, self.max_bytes, data)
        try:
            return self.receive_spooled(spool, context_sop_class, calling_ae)
        finally:
            spool.discard()

    def receive_spooled(self, spool: Spool, context_sop_class: str | None,
                        calling_ae: str, *, source: str | None = None,
                        study_uid: str | None = None) -> Received:
        """Keep the instance received into ``spool`` (the caller discards the spool).
        ``source``: how it came when not over DIMSE (a new series records it: "STOW-RS ...");
        ``study_uid``: the study it must belong to (STOW-RS to /studies/{uid})."""
        try:
            received = self._receive_spooled(spool, context_sop_class, calling_ae, source,
                                             study_uid)
        finally:
            self.on_activity()
        return received

    def _receive_spooled(self, spool: Spool, context_sop_class: str | None,
                         calling_ae: str, source: str | None = None,
                         study_uid: str | None = None) -> Received:
        if spool.failure is not None:  # a full disk: 0xA700 (dimse_status.py)
            raise spool.failure
        if spool.too_large:
            raise InstanceTooLarge(
                f"instance of {spool.size // 2**20} MiB exceeds node.max_instance_mb "
                f"({self.settings.node.max_instance_mb})")
        ds = parse_file(spool.path, self.max_bytes)
        sop_class = str(ds.SOPClassUID)
        if context_sop_class and sop_class != context_sop_class:
            raise SOPClassMismatch(
                f"dataset SOP class {sop_class} differs from the presentation context's "
                f"{context_sop_class}")
        uids = InstanceUIDs(ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"),
                            ds.get("SOPInstanceUID"))
        sop_uid = uids.sop
        if study_uid is not None and uids.study != study_uid:
            raise NotTheRequestedStudy(f"instance {sop_uid} belongs to study {uids.study}, "
                                       f"not to {study_uid} that the request names")
        check_uid(sop_class, "SOPClassUID")
        ignored = instance_ignored_reason(ds, sop_class, self.settings.series.modalities)
        if ignored is None and "PixelData" not in ds:
            # An MR image IOD requires Pixel Data: without it the dataset was cut short at an
            # element boundary (nothing else tells), or is not an image. Never kept as one.
            raise UnreadableDataset("the MR image has no Pixel Data: the dataset is cut short "
                                    "or not an image; send it again")
        digest = spool.sha256

        relative = ""
        existed = False
        if ignored is None:
            relative = uids.relative_path  # checked once, above
            existed = self.store.path(relative).is_file()
            if existed:  # a resend of the same bytes is answered without writing anything;
                # _index asks again under the series lock, where another receiver may have won
                with self.engine.connect() as connection:
                    kept = connection.execute(_INSTANCE_BY_UID, {"sop_uid": sop_uid}).first()
                if kept is not None and kept.sha256 == digest:
                    return Received(kept.series_id, sop_uid, True, kept.ignored_reason,
                                    sop_class)
            self.store.check_space(spool.size)
            self.store.keep_received(spool.path, relative)
        else:
            self.store.check_space(0)
        try:
            indexed = self._index(ds, uids, sop_class, relative, spool, ignored, calling_ae,
                                  source)
        except Exception:
            # The index row is what makes a file count; without it a new file is not kept.
            if relative and not existed:
                self.store.remove(relative)
            raise
        if indexed.stale_path:
            self._remove_unreferenced(indexed.stale_path, indexed.stale_series_id)
        return indexed.received

    def _index(self, ds: Dataset, uids: InstanceUIDs, sop_class: str, relative: str,
               spool: Spool, ignored: str | None, calling_ae: str,
               source: str | None = None) -> _Indexed:
        """Add or update the instance row and count it in its series, in one transaction.
        Core statements, not the ORM: this runs once per received image.

        A SOP Instance UID belongs to one series. Arriving in another series (a PACS split
        or merged a series), the instance moves: its row and file go to the new series, the
        old series loses it (and is denoised again without it), and both series' jobs get a
        note of the move."""
        now = utcnow()
        sop_uid = uids.sop
        with self.engine.begin() as connection:
            series_id = self._series_for_update(connection, ds, uids, sop_class, calling_ae, now,
                                                source)
            if relative and not self.store.path(relative).is_file():
                # Retention purged the series, or a move took the file, between our write
                # and our lock: put it in place again (the spool is a second name of it).
                self.store.keep_received(spool.path, relative)
            digest = spool.sha256
            existing = connection.execute(_INSTANCE_BY_UID, {"sop_uid": sop_uid}).first()
            if existing is not None and existing.sha256 == digest:
                return _Indexed(Received(existing.series_id, sop_uid, True,
                                         existing.ignored_reason, sop_class))
            values = {
                "series_id": series_id, "sop_class_uid": sop_class,
                "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
                "instance_number": _int_or_none(ds.get("InstanceNumber")),
                "path": relative, "size_bytes": spool.size, "sha256": digest,
                "received_at": now, "ignored_reason": ignored,
            }
            counted = int(ignored is None)
            if existing is None:
                connection.execute(_INSERT_INSTANCE, {"sop_instance_uid": sop_uid, **values})
                connection.execute(_COUNT_IN_SERIES,
                                   {"row_id": series_id, "added": counted, "now": now})
                return _Indexed(Received(series_id, sop_uid, False, ignored, sop_class))
            connection.execute(_UPDATE_INSTANCE, {"row_id": existing.id, **values})
            was_counted = int(existing.ignored_reason is None)
            if existing.series_id == series_id:
                connection.execute(_COUNT_IN_SERIES, {"row_id": series_id,
                                                      "added": counted - was_counted, "now": now})
            else:
                self._record_move(connection, sop_uid, existing.series_id, series_id,
                                  uids.series, was_counted, counted, now)
            stale = existing.path if existing.path and existing.path != relative else ""
            return _Indexed(Received(series_id, sop_uid, False, ignored, sop_class), stale,
                            existing.series_id)

    def _record_move(self, connection: Connection, sop_uid: str, old_series_id: int,
                     new_series_id: int, new_series_uid: str, was_counted: int, counted: int,
                     now: datetime) -> None:
        old_series_uid = connection.scalar(select(Series.series_uid).where(
            Series.id == old_series_id))
        # The old series changed too: its revision rises, so it is denoised again without
        # the instance (a derived copy already sent stays in the PACS: the node deletes
        # nothing there).
        connection.execute(_COUNT_IN_SERIES, {"row_id": old_series_id, "added": -was_counted,
                                              "now": now})
        connection.execute(_COUNT_IN_SERIES, {"row_id": new_series_id, "added": counted,
                                              "now": now})
        note = f"instance {sop_uid} moved to series {new_series_uid} from series {old_series_uid}"
        for series_id in (old_series_id, new_series_id):
            add_note(connection, series_id, note, now)
        log.warning("instance moved to another series", extra={
            "sop_instance_uid": sop_uid, "series_uid": new_series_uid,
            "from_series_uid": old_series_uid})

    def _remove_unreferenced(self, relative: str, series_id: int) -> None:
        """Remove a file that no index row names after a commit, holding the lock of the
        series it was filed under: a receiver writing the same path again for that series
        either finds it gone under its own lock (and writes it again) or has indexed it,
        and then it stays. A crash before this leaves a stale copy, which rescan.py removes."""
        try:
            with self.engine.begin() as connection:
                connection.execute(_SERIES_ROW_LOCKED, {"row_id": series_id})
                if connection.execute(_PATH_IN_USE, {"path": relative}).first() is None:
                    self.store.remove(relative)
        except Exception:  # the instance was kept; the orphan is swept later
            log.exception("could not remove the file an instance left behind",
                          extra={"path": relative})

    def _series_for_update(self, connection: Connection, ds: Dataset, uids: InstanceUIDs,
                           sop_class: str, calling_ae: str, now: datetime,
                           source: str | None = None) -> int:
        # The row lock (PostgreSQL; SQLite serialises writers) makes concurrent receivers of
        # one series take turns: no lost revision or instance_count increment, and a
        # resent instance finds the other receiver's row instead of a unique violation.
        study_uid, series_uid = uids.study, uids.series
        found = connection.execute(_SERIES_LOCKED, {"series_uid": series_uid}).first()
        if found is not None:
            if found.study_uid != study_uid:
                raise SeriesInOtherStudy(
                    f"series {series_uid} is kept under study {found.study_uid}, not "
                    f"{study_uid}; a series belongs to one study")
            return int(found.id)
        try:
            with connection.begin_nested():
                return int(connection.execute(insert(Series).values(
                    study_uid=study_uid, series_uid=series_uid,
                    modality=str(ds.get("Modality", "") or "")[:16] or None,
                    sop_class_uid=sop_class, state=SeriesState.RECEIVING,
                    **_naming(ds), calling_ae_title=calling_ae[:16],
                    received_via=source[:80] if source else None, revision=0, queued_revision=0,
                    instance_count=0, first_received_at=now, last_received_at=now,
                ).returning(Series.id)).scalar_one())
        except IntegrityError:
            # Another association created it first (PostgreSQL; SQLite serialises writers).
            return self._series_for_update(connection, ds, uids, sop_class, calling_ae, now,
                                           source)

    def mark_released(self, delivered: Counter[int]) -> None:
        """An association released normally: a series whose every instance came in it may
        complete early (see completion.py)."""
        if not delivered:
            return
        now = utcnow()
        with self.sessions.begin() as session:
            for series_id, count in sorted(delivered.items()):  # lock order: no deadlock
                series = session.get(Series, series_id, with_for_update=True)
                if series is not None and series.instance_count == count:
                    series.released_at = now
        self.on_activity()

    def note_duplicates(self, resent: Counter[int], calling_ae: str) -> None:
        """An association sent these series' instances again, each byte for byte as kept
        (``resent``: series id -> instances): nothing changed, so nothing is processed. Say
        so in the log and in the series' latest job, with how to process it again."""
        now = utcnow()
        for series_id, count in sorted(resent.items()):
            with self.engine.begin() as connection:
                series_uid = connection.scalar(select(Series.series_uid).where(
                    Series.id == series_id))
                note = (f"duplicate delivery: {count} instance(s) sent again by {calling_ae} "
                        f"were already kept, byte for byte; nothing changed, so nothing is "
                        f"processed. To denoise and send it again: denoised-node replay "
                        f"--series {series_uid}")
                job_id = add_note(connection, series_id, note, now)
            log.warning("duplicate delivery: the series was sent again unchanged; "
                        "nothing to do (denoised-node replay --series to process it again)",
                        extra={"series_uid": series_uid, "instances": count,
                               "calling_ae": calling_ae, "job_id": job_id})


def _nothing() -> None:
    pass


def _naming(ds: Dataset) -> dict[str, object]:
    """What the pages and `jobs list` name a series by; no patient attribute is read."""
    date = str(ds.get("SeriesDate", "") or ds.get("StudyDate", "") or "")
    return {"description": str(ds.get("SeriesDescription", "") or "")[:64] or None,
            "series_number": _int_or_none(ds.get("SeriesNumber")),
            "series_date": date[:8] if len(date) >= 8 and date[:8].isdigit() else None}


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
