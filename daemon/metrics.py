"""Prometheus metrics: SCP counters kept in this process, and queue figures read from the
database when Prometheus scrapes.

Workers are other processes (on PostgreSQL, maybe other hosts), so what they do is read
from the job-event audit log, which holds every state change with its time: the collector
follows it with a cursor, so a scrape reads only the events since the last one, and the
stage latency histograms are built from those events. After a restart the histograms are
rebuilt from the history still in the database.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from denoised_node.storage.db import SessionFactory
from denoised_node.storage.models import Job, JobEvent, Series, SeriesState, utcnow
from denoised_node.storage.queue import TERMINAL_STATES, JobState, counts_by_state, is_note

log = logging.getLogger(__name__)

# Why the connection guard (daemon/connection_guard.py) closed a connection.
DROP_KINDS = ("address", "per_address", "request_deadline", "read_timeout", "pdu_size")

PREFIX = "denoised_node"
# Seconds, from a quick C-STORE to a large series waiting behind others on a CPU.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
           3600.0, 7200.0, 21600.0)
STAGES = {
    "receive_to_complete": "first instance received to series complete (job queued)",
    "queue_wait": "job queued (or requeued) to claimed by a worker",
    "inference": "claimed to derived series written (load, denoise, gate, write)",
    "send": "sending started to the last destination's success",
    "end_to_end": "first instance received to the derived series sent",
}
INSTANCE_OUTCOMES = ("stored", "duplicate", "ignored", "refused")
# How a job ends; "superseded": newer instances queued the series again before it started.
SERIES_OUTCOMES = ("done", "failed", "ignored", "superseded")
SUPERSEDED_REASON = "superseded by job"  # storage/queue.py's enqueue() says so


class ScpMetrics:
    """What the SCP counts (scp.ScpCounts): instances by outcome, associations by result."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._instances = Counter(f"{PREFIX}_received_instances",
                                  "Instances the SCP answered, by outcome (refused: a failure "
                                  "status was sent)", ["outcome"], registry=registry)
        self._bytes = Counter(f"{PREFIX}_received_bytes", "Bytes of instances stored",
                              registry=registry)
        self._associations = Counter(f"{PREFIX}_associations",
                                     "Association requests, by result (accepted, rejected by "
                                     "access control, TLS handshake failed, connection "
                                     "dropped by the guard and why) and transport",
                                     ["result", "transport"], registry=registry)
        for outcome in INSTANCE_OUTCOMES:
            self._instances.labels(outcome)
        for result in ("accepted", "rejected", *(f"dropped_{kind}" for kind in DROP_KINDS)):
            for transport in ("plain", "tls"):
                self._associations.labels(result, transport)
        self._associations.labels("handshake_failed", "tls")

    def instance(self, outcome: str, size: int = 0) -> None:
        self._instances.labels(outcome).inc()
        if outcome == "stored":
            self._bytes.inc(size)

    def association(self, result: str, transport: str) -> None:
        self._associations.labels(result, transport).inc()


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)  # clocks of several hosts may disagree a little
        self.total += seconds
        self.count += 1
        for index, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[index] += 1

    def buckets(self) -> list[tuple[str, float]]:
        return [(_bound(b), float(c)) for b, c in zip(BUCKETS, self.counts)] + [
            ("+Inf", float(self.count))]


def _bound(value: float) -> str:
    return repr(float(value))


@dataclass(frozen=True)
class _Event:
    id: int
    job_id: int
    at: datetime
    from_state: str | None
    to_state: str
    reason: str | None
    first_received_at: datetime


