"""Job event kinds: set by the queue's moves, backfilled on old databases, and read (never the
reason text) by stage_durations and outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from denoised_node.daemon.web.metrics import QueueCollector
from denoised_node.storage.db import make_engine
from denoised_node.storage.job_events import StageTime, latest_run, outcome_of, stage_durations
from denoised_node.storage.models import Job, JobEvent, Series, utcnow
from denoised_node.storage.queue import (
    EventKind,
    JobState,
    enqueue,
    kind_of_move,
    return_to_stage,
    transition,
)
from denoised_node.storage.runtime import Runtime
from denoised_node.storage.schema import alembic_config, upgrade
from tests.integration.postgres import postgres_server, postgres_url  # noqa: F401

T0 = datetime(2026, 3, 15, 10, 0, tzinfo=UTC)
K = EventKind


@dataclass(frozen=True)
class Ev:
    at: datetime
    to_state: str
    kind: str


def _events(*steps: tuple[float, str, EventKind]) -> list[Ev]:
    return [Ev(T0 + timedelta(seconds=s), state, kind.value) for s, state, kind in steps]


def test_stage_durations_of_a_fixed_event_list() -> None:
    events = _events((10, "queued", K.CREATED), (12, "processing", K.STARTED),
                     (13, "processing", K.NOTE),  # an instance arrived: no stage
                     (14, "queued", K.RETRY), (20, "processing", K.STARTED),
                     (50, "processed", K.DENOISED), (51, "sending", K.STARTED),
                     (52, "processed", K.RETRY), (60, "sending", K.STARTED),
                     (64, "done", K.SENT))
    assert stage_durations(events, T0) == [
        StageTime("receive_to_complete", 10, 0), StageTime("queue_wait", 2, 0),
        StageTime("queue_wait", 6, 0), StageTime("inference", 30, 0), StageTime("send", 4, 0),
        StageTime("end_to_end", 64, 0)]
    assert latest_run(stage_durations(events, T0)) == {
        "receive_to_complete": 10, "queue_wait": 6, "inference": 30, "send": 4,
        "end_to_end": 64}


def test_a_replay_is_a_new_run_without_an_end_to_end_figure() -> None:
    events = _events((10, "queued", K.CREATED), (11, "processing", K.STARTED),
                     (20, "failed", K.FAILED), (3600, "queued", K.REPLAYED),
                     (3602, "processing", K.STARTED), (3610, "processed", K.DENOISED),
                     (3611, "sending", K.STARTED), (3612, "done", K.SENT))
    times = stage_durations(events, T0)
    assert [t.run for t in times] == [0, 0, 1, 1, 1]
    assert "end_to_end" not in {t.stage for t in times}
    assert latest_run(times) == {"receive_to_complete": 10, "queue_wait": 2, "inference": 8,
                                 "send": 1}
    # Clocks of two hosts a little apart: never a negative time.
    assert stage_durations(_events((-1, "queued", K.CREATED)), T0) == [
        StageTime("receive_to_complete", 0.0, 0)]


def test_outcomes_come_from_kinds_only() -> None:
    assert [outcome_of(k) for k in (K.SENT, K.FAILED, K.IGNORED, K.REJECTED, K.SUPERSEDED)] == [
        "done", "failed", "ignored", "ignored", "superseded"]
    assert outcome_of(K.RETRY) is None and outcome_of(K.NOTE) is None


@pytest.mark.parametrize(("from_state", "to_state", "kind"), [
    (None, JobState.QUEUED, K.CREATED),
    (JobState.DONE, JobState.DONE, K.NOTE),
    (JobState.QUEUED, JobState.PROCESSING, K.STARTED),
    (JobState.PROCESSED, JobState.SENDING, K.STARTED),
    (JobState.PROCESSING, JobState.PROCESSED, K.DENOISED),
    (JobState.HELD, JobState.PROCESSED, K.APPROVED),
    (JobState.SENDING, JobState.PROCESSED, K.RETRY),
    (JobState.PROCESSING, JobState.QUEUED, K.RETRY),
    (JobState.SENDING, JobState.QUEUED, K.REQUEUED),
    (JobState.HELD, JobState.IGNORED, K.REJECTED),
    (JobState.PROCESSING, JobState.IGNORED, K.IGNORED),
    (JobState.FAILED, JobState.QUEUED, K.REPLAYED),
    (JobState.HELD, JobState.QUEUED, K.REPLAYED),
    (JobState.SENDING, JobState.DONE, K.SENT),
])
def test_a_move_has_a_kind_by_default(from_state: JobState | None, to_state: JobState,
                                      kind: EventKind) -> None:
    assert kind_of_move(from_state, to_state) == kind


def _series(runtime: Runtime, uid: str = "1.2.3.4") -> Series:
    with runtime.sessions.begin() as session:
        series = Series(study_uid="1.2.3", series_uid=uid, revision=1, queued_revision=0)
        session.add(series)
    return series


def test_the_queue_records_what_happened(runtime: Runtime) -> None:
    series_id = _series(runtime).id
    with runtime.sessions.begin() as session:
        first = enqueue(session, session.get_one(Series, series_id), reason="complete").id
    with runtime.sessions.begin() as session:
        series = session.get_one(Series, series_id)
        series.revision += 1
        second = enqueue(session, series, reason="complete again").id
        transition(session, second, JobState.QUEUED, JobState.PROCESSING, reason="claimed")
    with runtime.sessions.begin() as session:
        return_to_stage(session, second, JobState.PROCESSING, reason="lease lost")
    with runtime.sessions() as session:
        kinds = {job: [e.kind for e in session.scalars(
            select(JobEvent).where(JobEvent.job_id == job).order_by(JobEvent.id))]
            for job in (first, second)}
    assert kinds == {first: ["created", "superseded"],
                     second: ["created", "started", "released"]}


def test_an_ignored_job_is_not_superseded_whatever_its_reason_says(runtime: Runtime) -> None:
    from denoised_node.daemon.web.activity import last_hour

    series_id = _series(runtime).id
    with runtime.sessions.begin() as session:
        job = enqueue(session, session.get_one(Series, series_id), reason="complete").id
        transition(session, job, JobState.QUEUED, JobState.IGNORED,
                   reason="superseded by job 7 (a reason a person wrote)")
    with runtime.sessions() as session:
        ended = last_hour(session, utcnow()).ended
    assert ended["ignored"] == 1 and ended["superseded"] == 0
    collector = QueueCollector(runtime.sessions)
    list(collector.collect())
    assert collector._outcomes == {"done": 0, "failed": 0, "ignored": 1, "superseded": 0}


# Events as releases before 0006 wrote them (no kind): (from_state, to_state, reason).
OLD_EVENTS = [
    (None, "queued", "series complete (idle), 3 instance(s)", "created"),
    ("queued", "processing", "claimed", "started"),
    ("processing", "queued", "CUDA error: out of memory (attempt 1 of 3 failed)", "retry"),
    ("queued", "processing", "claimed", "started"),
    ("processing", "queued", "lease of host:12 expired", "released"),
    ("queued", "processing", "claimed", "started"),
    ("processing", "processed", "3 derived instance(s) in 1.0 s", "denoised"),
    ("processed", "processed", "instance 1.2.3 moved in", "note"),
    ("processed", "sending", "sending", "started"),
    ("sending", "processed", "association rejected (send attempt 1 of 20 failed)", "retry"),
    ("processed", "sending", "claimed", "started"),
    ("sending", "processed", "worker stopped; job released", "released"),
    ("processed", "sending", "claimed", "started"),
    ("sending", "queued", "2 of 3 derived files found; denoising again", "requeued"),
    ("queued", "processing", "claimed", "started"),
    ("processing", "held", "held for review", "held"),
    ("held", "processed", "approved by ana", "approved"),
    ("processed", "sending", "sending", "started"),
    ("sending", "done", "sent 3 to pacs", "sent"),
    ("done", "queued", "replayed by ana", "replayed"),
    ("queued", "processing", "claimed", "started"),
    ("processing", "held", "held for review", "held"),
    ("held", "ignored", "rejected by ana; nothing was sent", "rejected"),
    ("ignored", "queued", "replayed by ana", "replayed"),
    ("queued", "ignored", "superseded by job 2", "superseded"),
    ("processing", "ignored", "no pixel data", "ignored"),
    ("processing", "failed", "the gate refused", "failed"),
    ("processing", "queued", "worker host:9 is gone (node restarted)", "released"),
]


@pytest.mark.parametrize("engine_kind", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_the_migration_backfills_the_kind_of_old_events(tmp_path: Path, engine_kind: str,
                                                        request: pytest.FixtureRequest) -> None:
    url = (request.getfixturevalue("postgres_url") if engine_kind == "postgresql"
           else f"sqlite:///{tmp_path / 'old.db'}")
    engine = make_engine(url)
    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0005")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO series (id, study_uid, series_uid, state, revision, queued_revision, "
            "instance_count, first_received_at, last_received_at) "
            "VALUES (1, '1.2', '1.2.3', 'receiving', 1, 1, 3, :t, :t)"), {"t": T0})
        connection.execute(text(
            "INSERT INTO jobs (id, series_id, state, series_revision, processing_attempts, "
            "send_attempts, available_at, created_at, updated_at) "
            "VALUES (1, 1, 'failed', 1, 0, 0, :t, :t, :t)"), {"t": T0})
        for index, (from_state, to_state, reason, _) in enumerate(OLD_EVENTS):
            connection.execute(text(
                "INSERT INTO job_events (job_id, at, from_state, to_state, reason) "
                "VALUES (1, :at, :from_state, :to_state, :reason)"),
                {"at": T0 + timedelta(seconds=index), "from_state": from_state,
                 "to_state": to_state, "reason": reason})
    upgrade(engine)
    with engine.connect() as connection:
        kinds = connection.execute(text("SELECT kind FROM job_events ORDER BY id")).scalars()
        assert list(kinds) == [expected for *_, expected in OLD_EVENTS]
    # the column is required from now on
    with engine.begin() as connection, pytest.raises(IntegrityError):
        connection.execute(text("INSERT INTO job_events (job_id, at, to_state) "
                                "VALUES (1, :t, 'queued')"), {"t": T0})
    # Where the states tell, the backfill and the queue's default agree.
    for from_state, to_state, _, expected in OLD_EVENTS:
        if expected not in ("released", "superseded"):
            before = None if from_state is None else JobState(from_state)
            assert kind_of_move(before, JobState(to_state)) == expected
    with engine.connect() as connection:
        assert connection.execute(select(Job.state)).scalar() == "failed"
    engine.dispose()  # PostgreSQL: give the connections back to the server
