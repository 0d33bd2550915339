"""The job queue, on SQLite and (marked integration) on a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from denoised_node.config.settings import Settings
from denoised_node.storage.db import make_engine, make_session_factory
from denoised_node.storage.models import Job, JobEvent, Series, utcnow
from denoised_node.storage.queue import (
    CLAIMABLE,
    STAGES,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    RetryPolicy,
    StaleState,
    after_failed_attempt,
    attempt_limits,
    backoff_seconds,
    claim,
    counts_by_state,
    enqueue,
    enqueue_once,
    release_expired_leases,
    renew_lease,
    transition,
)
from denoised_node.storage.runtime import Runtime, open_runtime
from denoised_node.storage.schema import upgrade
from tests.integration.postgres import postgres_server, postgres_url  # noqa: F401

ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=ENGINES)
def runtime(request: pytest.FixtureRequest,
            settings_factory: Callable[..., Settings]) -> Iterator[Runtime]:
    """The conftest's runtime, once on SQLite and once on a fresh PostgreSQL database."""
    if request.param == "postgresql":
        settings = settings_factory(database__url=request.getfixturevalue("postgres_url"))
    else:
        settings = settings_factory()
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    opened = open_runtime(settings)
    yield opened
    opened.engine.dispose()  # PostgreSQL: give the connections back to the server


def _series(runtime: Runtime, uid: str = "1.2.3.4") -> int:
    with runtime.sessions.begin() as session:
        series = Series(study_uid="1.2.3", series_uid=uid, state="receiving", revision=3,
                        queued_revision=0, instance_count=3)
        session.add(series)
        session.flush()
        return series.id


def _job(runtime: Runtime, series_id: int) -> int:
    with runtime.sessions.begin() as session:
        return enqueue(session, session.get_one(Series, series_id), reason="test").id


def test_every_state_has_transitions_and_terminal_states_only_requeue() -> None:
    assert set(TRANSITIONS) == set(JobState)
    for state in (JobState.DONE, JobState.FAILED, JobState.IGNORED):
        assert TRANSITIONS[state] == {JobState.QUEUED}


def test_transition_moves_and_audits(runtime: Runtime) -> None:
    job_id = _job(runtime, _series(runtime))
    with runtime.sessions.begin() as session:
        transition(session, job_id, JobState.QUEUED, JobState.PROCESSING, worker="w1",
                   reason="claimed")
    with runtime.sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state == "processing"
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
        assert [(e.from_state, e.to_state, e.worker) for e in events] == [
            (None, "queued", None), ("queued", "processing", "w1")]


def test_illegal_and_stale_moves_raise(runtime: Runtime) -> None:
    job_id = _job(runtime, _series(runtime))
    with runtime.sessions.begin() as session:
        with pytest.raises(IllegalTransition):
            transition(session, job_id, JobState.QUEUED, JobState.DONE)
        with pytest.raises(StaleState):
            transition(session, job_id, JobState.PROCESSING, JobState.PROCESSED)


def test_claim_takes_the_oldest_and_leases_it(runtime: Runtime) -> None:
    series_id = _series(runtime)
    first = _job(runtime, series_id)
    claimed = claim(runtime.sessions, "w1", 30)
    assert claimed is not None and claimed.id == first and claimed.stage == JobState.PROCESSING
    assert claim(runtime.sessions, "w2", 30) is None
    with runtime.sessions() as session:
        job = session.get_one(Job, first)
        assert job.lease_owner == "w1" and job.lease_expires_at > utcnow()


def test_claim_skips_a_job_another_transaction_holds(runtime: Runtime) -> None:
    if runtime.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises claimers (BEGIN IMMEDIATE) instead of skipping rows")
    first = _job(runtime, _series(runtime, "1.2.3.1"))
    second = _job(runtime, _series(runtime, "1.2.3.2"))
    with runtime.sessions.begin() as holder:
        holder.execute(select(Job).where(Job.id == first).with_for_update())
        claimed = claim(runtime.sessions, "w1", 30)  # does not wait for the holder
        assert claimed is not None and claimed.id == second
    again = claim(runtime.sessions, "w2", 30)
    assert again is not None and again.id == first


