"""The job queue: the state machine as data, leased claims, retries and the audit log.

Every move is a conditional UPDATE on (id, state) plus one JobEvent row in the same
transaction, so two processes can never both move the same job, and every move is recorded.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, or_, select, update
from sqlalchemy.orm import Session

from denoised_node.storage.db import SessionFactory, is_postgres
from denoised_node.storage.models import Job, JobEvent, SendAttempt, Series, utcnow
from denoised_node.storage.progress import CLEARED as PROGRESS_CLEARED

if TYPE_CHECKING:
    from denoised_node.config.settings import Settings

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    PROCESSED = "processed"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    IGNORED = "ignored"
    # Denoised, waiting for an administrator to approve (send) or reject it.
    HELD = "held"


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # ignored: superseded by a newer job for the same series.
    JobState.QUEUED: frozenset({JobState.PROCESSING, JobState.IGNORED, JobState.FAILED}),
    # queued: retry after a transient error or an expired lease; ignored: nothing to denoise;
    # held: the rule asks for review, or the gate refused and the rule holds refusals.
    JobState.PROCESSING: frozenset({JobState.PROCESSED, JobState.QUEUED, JobState.FAILED,
                                    JobState.IGNORED, JobState.HELD}),
    # processed: approved; ignored: rejected or superseded; queued: replayed.
    JobState.HELD: frozenset({JobState.PROCESSED, JobState.IGNORED, JobState.QUEUED}),
    # queued: replayed; ignored: superseded before it was sent.
    JobState.PROCESSED: frozenset({JobState.SENDING, JobState.QUEUED, JobState.IGNORED}),
    # processed: send retry after backoff, or an expired lease; queued: derived files lost.
    JobState.SENDING: frozenset({JobState.DONE, JobState.PROCESSED, JobState.FAILED,
                                 JobState.QUEUED}),
    JobState.DONE: frozenset({JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.IGNORED: frozenset({JobState.QUEUED}),
}


class EventKind(StrEnum):
    """What an audit row records, so that readers (stage durations, outcomes) never parse the
    reason text, which is for people."""

    CREATED = "created"  # a job for a completed series (or a series replayed)
    NOTE = "note"  # something happened to the series; the state did not change
    STARTED = "started"  # a stage began: claimed for processing, or sending began
    DENOISED = "denoised"  # processing -> processed: the derived series is written
    HELD = "held"  # waits for review
    APPROVED = "approved"  # held -> processed
    REJECTED = "rejected"  # held -> ignored
    SENT = "sent"  # sending -> done
    RETRY = "retry"  # an attempt failed; back to the start of its stage after a backoff
    RELEASED = "released"  # back to the start of its stage: lease expired, worker gone or stopped
    REQUEUED = "requeued"  # sending -> queued: the derived files were lost, denoise again
    FAILED = "failed"
    IGNORED = "ignored"  # nothing to denoise, or the rule ignores the series
    SUPERSEDED = "superseded"  # a newer job of the same series covers this one
    REPLAYED = "replayed"  # queued again by a person


class SendOutcome(StrEnum):
    """How one destination's part of a send attempt ended (a send_attempts row)."""

    SENT = "sent"
    RETRY = "retry"  # failed; the job retries the send after a backoff
    FAILED = "failed"  # failed; the job failed (a permanent refusal, or the last attempt)


def kind_of_move(from_state: JobState | None, to_state: JobState) -> EventKind:
    """The kind a move has unless its caller says otherwise (return_to_stage says RELEASED,
    enqueue SUPERSEDED)."""
    if from_state is None:
        return EventKind.CREATED
    if from_state == to_state:
        return EventKind.NOTE
    by_target = {JobState.FAILED: EventKind.FAILED, JobState.DONE: EventKind.SENT,
                 JobState.HELD: EventKind.HELD, JobState.PROCESSING: EventKind.STARTED,
                 JobState.SENDING: EventKind.STARTED}
    if to_state in by_target:
        return by_target[to_state]
    if to_state == JobState.PROCESSED:
        return {JobState.PROCESSING: EventKind.DENOISED,
                JobState.HELD: EventKind.APPROVED}.get(from_state, EventKind.RETRY)
    if to_state == JobState.IGNORED:
        return EventKind.REJECTED if from_state == JobState.HELD else EventKind.IGNORED
    # Queued again: a failed processing attempt, lost derived files, or a person's replay.
    return {JobState.PROCESSING: EventKind.RETRY,
            JobState.SENDING: EventKind.REQUEUED}.get(from_state, EventKind.REPLAYED)


ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.PROCESSING, JobState.PROCESSED,
                           JobState.SENDING})
TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.IGNORED})
# Neither: held jobs wait for a person, not a worker, and keep their derived files.
WAITING_FOR_REVIEW = frozenset({JobState.HELD})


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a stage is tried, and the exponential backoff between the tries."""

    max_attempts: int
    backoff_base_seconds: float
    backoff_max_seconds: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return backoff_seconds(attempt, self.backoff_base_seconds, self.backoff_max_seconds, rng)


@dataclass(frozen=True)
class Stage:
    """A stage a worker claims a job for. ``state``: the job's state while in hand;
    ``back_to``: where the stage begins, and where a retry, an expired lease or a stopped
    worker returns the job; ``attempts_column``: the job's count of failed attempts;
    ``attempt_noun``: how reasons and status lines name one; ``policy``: its retry settings."""

    state: JobState
    back_to: JobState
    attempts_column: str
    attempt_noun: str
    policy: Callable[[Settings], RetryPolicy]


def _processing_policy(settings: Settings) -> RetryPolicy:
    worker = settings.worker
    return RetryPolicy(worker.max_processing_attempts, worker.processing_backoff_base_seconds,
                       worker.processing_backoff_max_seconds)


def _send_policy(settings: Settings) -> RetryPolicy:
    send = settings.send
    return RetryPolicy(send.max_attempts, send.backoff_base_seconds, send.backoff_max_seconds)


STAGES: dict[JobState, Stage] = {stage.state: stage for stage in (
    Stage(JobState.PROCESSING, JobState.QUEUED, "processing_attempts", "attempt",
          _processing_policy),
    Stage(JobState.SENDING, JobState.PROCESSED, "send_attempts", "send attempt", _send_policy),
)}
# A claim moves a job from where a stage begins into the stage.
CLAIMABLE = {stage.back_to: stage.state for stage in STAGES.values()}


class QueueError(Exception):
    """A queue operation could not be done."""


class IllegalTransition(QueueError):
    """The state machine does not allow this move."""


class StaleState(QueueError):
    """The job was no longer in the expected state: another process moved it first."""


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    series_id: int
    stage: JobState  # PROCESSING or SENDING
    processing_attempts: int
    send_attempts: int
    worker: str


# A job's column values set in a transition's UPDATE (``transition(..., **values)``), of the
# columns' various types.
Columns = dict[str, Any]


def transition(
    session: Session,
    job_id: int,
    from_state: JobState,
    to_state: JobState,
    *,
    worker: str | None = None,
    reason: str | None = None,
    kind: EventKind | None = None,
    label: str | None = None,
    sends: Mapping[str, SendOutcome] | None = None,
    now: datetime | None = None,
    **values: object,
) -> None:
    """Move job ``job_id`` from ``from_state`` to ``to_state`` or raise.

    Extra ``values`` are set on the job in the same UPDATE; ``reason`` is recorded in the
    audit row and as the job's latest reason, ``kind`` (by default ``kind_of_move``) and
    ``label`` (job_events.EVENT_LABELS) in the audit row; ``sends`` (destination: outcome)
    as send_attempts rows, for a move that ends a send attempt. Raises ``IllegalTransition``
    for a move the table forbids and ``StaleState`` when the job is not in ``from_state``.
    """
    if to_state not in TRANSITIONS[from_state]:
        raise IllegalTransition(f"job {job_id}: {from_state} -> {to_state} is not allowed")
    now = now or utcnow()
    if to_state in TERMINAL_STATES:
        values.setdefault("completed_at", now)
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    columns: dict[str, object] = {"state": to_state.value, "updated_at": now, **values}
    if reason is not None:
        columns.setdefault("reason", reason)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == from_state.value)
        .values(**columns)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleState(f"job {job_id} is no longer {from_state}")
    session.add(
        JobEvent(job_id=job_id, at=now, from_state=from_state.value, to_state=to_state.value,
                 kind=(kind or kind_of_move(from_state, to_state)).value, worker=worker,
                 reason=reason, label=label)
    )
    for destination, outcome in (sends or {}).items():
        session.add(SendAttempt(job_id=job_id, at=now, destination=destination,
                                outcome=outcome.value))


def released(now: datetime, delay: float = 0.0) -> Columns:
    """The values of a job given back to the queue: no lease, claimable after ``delay`` s."""
    return {"lease_owner": None, "lease_expires_at": None,
            "available_at": now + timedelta(seconds=delay)}


def return_to_stage(session: Session, job_id: int, from_state: JobState, *, reason: str,
                    now: datetime | None = None, worker: str | None = None) -> None:
    """Give a leased job back to the start of its stage (STAGES): processing to queued,
    sending to processed; claimable at once."""
    now = now or utcnow()
    transition(session, job_id, from_state, STAGES[from_state].back_to, worker=worker,
               reason=reason, kind=EventKind.RELEASED, now=now, **released(now))


def attempt_limits(settings: Settings) -> dict[JobState, int]:
    """Each stage's attempt limit (its retry policy's): what a lost worker counts against."""
    return {state: stage.policy(settings).max_attempts for state, stage in STAGES.items()}


def release_lost(session: Session, job_id: int, from_state: JobState, attempts_before: int,
                 limit: int, *, reason: str, now: datetime) -> JobState:
    """A job whose worker was lost with it (lease expired, process gone: killed, out of
    memory, the watchdog) goes back to the start of its stage at once, and the loss counts
    as a failed attempt of the stage: a series that kills its worker fails at the limit
    with the reason instead of looping for ever. Returns the state it was moved to."""
    stage = STAGES[from_state]
    attempts = attempts_before + 1
    counted = f"{reason} ({stage.attempt_noun} {attempts} of {limit})"
    counts: Columns = {stage.attempts_column: attempts}
    if attempts >= limit:
        transition(session, job_id, from_state, JobState.FAILED, reason=counted, now=now,
                   **counts)
        return JobState.FAILED
    transition(session, job_id, from_state, stage.back_to, reason=counted,
               kind=EventKind.RELEASED, now=now, **released(now), **counts)
    return stage.back_to


@dataclass(frozen=True)
class AfterFailure:
    """Where a failed attempt leaves a job: ``to_state`` with ``values``; ``delay`` is None
    when the attempt limit is reached (failed), else the seconds until the next attempt."""

    to_state: JobState
    reason: str
    values: Columns
    delay: float | None


def after_failed_attempt(stage: Stage, attempts_before: int, policy: RetryPolicy, reason: str,
                         now: datetime, rng: random.Random | None = None) -> AfterFailure:
    """The move after an attempt of ``stage`` failed (``attempts_before`` failed earlier):
    back to the start of the stage after a backoff, or failed at the policy's limit."""
    attempts, limit = attempts_before + 1, policy.max_attempts
    counted = f"{stage.attempt_noun} {attempts} of {limit}"
    if attempts >= limit:
        return AfterFailure(JobState.FAILED, f"{reason} ({counted})",
                            {stage.attempts_column: attempts}, None)
    delay = policy.delay(attempts, rng)
    # The wait is not in the reason: available_at holds it, and the status line says it
    # counting down (a stored "retry in 11 s" beside it read as a second timing).
    return AfterFailure(stage.back_to, f"{reason} ({counted} failed)",
                        {**released(now, delay), stage.attempts_column: attempts}, delay)


