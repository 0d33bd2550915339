"""Retention: remove the files of finished series, and later forget their rows, so neither the
disk nor the database grows without bound. Failed series are kept until replayed or purged
explicitly (`denoised-node purge --failed`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from denoised_node.storage.db import SessionFactory, is_postgres
from denoised_node.storage.files import FileStore, series_folder
from denoised_node.storage.models import (
    Instance,
    Job,
    JobEvent,
    SendAttempt,
    Series,
    SeriesState,
    utcnow,
)
from denoised_node.storage.queue import ACTIVE_STATES, JobState

log = logging.getLogger(__name__)

FINISHED = (JobState.DONE.value, JobState.IGNORED.value)


@dataclass(frozen=True)
class PurgeResult:
    series: int
    files: int


def _latest_jobs(session: Session) -> dict[int, Job]:
    newest = (select(Job.series_id, func.max(Job.id).label("job_id"))
              .group_by(Job.series_id).subquery())
    jobs = session.scalars(select(Job).join(newest, Job.id == newest.c.job_id)).all()
    return {job.series_id: job for job in jobs}


def _own_folder(series: Series) -> str:
    return series_folder(series.study_uid, series.series_uid)


def purgeable_files(session: Session, series: Series) -> int:
    """The received files purge_series would remove (a dry run's count)."""
    return sum(1 for path in session.scalars(select(Instance.path).where(
        Instance.series_id == series.id)) if path and path.startswith(_own_folder(series)))


def purge_series(session: Session, store: FileStore, series: Series, now: datetime) -> int:
    """Delete the series' received and derived files and its instance rows; keep the series
    and its jobs (the audit trail) with state purged. Returns the number of files removed."""
    removed = 0
    own_folder = _own_folder(series)
    for instance in session.scalars(select(Instance).where(Instance.series_id == series.id)):
        # Only files in the series' own folder: a row an older release left naming another
        # series' file must not take that file with it.
        if instance.path and instance.path.startswith(own_folder):
            store.remove(instance.path)
            removed += 1
    if series.study_uid and series.series_uid:
        store.remove_tree(store.instances / series.study_uid / series.series_uid)
    for job_id in session.scalars(select(Job.id).where(Job.series_id == series.id)):
        store.remove_tree(store.derived_dir(job_id))
    session.execute(delete(Instance).where(Instance.series_id == series.id))
    series.state = SeriesState.PURGED
    series.purged_at = now
    series.instance_count = 0
    return removed


def purge_finished(sessions: SessionFactory, store: FileStore, older_than: timedelta,
                   now: datetime | None = None, *, include_failed: bool = False,
                   series_uid: str | None = None, dry_run: bool = False) -> PurgeResult:
    """Purge series whose latest job finished (done or ignored; failed too when asked) before
    ``now - older_than`` and that received nothing since."""
    now = now or utcnow()
    cutoff = now - older_than
    states = FINISHED + ((JobState.FAILED.value,) if include_failed else ())
    purged = files = 0
    with sessions.begin() as session:
        latest = _latest_jobs(session)
        query = select(Series).where(Series.state != SeriesState.PURGED)
        if series_uid:
            query = query.where(Series.series_uid == series_uid)
        if is_postgres(session):
            # A second `serve` purging too, or a receiver adding a late instance, holds the
            # row: leave that series to the next pass (receive.py rewrites a file purged
            # under it, since it checks the file once it holds the row).
            query = query.with_for_update(skip_locked=True)
        for series in session.scalars(query):
            job = latest.get(series.id)
            if job is None or job.state not in states or JobState(job.state) in ACTIVE_STATES:
                continue
            finished = job.completed_at or job.updated_at
            if finished > cutoff or series.last_received_at > cutoff:
                continue
            if series.revision > series.queued_revision:
                continue  # new instances are waiting for completion
            purged += 1
            files += (purgeable_files(session, series) if dry_run
                      else purge_series(session, store, series, now))
        if dry_run:
            session.rollback()
    if purged and not dry_run:
        log.info("purged finished series", extra={"series": purged, "files": files})
    return PurgeResult(purged, files)


def forget_purged(sessions: SessionFactory, older_than: timedelta,
                  now: datetime | None = None) -> int:
    """Delete the rows (series, jobs, events, send attempts) of series purged before
    ``now - older_than``."""
    cutoff = (now or utcnow()) - older_than
    with sessions.begin() as session:
        series_ids = list(session.scalars(select(Series.id).where(
            Series.state == SeriesState.PURGED, Series.purged_at < cutoff)))
        if not series_ids:
            return 0
        job_ids = select(Job.id).where(Job.series_id.in_(series_ids))
        session.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
        session.execute(delete(SendAttempt).where(SendAttempt.job_id.in_(job_ids)))
        session.execute(delete(Job).where(Job.series_id.in_(series_ids)))
        session.execute(delete(Instance).where(Instance.series_id.in_(series_ids)))
        session.execute(delete(Series).where(Series.id.in_(series_ids)))
    log.info("forgot purged series", extra={"series": len(series_ids)})
    return len(series_ids)


_PATHS_PER_QUERY = 500  # bound parameters per IN list (SQLite's limit is higher)


def unindexed_files(sessions: SessionFactory, store: FileStore, older_than: timedelta,
                    now: datetime | None = None) -> list[str]:
    """Store-relative paths of the files under instances/ that no index row names and that
    are older than ``older_than`` (younger ones may be a write in progress, here or, on a
    shared store, on another host). Walks one series folder at a time; what to do with
    them is daemon/dicom/rescan.py's."""
    cutoff = ((now or utcnow()) - older_than).timestamp()
    found: list[str] = []
    for folder in store.series_folders():
        files = [store.relative(p) for p in store.dicom_files(folder)
                 if _modified_before(p, cutoff)]
        if not files:
            continue
        named: set[str] = set()
        with sessions() as session:
            for start in range(0, len(files), _PATHS_PER_QUERY):
                chunk = files[start:start + _PATHS_PER_QUERY]
                named.update(session.scalars(select(Instance.path).where(
                    Instance.path.in_(chunk))))
        found += [relative for relative in files if relative not in named]
    return found


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False