def test_new_job_supersedes_a_queued_one(runtime: Runtime) -> None:
    series_id = _series(runtime)
    old = _job(runtime, series_id)
    new = _job(runtime, series_id)
    with runtime.sessions() as session:
        assert session.get_one(Job, old).state == "ignored"
        assert session.get_one(Job, old).reason == f"superseded by job {new}"
        assert session.get_one(Job, new).state == "queued"


def test_expired_lease_returns_job_to_its_stage(runtime: Runtime) -> None:
    job_id = _job(runtime, _series(runtime))
    claimed = claim(runtime.sessions, "dead-worker", 30)
    assert claimed is not None
    limits = attempt_limits(runtime.settings)
    assert release_expired_leases(runtime.sessions, limits) == []
    later = utcnow() + timedelta(seconds=31)
    assert release_expired_leases(runtime.sessions, limits, later) == [job_id]
    assert not renew_lease(runtime.sessions, job_id, "dead-worker", 30)
    again = claim(runtime.sessions, "w2", 30, now=later)
    assert again is not None and again.id == job_id
    assert renew_lease(runtime.sessions, job_id, "w2", 30)


def test_sending_lease_expiry_returns_to_processed(runtime: Runtime) -> None:
    job_id = _job(runtime, _series(runtime))
    with runtime.sessions.begin() as session:
        transition(session, job_id, JobState.QUEUED, JobState.PROCESSING)
        transition(session, job_id, JobState.PROCESSING, JobState.PROCESSED)
    claimed = claim(runtime.sessions, "w1", 10)
    assert claimed is not None and claimed.stage == JobState.SENDING
    release_expired_leases(runtime.sessions, attempt_limits(runtime.settings),
                           utcnow() + timedelta(seconds=11))
    with runtime.sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.send_attempts) == ("processed", 1)  # a lost worker's attempt


def test_a_processed_job_stays_with_its_worker_while_its_lease_lives(runtime: Runtime) -> None:
    job_id = _job(runtime, _series(runtime))
    claimed = claim(runtime.sessions, "w1", 30)
    assert claimed is not None
    with runtime.sessions.begin() as session:  # w1 finished processing; it sends next
        transition(session, job_id, JobState.PROCESSING, JobState.PROCESSED, worker="w1")
    assert claim(runtime.sessions, "w2", 30) is None
    taken = claim(runtime.sessions, "w2", 30, now=utcnow() + timedelta(seconds=31))
    assert taken is not None and taken.stage == JobState.SENDING  # w1 died in between


def test_jobs_in_backoff_are_not_claimed(runtime: Runtime) -> None:
    job_id = _job(runtime, _series(runtime))
    with runtime.sessions.begin() as session:
        session.get_one(Job, job_id).available_at = utcnow() + timedelta(minutes=5)
    assert claim(runtime.sessions, "w1", 30) is None
    assert claim(runtime.sessions, "w1", 30, now=utcnow() + timedelta(minutes=6)) is not None


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    assert 1 <= backoff_seconds(1, 2, 600, rng) <= 2
    assert 8 <= backoff_seconds(4, 2, 600, rng) <= 16
    assert all(backoff_seconds(30, 2, 600, rng) <= 600 for _ in range(20))


def test_each_stage_starts_where_a_claim_takes_it_from() -> None:
    assert CLAIMABLE == {JobState.QUEUED: JobState.PROCESSING,
                         JobState.PROCESSED: JobState.SENDING}
    for stage in STAGES.values():
        assert stage.back_to in TRANSITIONS[stage.state]  # a retry or a release is legal
        assert JobState.FAILED in TRANSITIONS[stage.state]
        assert hasattr(Job, stage.attempts_column)