def add_note(connection: Connection | Session, series_id: int, reason: str,
             now: datetime) -> int | None:
    """Record something that happened to a series (an instance moved in or out) in its latest
    job's audit log, as an event that changes no state (from_state == to_state). Returns the
    job's id; None when the series has no job yet."""
    latest = connection.execute(select(Job.id, Job.state).where(Job.series_id == series_id)
                                .order_by(Job.id.desc()).limit(1)).first()
    if latest is None:
        return None
    connection.execute(insert(JobEvent).values(job_id=latest.id, at=now, from_state=latest.state,
                                               to_state=latest.state, kind=EventKind.NOTE.value,
                                               reason=reason))
    return int(latest.id)


def enqueue(session: Session, series: Series, *, reason: str, now: datetime | None = None) -> Job:
    """Create a queued job for the series at its current revision; older jobs of the series
    that have not started a stage are superseded (ignored), since the new one covers them."""
    now = now or utcnow()
    superseded = session.scalars(
        select(Job).where(Job.series_id == series.id,
                          Job.state.in_([JobState.QUEUED, JobState.PROCESSED, JobState.HELD]))
    ).all()
    job = Job(series_id=series.id, state=JobState.QUEUED.value, series_revision=series.revision,
              available_at=now, created_at=now, updated_at=now)
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, at=now, from_state=None, to_state=JobState.QUEUED.value,
                         kind=EventKind.CREATED.value, reason=reason))
    for old in superseded:
        transition(session, old.id, JobState(old.state), JobState.IGNORED,
                   reason=f"superseded by job {job.id}", kind=EventKind.SUPERSEDED, now=now)
    series.queued_revision = series.revision
    return job


