"""What the series page shows, read from the database (one short session) and from one
stored header. Patient name, ID and birth date are read only when http.show_patient_data."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from denoised_node.daemon.jobs.queries import EventRow, JobRow, job_detail
from denoised_node.daemon.jobs.queries import NotFound as AdminNotFound
from denoised_node.daemon.web.activity import stage_seconds
from denoised_node.daemon.web.previews import PreviewInput
from denoised_node.storage.files import FileStore, InvalidUID, check_uid
from denoised_node.storage.models import Instance, Job, Series, SeriesState
from denoised_node.storage.queue import JobState

_WITH_DERIVED = {JobState.PROCESSED, JobState.SENDING, JobState.DONE, JobState.FAILED,
                 JobState.HELD}
_DESCRIPTIVE = ("SeriesDescription", "SeriesNumber", "Manufacturer", "MagneticFieldStrength")
PATIENT_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate")


@dataclass(frozen=True)
class SeriesFacts:
    id: int
    series_uid: str
    study_uid: str
    modality: str | None
    sop_class_uid: str | None
    state: str
    ignored_reason: str | None
    calling_ae_title: str | None
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    purged_at: datetime | None
    received_via: str | None = None  # STOW-RS and the HTTP user; None: C-STORE

    @property
    def sent_by(self) -> str:
        """The calling AE title (C-STORE), or "STOW-RS, user NAME"."""
        return self.received_via or self.calling_ae_title or "?"

    @property
    def purged(self) -> bool:
        return self.state == SeriesState.PURGED


@dataclass(frozen=True)
class SeriesPage:
    series: SeriesFacts
    jobs: list[JobRow]  # newest first
    job: JobRow | None  # the one shown
    events: list[EventRow]
    stages: dict[str, float]
    preview: PreviewInput | None  # None: nothing to draw (no job, or files purged)


class NotFound(AdminNotFound):
    """The page names a series or job that does not exist."""


def find_series_uid(session: Session, job_id: int) -> str:
    uid = session.scalar(select(Series.series_uid).join(Job, Job.series_id == Series.id)
                         .where(Job.id == job_id))
    if uid is None:
        raise NotFound(f"no job with id {job_id}")
    return uid


def load_series_page(session: Session, store: FileStore, series_uid: str,
                     job_id: int | None = None) -> SeriesPage:
    try:
        check_uid(series_uid, "SeriesInstanceUID")
    except InvalidUID:
        raise NotFound(f"{series_uid[:80]!r} is not a SeriesInstanceUID") from None
    series = session.scalar(select(Series).where(Series.series_uid == series_uid))
    if series is None:
        raise NotFound(f"no series {series_uid} on this node")
    facts = SeriesFacts(series.id, series.series_uid, series.study_uid, series.modality,
                        series.sop_class_uid, series.state, series.ignored_reason,
                        series.calling_ae_title, series.instance_count,
                        series.first_received_at, series.last_received_at, series.purged_at,
                        series.received_via)
    ids = list(session.scalars(select(Job.id).where(Job.series_id == series.id)
                               .order_by(Job.id.desc())))
    if job_id is not None and job_id not in ids:
        raise NotFound(f"job {job_id} is not a job of series {series_uid}")
    details = {i: job_detail(session, i) for i in ids}
    jobs = [details[i][0] for i in ids]
    if not ids:
        return SeriesPage(facts, [], None, [], {}, None)
    shown, events = details[job_id if job_id is not None else ids[0]]
    preview = None if facts.purged else preview_input(session, store, series, shown)
    return SeriesPage(facts, jobs, shown, events, stage_seconds(events, facts.first_received_at),
                      preview)


def preview_input(session: Session, store: FileStore, series: Series, job: JobRow,
                  ) -> PreviewInput:
    paths = session.scalars(select(Instance.path).where(
        Instance.series_id == series.id, Instance.ignored_reason.is_(None))
        .order_by(Instance.id)).all()
    version = f"{job.updated_at.isoformat()}|{series.revision}|{series.state}"
    source = tuple(store.path(p) for p in paths)
    state = JobState(job.state)
    refused = tuple(store.dicom_files(store.refused_dir(job.id)))
    if state == JobState.FAILED and refused:
        return PreviewInput(job.id, version, source, refused, refused=True)
    if state not in _WITH_DERIVED or not job.derived_count:
        return PreviewInput(job.id, version, source, None, _why_no_derived(job))
    derived = tuple(store.dicom_files(store.derived_dir(job.id)))
    if len(derived) != job.derived_count:
        return PreviewInput(job.id, version, source, None,
                            f"{len(derived)} of the job's {job.derived_count} derived files "
                            "are in the store (removed, or being written again).")
    return PreviewInput(job.id, version, source, derived)


def _why_no_derived(job: JobRow) -> str:
    state = JobState(job.state)
    if state in (JobState.QUEUED, JobState.PROCESSING):
        return f"The job is {state.value}: the pictures after denoising come once it is done."
    if state == JobState.IGNORED:
        return f"Nothing was denoised: {job.reason or 'ignored'}."
    if state == JobState.FAILED:
        return f"The job failed before writing a derived series: {job.reason or 'no reason'}."
    return "No derived series for this job."


def read_header(paths: tuple[Path, ...], show_patient_data: bool) -> dict[str, str]:
    """A few attributes of the series from its first readable file; patient ones only
    when allowed (they are never read otherwise)."""
    wanted = list(_DESCRIPTIVE) + (list(PATIENT_ATTRIBUTES) if show_patient_data else [])
    for path in paths[:3]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=wanted)
        except (OSError, InvalidDicomError):
            continue
        return {k: str(ds.get(k, "") or "") for k in wanted if ds.get(k) not in (None, "")}
    return {}
