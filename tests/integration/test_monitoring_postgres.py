"""The queue collector on PostgreSQL (the scale-out database): stage latencies and outcomes
from job events, and the settle window that leaves the newest events for the next scrape
(a transaction may commit a lower event id after a higher one was read)."""

from __future__ import annotations

from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from denoised_node.daemon.web import probes
from denoised_node.daemon.web.metrics import QueueCollector
from denoised_node.storage.db import SessionFactory, make_engine, make_session_factory
from denoised_node.storage.models import Series, utcnow
from denoised_node.storage.queue import JobState, enqueue, transition
from denoised_node.storage.schema import upgrade
from tests.integration.postgres import postgres_server, postgres_url  # noqa: F401

S = JobState


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode())
            for s in f.samples}


def _job(sessions: SessionFactory, uid: str, start: datetime,
         steps: list[tuple[JobState, float]]) -> None:
    with sessions.begin() as session:
        series = Series(study_uid="1.2.3", series_uid=uid, state="receiving", revision=1,
                        queued_revision=0, instance_count=1,
                        first_received_at=start - timedelta(seconds=10), last_received_at=start)
        session.add(series)
        session.flush()
        job_id = enqueue(session, series, reason="complete", now=start).id
    state, moment = S.QUEUED, start
    for to_state, seconds in steps:
        moment += timedelta(seconds=seconds)
        with sessions.begin() as session:
            transition(session, job_id, state, to_state, reason="test", now=moment)
        state = to_state


def test_queue_collector_on_postgresql(postgres_url: str) -> None:  # noqa: F811
    engine = make_engine(postgres_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    registry = CollectorRegistry()
    registry.register(QueueCollector(sessions, settle_seconds=5.0))
    past = utcnow() - timedelta(hours=1)
    _job(sessions, "1.2.3.1", past, [(S.PROCESSING, 2), (S.PROCESSED, 30), (S.SENDING, 1),
                                     (S.DONE, 4)])
    _job(sessions, "1.2.3.2", utcnow(), [(S.PROCESSING, 0), (S.FAILED, 0)])  # too new yet
    found = _samples(registry)
    assert found[("denoised_node_stage_seconds_sum", (("stage", "end_to_end"),))] == 47
    assert found[("denoised_node_stage_seconds_count", (("stage", "queue_wait"),))] == 1
    assert found[("denoised_node_series_outcomes_total", (("outcome", "done"),))] == 1
    assert found[("denoised_node_series_outcomes_total", (("outcome", "failed"),))] == 0
    # The queue depth is read as it is now, settle window or not.
    assert found[("denoised_node_queue_jobs", (("state", "failed"),))] == 1
    assert probes.database(engine)().detail == "postgresql reachable"
    engine.dispose()