def test_a_failed_attempt_goes_back_to_the_start_of_its_stage_after_a_backoff() -> None:
    now = utcnow()
    policy = RetryPolicy(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=100)
    outcome = after_failed_attempt(STAGES[JobState.SENDING], 1, policy, "refused", now,
                                   random.Random(1))
    assert outcome.to_state == JobState.PROCESSED
    assert outcome.delay is not None and 10 <= outcome.delay <= 20  # attempt 2: base * 2
    assert outcome.values["send_attempts"] == 2
    assert outcome.values["available_at"] == now + timedelta(seconds=outcome.delay)
    assert outcome.values["lease_owner"] is None
    assert outcome.reason == "refused (send attempt 2 of 3 failed)"  # the wait: available_at


def test_the_last_failed_attempt_fails_the_job() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=100)
    outcome = after_failed_attempt(STAGES[JobState.PROCESSING], 2, policy, "CUDA error",
                                   utcnow())
    assert outcome.to_state == JobState.FAILED and outcome.delay is None
    assert outcome.values == {"processing_attempts": 3}
    assert outcome.reason == "CUDA error (attempt 3 of 3)"


def test_each_stage_reads_its_own_retry_settings(settings_factory: Callable[..., Settings],
                                                 ) -> None:
    settings = settings_factory(worker__max_processing_attempts=4,
                                worker__processing_backoff_base_seconds=7,
                                worker__processing_backoff_max_seconds=70,
                                send__max_attempts=9, send__backoff_base_seconds=1,
                                send__backoff_max_seconds=5)
    assert STAGES[JobState.PROCESSING].policy(settings) == RetryPolicy(4, 7, 70)
    assert STAGES[JobState.SENDING].policy(settings) == RetryPolicy(9, 1, 5)


def test_counts_by_state_lists_every_state(runtime: Runtime) -> None:
    _job(runtime, _series(runtime))
    with runtime.sessions() as session:
        counts = counts_by_state(session)
    assert counts["queued"] == 1 and counts["done"] == 0 and len(counts) == len(JobState)


def test_times_round_trip_as_aware_utc(runtime: Runtime) -> None:
    # The PostgreSQL test server runs in Europe/Paris: naive-UTC columns must not shift.
    moment = utcnow().replace(microsecond=123456)
    job_id = _job(runtime, _series(runtime))
    with runtime.sessions.begin() as session:
        session.get_one(Job, job_id).available_at = moment
    with runtime.sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.available_at == moment and job.available_at.tzinfo == UTC
        assert session.scalar(select(Job.id).where(Job.available_at <= moment)) == job_id
        assert session.scalar(select(Job.id).where(
            Job.available_at < moment - timedelta(microseconds=1))) is None


def test_enqueue_once_queues_nothing_on_a_stale_read(runtime: Runtime) -> None:
    series_id = _series(runtime)
    with runtime.sessions.begin() as session:
        series = session.get_one(Series, series_id)
        # Another completer queues the series after this one read the row.
        session.execute(update(Series).where(Series.id == series_id)
                        .values(queued_revision=Series.revision)
                        .execution_options(synchronize_session=False))
        assert enqueue_once(session, series, reason="test") is None
    with runtime.sessions.begin() as session:
        series = session.get_one(Series, series_id)
        series.revision += 1  # a late instance
    with runtime.sessions.begin() as session:
        job = enqueue_once(session, session.get_one(Series, series_id), reason="test")
        assert job is not None and job.series_revision == 4
    with runtime.sessions() as session:
        assert session.get_one(Series, series_id).queued_revision == 4
        assert len(session.scalars(select(Job)).all()) == 1


def _claim_all(url: str, worker: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    got = []
    while (job := claim(sessions, worker, 60)) is not None:
        got.append(job.id)
    engine.dispose()
    out.put(got)


def test_concurrent_claimers_take_each_job_once(runtime: Runtime, tmp_path: Path) -> None:
    ids = []
    for n in range(40):
        ids.append(_job(runtime, _series(runtime, f"1.2.3.{n}")))
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_claim_all, args=(runtime.settings.database_url, f"w{i}", out))
             for i in range(4)]
    for p in procs:
        p.start()
    claimed = [job for _ in procs for job in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == sorted(ids)