def enqueue_once(session: Session, series: Series, *, reason: str,
                 now: datetime | None = None) -> Job | None:
    """Queue the series as ``enqueue`` does, unless another process (a second `serve` on the
    same database) queued it, or an instance arrived, since this session read the row.

    The claim on the series is a conditional UPDATE of queued_revision on the revisions read,
    like a job transition: of two completers, exactly one matches a row and queues the job;
    on PostgreSQL the loser waits for the winner's commit, then matches nothing. None means
    the series was not queued by this call.
    """
    result = session.execute(
        update(Series)
        .where(Series.id == series.id, Series.revision == series.revision,
               Series.queued_revision == series.queued_revision)
        .values(queued_revision=series.revision)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.expire(series)
        return None
    return enqueue(session, series, reason=reason, now=now)


def claim(sessions: SessionFactory, worker: str, lease_seconds: float,
          now: datetime | None = None) -> ClaimedJob | None:
    """Claim the next available job (queued to process, or processed to send) with a lease.

    A processed job keeps the lease of the worker that processed it, which goes on to send
    it; it becomes claimable when that lease expires (the worker died in between).

    PostgreSQL skips rows locked by other claimers; SQLite serialises writers (BEGIN
    IMMEDIATE), and the conditional UPDATE makes a lost race harmless either way.
    """
    for _ in range(5):
        now = now or utcnow()
        with sessions.begin() as session:
            query = (
                select(Job.id, Job.state)
                .where(Job.state.in_(list(CLAIMABLE)), Job.available_at <= now,
                       # A live lease on a claimable job: its worker moved it from processing
                       # to processed and is about to send it; not another worker's to take.
                       or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now))
                .order_by(Job.available_at, Job.id)
                .limit(1)
            )
            if is_postgres(session):
                query = query.with_for_update(skip_locked=True)
            row = session.execute(query).first()
            if row is None:
                return None
            from_state = JobState(row.state)
            stage = CLAIMABLE[from_state]
            try:
                transition(session, row.id, from_state, stage, worker=worker, reason="claimed",
                           now=now, lease_owner=worker,
                           lease_expires_at=now + timedelta(seconds=lease_seconds),
                           **PROGRESS_CLEARED)
            except StaleState:
                continue
            job = session.get_one(Job, row.id)
            return ClaimedJob(id=job.id, series_id=job.series_id, stage=stage,
                              processing_attempts=job.processing_attempts,
                              send_attempts=job.send_attempts, worker=worker)
        now = None
    return None


def next_available(sessions: SessionFactory) -> datetime | None:
    """When the next waiting job (queued or processed) becomes claimable; None: none waits."""
    with sessions() as session:
        return session.scalar(select(func.min(Job.available_at)).where(
            Job.state.in_(list(CLAIMABLE))))


def renew_lease(sessions: SessionFactory, job_id: int, worker: str, lease_seconds: float) -> bool:
    """Extend a held lease; False means the lease was lost (expired and reclaimed)."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == worker,
                   Job.state.in_([JobState.PROCESSING.value, JobState.SENDING.value]))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1  # type: ignore[attr-defined]


def release_expired_leases(sessions: SessionFactory, limits: Mapping[JobState, int],
                           now: datetime | None = None) -> list[int]:
    """Jobs whose worker stopped renewing its lease go back to the start of their stage, the
    loss counted as an attempt (release_lost; ``limits``: attempt_limits), or fail at the
    limit. Returns the ids of the jobs moved."""
    now = now or utcnow()
    moved: list[tuple[int, JobState]] = []
    with sessions.begin() as session:
        # Every worker and completer calls this: on PostgreSQL each one locks the rows it
        # returns and skips those another holds, so two never wait on each other (in id
        # order, which also rules out a deadlock between two that lock in turn).
        query = (select(Job.id, Job.state, Job.lease_owner, Job.processing_attempts,
                        Job.send_attempts)
                 .where(Job.state.in_(list(STAGES)), Job.lease_expires_at < now)
                 .order_by(Job.id))
        if is_postgres(session):
            query = query.with_for_update(skip_locked=True)
        for row in session.execute(query).all():
            from_state = JobState(row.state)
            attempts = getattr(row, STAGES[from_state].attempts_column)
            try:
                to_state = release_lost(session, row.id, from_state, attempts, limits[from_state],
                                        reason=f"lease of {row.lease_owner} expired: the worker "
                                               "was lost", now=now)
            except StaleState:
                continue
            moved.append((row.id, to_state))
    for job_id, to_state in moved:
        if to_state == JobState.FAILED:
            log.error("lease expired at the attempt limit, job failed", extra={"job_id": job_id})
        else:
            log.warning("lease expired, job returned to the queue", extra={"job_id": job_id})
    return [job_id for job_id, _ in moved]


def backoff_seconds(attempt: int, base: float, cap: float,
                    rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": uniform in [c/2, c] for c = min(cap,
    base * 2**(attempt-1)), so retries of many series spread out but never come early."""
    ceiling = min(cap, base * (2 ** min(max(attempt - 1, 0), 62)))
    return (rng or random).uniform(ceiling / 2, ceiling)


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {state.value: 0 for state in JobState}
    counts.update({state: n for state, n in rows})
    return counts