class QueueCollector(Collector):
    """Queue depth, outcomes and stage latencies, from the database at scrape time.

    ``settle_seconds``: events younger than this are left for the next scrape. SQLite
    serialises writers, so event ids grow in commit order (0 will do); on PostgreSQL a
    transaction may commit a lower id after a higher one was read, so give it a few seconds.
    """

    BATCH = 5000

    def __init__(self, sessions: SessionFactory, settle_seconds: float = 0.0) -> None:
        self.sessions = sessions
        self.settle = timedelta(seconds=settle_seconds)
        self._lock = threading.Lock()
        self._cursor = 0
        self._entered: dict[int, dict[str, datetime]] = {}
        self._outcomes = {outcome: 0 for outcome in SERIES_OUTCOMES}
        self._stages = {stage: _Histogram() for stage in STAGES}

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self._lock:
            self._catch_up(now)  # before the session below: SQLite sessions take the write lock
            outcomes = dict(self._outcomes)
            stages = {name: (h.buckets(), h.total) for name, h in self._stages.items()}
        with self.sessions() as session:
            depth = counts_by_state(session)
            oldest = session.scalar(select(func.min(Job.available_at)).where(
                Job.state == JobState.QUEUED.value, Job.available_at <= now))
            receiving = session.scalar(select(func.count()).select_from(Series).where(
                Series.state == SeriesState.RECEIVING,
                Series.revision > Series.queued_revision)) or 0
        queue = GaugeMetricFamily(f"{PREFIX}_queue_jobs", "Jobs by state", labels=["state"])
        for state, count in sorted(depth.items()):
            queue.add_metric([state], count)
        yield queue
        yield GaugeMetricFamily(f"{PREFIX}_queue_oldest_waiting_seconds",
                                "Age of the oldest job waiting for a worker (0: none)",
                                value=(now - oldest).total_seconds() if oldest else 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_series_receiving",
                                "Series receiving instances, not complete yet", value=receiving)
        series = CounterMetricFamily(f"{PREFIX}_series_outcomes",
                                     "Series (jobs) that ended: done (sent), failed, ignored "
                                     "(nothing to denoise), superseded (queued again)",
                                     labels=["outcome"])
        for outcome, count in sorted(outcomes.items()):
            series.add_metric([outcome], count)
        yield series
        latency = HistogramMetricFamily(f"{PREFIX}_stage_seconds",
                                        "Time spent per stage; " + "; ".join(
                                            f"{k}: {v}" for k, v in STAGES.items()),
                                        labels=["stage"])
        for name, (buckets, total) in stages.items():
            latency.add_metric([name], buckets, total)
        yield latency

    def _catch_up(self, now: datetime) -> None:
        cutoff = now - self.settle
        while True:
            with self.sessions() as session:
                rows = session.execute(
                    select(JobEvent.id, JobEvent.job_id, JobEvent.at, JobEvent.from_state,
                           JobEvent.to_state, JobEvent.reason, Series.first_received_at)
                    .join(Job, Job.id == JobEvent.job_id)
                    .join(Series, Series.id == Job.series_id)
                    .where(JobEvent.id > self._cursor, JobEvent.at <= cutoff)
                    .order_by(JobEvent.id).limit(self.BATCH)).all()
            for row in rows:
                self._follow(_Event(*row))
                self._cursor = row[0]
            if len(rows) < self.BATCH:
                return

    def _follow(self, event: _Event) -> None:
        if is_note(event.from_state, event.to_state):
            return  # an event of the series, not a stage
        entered = self._entered.setdefault(event.job_id, {})
        to_state, at = event.to_state, event.at
        if event.from_state is None:  # the job was created: its series just completed
            self._observe("receive_to_complete", at - event.first_received_at)
            entered["first_received"] = event.first_received_at
        if to_state == JobState.PROCESSING and "queued" in entered:
            self._observe("queue_wait", at - entered["queued"])
        elif to_state == JobState.PROCESSED and event.from_state == JobState.PROCESSING:
            self._observe("inference", at - entered.get("processing", at))
        elif to_state == JobState.DONE:
            if "sending" in entered:
                self._observe("send", at - entered["sending"])
            if "first_received" in entered:  # a replay is no end-to-end figure
                self._observe("end_to_end", at - entered["first_received"])
        entered[to_state] = at
        if to_state in {state.value for state in TERMINAL_STATES}:
            superseded = (to_state == JobState.IGNORED
                          and (event.reason or "").startswith(SUPERSEDED_REASON))
            self._outcomes["superseded" if superseded else to_state] += 1
            del self._entered[event.job_id]

    def _observe(self, stage: str, elapsed: timedelta) -> None:
        self._stages[stage].observe(elapsed.total_seconds())


def node_registry(sessions: SessionFactory, *, postgres: bool,
                  gauges: dict[str, tuple[str, Callable[[], float]]] | None = None,
                  ) -> tuple[CollectorRegistry, ScpMetrics]:
    """A registry of its own (tests start many nodes in one process): the SCP's counters,
    the queue collector, and ``gauges`` (name: (help, read function)) of this process."""
    registry = CollectorRegistry()
    scp = ScpMetrics(registry)
    registry.register(QueueCollector(sessions, settle_seconds=5.0 if postgres else 0.0))
    for name, (documentation, read) in (gauges or {}).items():
        Gauge(f"{PREFIX}_{name}", documentation, registry=registry).set_function(read)
    return registry, scp
