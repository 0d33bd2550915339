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
from denoised_node.storage.job_events import (
    LATENCY_STAGES,
    SERIES_OUTCOMES,
    IgnoredAs,
    gate_checks,
    ignored_as,
    outcome_of,
    stage_durations,
)
from denoised_node.storage.models import Job, JobEvent, SendAttempt, Series, SeriesState, utcnow
from denoised_node.storage.queue import EventKind, JobState, SendOutcome, counts_by_state

log = logging.getLogger(__name__)

# Why the connection guard (daemon/dicom/connection_guard.py) closed a connection.
DROP_KINDS = ("address", "per_address", "no_slot", "fair_share", "request_deadline",
              "read_timeout", "pdu_size", "message_size")

PREFIX = "denoised_node"
# Seconds, from a quick C-STORE to a large series waiting behind others on a CPU.
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
           3600.0, 7200.0, 21600.0)
INSTANCE_OUTCOMES = ("stored", "duplicate", "ignored", "refused")


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
    to_state: str
    kind: str
    first_received_at: datetime
    label: str | None = None


@dataclass
class _Tallies:
    """Counts by category, from the audit rows' labels and the send attempts."""

    ignored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IgnoredAs, 0))
    gate: dict[str, int] = field(default_factory=dict)  # by check
    attempts: dict[str, int] = field(default_factory=dict)  # by destination
    failures: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)

    def event(self, event: _Event) -> None:
        category = ignored_as(event.kind, event.label)
        if category is not None:
            self.ignored[category] += 1
        for check in gate_checks(event.kind, event.label):
            self.gate[check] = self.gate.get(check, 0) + 1

    def send(self, destination: str, outcome: str) -> None:
        self.attempts[destination] = self.attempts.get(destination, 0) + 1
        if outcome != SendOutcome.SENT:
            self.failures[destination] = self.failures.get(destination, 0) + 1
        if outcome == SendOutcome.RETRY:
            self.retries[destination] = self.retries.get(destination, 0) + 1

    def families(self) -> Iterator[Metric]:
        for name, documentation, label, counts in (
            ("series_ignored", f"Series ignored, by reason (a category: {', '.join(IgnoredAs)})",
             "reason", self.ignored),
            ("gate_refusals", ("Results the safety gate refused, by check that failed (a "
                               "refusal may fail several)"), "check", self.gate),
            ("send_attempts", "Send attempts (one association each), by destination",
             "destination", self.attempts),
            ("send_failures", "Send attempts that failed, by destination", "destination",
             self.failures),
            ("send_retries", ("Failed send attempts that the job retries after a backoff, "
                              "by destination"), "destination", self.retries),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=[label])
            for value, count in sorted(counts.items()):
                family.add_metric([str(value)], count)
            yield family


@dataclass
class _JobSoFar:
    """The events of a job not ended yet, and how many of its stage times were observed."""

    events: list[_Event] = field(default_factory=list)
    observed: int = 0


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
        self._send_cursor = 0
        self._tallies = _Tallies()
        self._jobs: dict[int, _JobSoFar] = {}
        self._outcomes = {name: 0 for name in SERIES_OUTCOMES}
        self._stages = {stage: _Histogram() for stage in LATENCY_STAGES}

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self._lock:
            self._catch_up(now)  # before the session below: SQLite sessions take the write lock
            outcomes = dict(self._outcomes)
            stages = {name: (h.buckets(), h.total) for name, h in self._stages.items()}
            tallies = list(self._tallies.families())
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
                                            f"{k}: {v}" for k, v in LATENCY_STAGES.items()),
                                        labels=["stage"])
        for name, (buckets, total) in stages.items():
            latency.add_metric([name], buckets, total)
        yield latency
        yield from tallies

    def _catch_up(self, now: datetime) -> None:
        cutoff = now - self.settle
        while True:
            with self.sessions() as session:
                rows = session.execute(
                    select(JobEvent.id, JobEvent.job_id, JobEvent.at, JobEvent.to_state,
                           JobEvent.kind, Series.first_received_at, JobEvent.label)
                    .join(Job, Job.id == JobEvent.job_id)
                    .join(Series, Series.id == Job.series_id)
                    .where(JobEvent.id > self._cursor, JobEvent.at <= cutoff)
                    .order_by(JobEvent.id).limit(self.BATCH)).all()
            for row in rows:
                self._follow(_Event(*row))
                self._cursor = row[0]
            if len(rows) < self.BATCH:
                break
        while True:
            with self.sessions() as session:
                sends = session.execute(
                    select(SendAttempt.id, SendAttempt.destination, SendAttempt.outcome)
                    .where(SendAttempt.id > self._send_cursor, SendAttempt.at <= cutoff)
                    .order_by(SendAttempt.id).limit(self.BATCH)).all()
            for send_id, destination, outcome in sends:
                self._tallies.send(destination, outcome)
                self._send_cursor = send_id
            if len(sends) < self.BATCH:
                return

    def _follow(self, event: _Event) -> None:
        """Observe the stages this event ends (storage.job_events measures them from the
        job's events so far) and, when it ends the job, its outcome."""
        self._tallies.event(event)
        if event.kind == EventKind.NOTE:
            return  # an event of the series, not of a stage
        job = self._jobs.setdefault(event.job_id, _JobSoFar())
        job.events.append(event)
        times = stage_durations(job.events, event.first_received_at)
        for time in times[job.observed:]:
            self._stages[time.stage].observe(time.seconds)
        job.observed = len(times)
        ended = outcome_of(event.kind)
        if ended is not None:
            self._outcomes[ended] += 1
            del self._jobs[event.job_id]  # a replay is measured as a run of its own


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
