"""Queue inspection and replay, shared by the CLI and the status page."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from denoised_node.storage.models import Instance, Job, JobEvent, Series, SeriesState, utcnow
from denoised_node.storage.progress import Progress
from denoised_node.storage.queue import (
    ACTIVE_STATES,
    STAGES,
    TERMINAL_STATES,
    WAITING_FOR_REVIEW,
    JobState,
    counts_by_state,
    enqueue,
    released,
    transition,
)


class AdminError(Exception):
    """An admin request names something that does not exist or cannot be done."""


class NotFound(AdminError):
    """The job, series or study named does not exist on this node."""


@dataclass(frozen=True)
class JobRow:
    id: int
    state: str
    series_uid: str
    study_uid: str
    modality: str | None
    instances: int
    created_at: datetime
    updated_at: datetime
    reason: str | None
    processing_attempts: int
    send_attempts: int
    derived_series_uid: str | None
    derived_count: int | None
    model_identity: str | None = None
    rule_name: str | None = None
    destinations: list[str] | None = None  # None: every destination that is not a shadow
    progress: Progress | None = None  # while a stage is in hand
    available_at: datetime | None = None  # a queued or processed job's next attempt
    series_description: str | None = None
    series_number: int | None = None
    series_date: str | None = None  # YYYY-MM-DD
    # Instances that arrived, those left out on receipt too (a CT routed with a study):
    # ``instances`` counts only the ones kept to denoise.
    arrived: int = 0
    # Who sent the series: "C-STORE from PACS", or "STOW-RS, user NAME" (series_source).
    source: str | None = None

    @property
    def series_name(self) -> str:
        """'MR 2026-11-25 #3 T1 AX': how people look a series up (no patient data)."""
        parts = [self.modality or "?", self.series_date or "",
                 "" if self.series_number is None else f"#{self.series_number}",
                 self.series_description or ""]
        return " ".join(p for p in parts if p)

    def as_json(self, now: datetime | None = None) -> dict[str, object]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["updated_at"] = self.updated_at.isoformat()
        data["progress"] = self.progress.as_json(now or utcnow()) if self.progress else None
        data["available_at"] = self.available_at.isoformat() if self.available_at else None
        data["series_name"] = self.series_name
        return data


@dataclass(frozen=True)
class EventRow:
    at: datetime
    from_state: str | None
    to_state: str
    worker: str | None
    reason: str | None
    kind: str  # storage.queue.EventKind: what happened (the reason says it to people)

    @classmethod
    def from_row(cls, event: JobEvent) -> EventRow:
        return cls(event.at, event.from_state, event.to_state, event.worker, event.reason,
                   event.kind)

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "at": self.at.isoformat()}


def _arrived(series_id: Any) -> Any:
    """How many instances of the series arrived (kept or left out), as a scalar subquery."""
    return (select(func.count(Instance.id)).where(Instance.series_id == series_id)
            .scalar_subquery())


def _row(job: Job, series: Series, arrived: int) -> JobRow:
    return JobRow(job.id, job.state, series.series_uid, series.study_uid, series.modality,
                  series.instance_count, job.created_at, job.updated_at, job.reason,
                  job.processing_attempts, job.send_attempts, job.derived_series_uid,
                  job.derived_count, job.model_identity, job.rule_name,
                  None if job.destinations is None else json.loads(job.destinations),
                  Progress.from_row(job), job.available_at, series.description,
                  series.series_number, _iso_date(series.series_date), arrived,
                  series_source(series.received_via, series.calling_ae_title))


def series_source(received_via: str | None, calling_ae_title: str | None) -> str | None:
    """How a series came, for people: its received_via (STOW-RS and the HTTP user), else
    the calling AE title of the association (C-STORE)."""
    if received_via:
        return received_via
    return f"C-STORE from {calling_ae_title.strip()}" if calling_ae_title else None


def _iso_date(value: str | None) -> str | None:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if value and len(value) == 8 else None


def status_summary(session: Session, now: datetime | None = None) -> dict[str, object]:
    now = now or utcnow()
    oldest = session.scalar(
        select(func.min(Job.created_at)).where(Job.state.in_([JobState.QUEUED.value,
                                                               JobState.PROCESSED.value])))
    receiving = session.scalar(
        select(func.count()).select_from(Series).where(
            Series.state == SeriesState.RECEIVING, Series.revision > Series.queued_revision))
    # Waiting for another attempt after a failure (a destination down, a CUDA error).
    retrying = session.scalar(
        select(func.count()).select_from(Job).where(or_(*(
            (Job.state == stage.back_to.value) & (getattr(Job, stage.attempts_column) > 0)
            for stage in STAGES.values()))))
    oldest_age = None
    if oldest is not None:
        oldest_age = round((now - oldest).total_seconds(), 1)
    return {"jobs": counts_by_state(session), "retrying": retrying or 0,
            "series_receiving": receiving or 0,
            "oldest_waiting_job_seconds": oldest_age}


def list_jobs(session: Session, *, states: list[str] | None = None,
              since: datetime | None = None, limit: int = 50) -> list[JobRow]:
    query = select(Job, Series, _arrived(Series.id)).join(Series, Job.series_id == Series.id)
    if states:
        query = query.where(Job.state.in_(states))
    if since:
        query = query.where(Job.updated_at >= since)
    rows = session.execute(query.order_by(Job.id.desc()).limit(limit)).all()
    return [_row(job, series, arrived) for job, series, arrived in rows]


def job_detail(session: Session, job_id: int) -> tuple[JobRow, list[EventRow]]:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}; `denoised-node jobs list` shows the jobs")
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                             .order_by(JobEvent.id)).all()
    arrived = session.scalar(select(func.count(Instance.id))
                             .where(Instance.series_id == job.series_id)) or 0
    return _row(job, job.series, arrived), [EventRow.from_row(e)
                                   for e in events]


@dataclass(frozen=True)
class ReplayOutcome:
    job_id: int | None
    series_uid: str
    requeued: bool
    message: str


def replay(session: Session, *, job_id: int | None = None, series_uid: str | None = None,
           study_uid: str | None = None, failed: bool = False, since: datetime | None = None,
           who: str = "admin") -> list[ReplayOutcome]:
    """Queue again the selected jobs (the latest job of each selected series)."""
    if job_id is not None:
        job = session.get(Job, job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id}; `denoised-node jobs list` shows the jobs")
        return [_replay_job(session, job, who)]
    if series_uid is not None:
        series = session.scalar(select(Series).where(Series.series_uid == series_uid))
        if series is None:
            raise NotFound(f"no series with SeriesInstanceUID {series_uid}; "
                           "`denoised-node jobs list` shows the stored ones")
        return [_replay_series(session, series, who)]
    if study_uid is not None:
        all_series = session.scalars(select(Series).where(Series.study_uid == study_uid)).all()
        if not all_series:
            raise NotFound(f"no series of study {study_uid} on this node")
        return [_replay_series(session, s, who) for s in all_series]
    if failed:
        query = select(Job).where(Job.state == JobState.FAILED.value)
        if since:
            query = query.where(Job.updated_at >= since)
        return [_replay_job(session, job, who) for job in session.scalars(query.order_by(Job.id))]
    raise AdminError("say what to replay: --job, --series, --study or --failed")


def _replay_series(session: Session, series: Series, who: str) -> ReplayOutcome:
    latest = session.scalar(select(Job).where(Job.series_id == series.id)
                            .order_by(Job.id.desc()).limit(1))
    if latest is None:
        _check_files_kept(series)
        job = enqueue(session, series, reason=f"replayed by {who}")
        return ReplayOutcome(job.id, series.series_uid, True, f"job {job.id} queued")
    return _replay_job(session, latest, who)


def _replay_job(session: Session, job: Job, who: str) -> ReplayOutcome:
    series = job.series
    state = JobState(job.state)
    if state in ACTIVE_STATES:
        return ReplayOutcome(job.id, series.series_uid, False, f"job {job.id} is already {state}")
    if series.state == SeriesState.PURGED:
        return ReplayOutcome(job.id, series.series_uid, False,
                             f"job {job.id}: the files of series {series.series_uid} were purged "
                             f"on {series.purged_at:%Y-%m-%d %H:%M}Z; send it again from the PACS")
    assert state in TERMINAL_STATES | WAITING_FOR_REVIEW
    if series.instance_count == 0:
        # Every instance was left out on receipt (a CT routed with a study, a SEG...): a
        # replay would only end ignored again, with a vaguer reason.
        return ReplayOutcome(job.id, series.series_uid, False,
                             f"job {job.id}: the series has no image to denoise "
                             f"({series.ignored_reason or job.reason or 'none kept'}); "
                             "not replayed")
    transition(session, job.id, state, JobState.QUEUED, worker=who, reason=f"replayed by {who}",
               processing_attempts=0, send_attempts=0, completed_at=None,
               **released(utcnow()))
    if series.state == SeriesState.IGNORED:
        series.state = SeriesState.RECEIVING
    return ReplayOutcome(job.id, series.series_uid, True, f"job {job.id} queued")


def _check_files_kept(series: Series) -> None:
    if series.state == SeriesState.PURGED:
        raise AdminError(f"the files of series {series.series_uid} were purged; "
                         "send it again from the PACS")


def review(session: Session, job_id: int, *, approve: bool, who: str) -> str:
    """Approve a held job (its derived series is sent to the rule's destinations) or reject it
    (nothing is sent). The CLI (`jobs approve|reject`) and the status page both call this."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}; `denoised-node jobs list` shows the jobs")
    if job.state != JobState.HELD:
        raise AdminError(f"job {job_id} is {job.state}, not held: only held jobs are "
                         "approved or rejected")
    if approve:
        transition(session, job_id, JobState.HELD, JobState.PROCESSED, worker=who,
                   reason=f"approved by {who}", **released(utcnow()))
        return f"job {job_id} approved: its derived series will be sent"
    transition(session, job_id, JobState.HELD, JobState.IGNORED, worker=who,
               reason=f"rejected by {who}; nothing was sent")
    return f"job {job_id} rejected: nothing was sent"
