"""What the job-event audit log says, for the status pages: seconds per stage for each job,
and the last hour's throughput and latency (storage.job_events measures them, for the metrics
too)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from denoised_node.daemon.jobs.queries import EventRow, JobRow, list_jobs
from denoised_node.storage.job_events import (
    LATENCY_STAGES,
    OUTCOMES,
    SERIES_OUTCOMES,
    latest_run,
    stage_durations,
)
from denoised_node.storage.models import Instance, Job, JobEvent, Series
from denoised_node.storage.queue import TERMINAL_STATES, EventKind

STAGE_LABELS = {"receive_to_complete": "receive", "queue_wait": "wait",
                "inference": "denoise", "send": "send", "end_to_end": "total"}
assert set(STAGE_LABELS) == set(LATENCY_STAGES)
_TERMINAL = {state.value for state in TERMINAL_STATES}


def stage_seconds(events: Iterable[EventRow], first_received_at: datetime) -> dict[str, float]:
    """Seconds per stage of the job's latest run (a replay's stages replace the old ones)."""
    return latest_run(stage_durations(events, first_received_at))


@dataclass(frozen=True)
class JobView:
    job: JobRow
    stages: dict[str, float]
    first_received_at: datetime

    @property
    def replayable(self) -> bool:
        return self.job.state in _TERMINAL


def events_by_job(session: Session, job_ids: Sequence[int]) -> dict[int, list[EventRow]]:
    found: dict[int, list[EventRow]] = defaultdict(list)
    if not job_ids:
        return found
    rows = session.scalars(select(JobEvent).where(JobEvent.job_id.in_(job_ids))
                           .order_by(JobEvent.id))
    for e in rows:
        found[e.job_id].append(EventRow.from_row(e))
    return found


def recent_jobs(session: Session, *, states: list[str] | None = None,
                limit: int = 50) -> list[JobView]:
    jobs = list_jobs(session, states=states, limit=limit)
    ids = [job.id for job in jobs]
    events = events_by_job(session, ids)
    received: dict[int, datetime] = {}
    if ids:
        received.update(session.execute(
            select(Job.id, Series.first_received_at).join(Series, Job.series_id == Series.id)
            .where(Job.id.in_(ids))).all())
    return [JobView(job, stage_seconds(events[job.id], received[job.id]), received[job.id])
            for job in jobs]


@dataclass(frozen=True)
class Spread:
    count: int
    median: float
    p90: float
    worst: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        ordered = sorted(values)

        def rank(q: float) -> float:  # the nearest-rank percentile
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(len(ordered), rank(0.5), rank(0.9), ordered[-1])


@dataclass(frozen=True)
class HourStats:
    since: datetime
    # Jobs that ended in the window: done, failed, ignored, superseded.
    ended: dict[str, int] = field(default_factory=dict)
    instances_received: int = 0
    instances_sent: int = 0  # derived instances of the jobs done in the window
    latency: dict[str, Spread] = field(default_factory=dict)  # over the jobs done

    @property
    def series_done(self) -> int:
        return self.ended.get("done", 0)


def last_hour(session: Session, now: datetime, window: timedelta = timedelta(hours=1),
              ) -> HourStats:
    since = now - window
    ended = dict.fromkeys(SERIES_OUTCOMES, 0)
    done_ids: set[int] = set()
    rows = session.execute(select(JobEvent.job_id, JobEvent.kind).where(
        JobEvent.at >= since, JobEvent.kind.in_([kind.value for kind in OUTCOMES]))).all()
    for job_id, kind in rows:
        ended[OUTCOMES[EventKind(kind)]] += 1
        if kind == EventKind.SENT:
            done_ids.add(job_id)
    received = session.scalar(select(func.count()).select_from(Instance)
                              .where(Instance.received_at >= since)) or 0
    latency: dict[str, list[float]] = defaultdict(list)
    sent = 0
    if done_ids:
        ids = sorted(done_ids)
        events = events_by_job(session, ids)
        jobs = session.execute(select(Job.id, Job.derived_count, Series.first_received_at)
                               .join(Series, Job.series_id == Series.id)
                               .where(Job.id.in_(ids))).all()
        for job_id, derived_count, first_received_at in jobs:
            sent += derived_count or 0
            for stage, value in stage_seconds(events[job_id], first_received_at).items():
                latency[stage].append(value)
    spreads = {stage: Spread.of(latency[stage]) for stage in LATENCY_STAGES if latency[stage]}
    return HourStats(since, ended, received, sent, spreads)
