"""Series completion: turn series that stopped receiving into queued jobs.

A series is complete when no instance arrived for ``series.idle_seconds``, or sooner
(``series.released_grace_seconds``) when one association delivered all of it, released
normally, and its instance numbers have no gaps. Instances arriving later raise the series'
revision, and the next pass queues it again: the derived series is then replaced.

Two `serve` processes on one database (failover) both run this. Each series is queued by
one of them only: a completer locks the candidate rows it takes and skips those another
holds (PostgreSQL), and queues a series with a conditional UPDATE on the revisions it read
(``enqueue_once``), so a completer that read a stale row queues nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from denoised_node.config.settings import SeriesSettings
from denoised_node.storage.db import SessionFactory, is_postgres
from denoised_node.storage.job_events import IgnoredAs
from denoised_node.storage.models import Instance, Job, Series, SeriesState, utcnow
from denoised_node.storage.queue import (
    JobState,
    enqueue_once,
    release_expired_leases,
    transition,
)

log = logging.getLogger(__name__)


def complete_idle_series(sessions: SessionFactory, settings: SeriesSettings,
                         now: datetime | None = None) -> list[int]:
    """Queue a job for every series that is complete now; returns the new job ids."""
    now = now or utcnow()
    idle_cutoff = now - timedelta(seconds=settings.idle_seconds)
    grace_cutoff = now - timedelta(seconds=settings.released_grace_seconds)
    queued: list[dict[str, object]] = []  # logged once committed, never for a failed commit
    with sessions.begin() as session:
        query = select(Series).where(
            Series.state == SeriesState.RECEIVING,
            Series.revision > Series.queued_revision,
            or_(Series.last_received_at <= idle_cutoff,
                and_(Series.released_at.is_not(None), Series.released_at <= grace_cutoff)),
        ).order_by(Series.last_received_at)
        if is_postgres(session):
            # Skip series that another completer, or a receiver adding an instance, holds.
            query = query.with_for_update(skip_locked=True)
        for series in session.scalars(query).all():
            idle = series.last_received_at <= idle_cutoff
            if not idle and not _gap_free(session, series):
                continue
            job = _queue(session, series, now, "idle" if idle else "released, no gaps")
            if job is not None:
                queued.append(job)
    for job in queued:
        log.info("series complete", extra=job)
    return [int(job["job_id"]) for job in queued]  # type: ignore[call-overload]


def _gap_free(session: Session, series: Series) -> bool:
    numbers = session.scalars(
        select(Instance.instance_number).where(Instance.series_id == series.id,
                                               Instance.ignored_reason.is_(None))
    ).all()
    if not numbers or any(n is None for n in numbers):
        return False
    unique = sorted(set(numbers))  # type: ignore[type-var]
    return unique[-1] - unique[0] + 1 == len(unique) == len(numbers)  # type: ignore[operator]


def _queue(session: Session, series: Series, now: datetime,
           signal: str) -> dict[str, object] | None:
    """Queue the series; what to log once committed (None: another completer queued it)."""
    usable = series.instance_count
    job = enqueue_once(session, series,
                       reason=f"series complete ({signal}), {usable} instance(s)", now=now)
    if job is None:
        log.debug("series queued by another completer", extra={"series_uid": series.series_uid})
        return None
    if usable == 0:
        reason = session.scalar(
            select(Instance.ignored_reason).where(Instance.series_id == series.id,
                                                  Instance.ignored_reason.is_not(None)).limit(1)
        ) or "no instances to denoise"
        arrived = session.scalar(select(func.count(Instance.id)).where(
            Instance.series_id == series.id)) or 0
        reason = f"{reason}: {arrived} instance(s) arrived, none to denoise"
        transition(session, job.id, JobState.QUEUED, JobState.IGNORED, reason=reason, now=now,
                   label=IgnoredAs.ON_RECEIPT)
        series.state = SeriesState.IGNORED
        series.ignored_reason = reason
    session.flush()  # the job's id
    return {"job_id": job.id, "series_uid": series.series_uid, "instances": usable,
            "signal": signal}


def next_due(sessions: SessionFactory, settings: SeriesSettings,
             now: datetime) -> datetime | None:
    """The next moment completion has something to do: a receiving series may complete, or a
    job's lease expires. None: nothing is receiving and no lease is held."""
    with sessions() as session:
        receiving = session.execute(select(Series.last_received_at, Series.released_at).where(
            Series.state == SeriesState.RECEIVING,
            Series.revision > Series.queued_revision)).all()
        lease = session.scalar(select(func.min(Job.lease_expires_at)).where(
            Job.state.in_([JobState.PROCESSING.value, JobState.SENDING.value])))
    moments = [m for m in (lease,) if m is not None]
    for last, released in receiving:
        moments.append(last + timedelta(seconds=settings.idle_seconds))
        early = released + timedelta(seconds=settings.released_grace_seconds) if released \
            else None
        if early is not None and early > now:  # one already past was not gap-free: idle decides
            moments.append(early)
    return min(moments, default=None)


class CompletionLoop(threading.Thread):
    """Runs completion and lease expiry when something may be due: at the next moment a
    series may complete or a lease expires, at once when the receiver pokes it, and every
    ``idle_wait`` seconds otherwise (series another process received, replays). An idle node
    so wakes a few times a minute instead of four times a second."""

    def __init__(self, sessions: SessionFactory, settings: SeriesSettings,
                 attempt_limits: Mapping[JobState, int],
                 interval: float = 0.25, idle_wait: float = 10.0,
                 on_queued: Callable[[list[int]], None] | None = None) -> None:
        super().__init__(name="completion", daemon=True)
        self.sessions = sessions
        self.settings = settings
        self.attempt_limits = attempt_limits  # a lost worker's lease counts against these
        self.interval = interval  # the shortest wait: instances arriving batch up
        self.idle_wait = idle_wait
        self.on_queued = on_queued
        self.stopping = threading.Event()
        self._poked = threading.Event()

    def poke(self) -> None:
        """Something arrived: look again soon (the Receiver calls this)."""
        self._poked.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                queued = complete_idle_series(self.sessions, self.settings)
                release_expired_leases(self.sessions, self.attempt_limits)
                if queued and self.on_queued is not None:
                    self.on_queued(queued)
                now = utcnow()
                due = next_due(self.sessions, self.settings, now)
                wait = self.idle_wait if due is None else min(
                    self.idle_wait, max(self.interval, (due - now).total_seconds()))
            except Exception:  # a database hiccup must not end completion
                log.exception("completion pass failed; retrying")
                wait = 2.0
            poked = self._poked.wait(wait)
            self._poked.clear()
            if poked and not self.stopping.is_set():
                self.stopping.wait(self.interval)  # let a burst of instances land first

    def stop(self) -> None:
        self.stopping.set()
        self._poked.set()
