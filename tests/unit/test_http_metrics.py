"""/metrics, /healthz and /readyz: the queue figures and stage latencies read from job events,
the SCP's counters, and the readiness report."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from denoised_node.config.settings import HttpSettings, Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.daemon.web import probes
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.metrics import QueueCollector, node_registry
from denoised_node.daemon.web.probes import CheckResult, Readiness
from denoised_node.storage.models import Series, utcnow
from denoised_node.storage.queue import JobState, enqueue, transition
from denoised_node.storage.runtime import Runtime, open_runtime

S = JobState


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _run_job(runtime: Runtime, uid: str, start: datetime, steps: list[tuple[JobState, float]],
             first_received_seconds_before: float = 10.0) -> int:
    """A series received from ``start - first_received...``, queued at ``start``, then moved
    through ``steps`` (state, seconds after the previous step)."""
    with runtime.sessions.begin() as session:
        series = Series(study_uid="1.2.3", series_uid=uid, state="receiving", revision=1,
                        queued_revision=0, instance_count=1,
                        first_received_at=start - timedelta(seconds=first_received_seconds_before),
                        last_received_at=start)
        session.add(series)
        session.flush()
        job_id = enqueue(session, series, reason="complete", now=start).id
    state, moment = S.QUEUED, start
    for to_state, seconds in steps:
        moment += timedelta(seconds=seconds)
        with runtime.sessions.begin() as session:
            transition(session, job_id, state, to_state, reason="test", now=moment)
        state = to_state
    return job_id


def test_stage_latencies_and_outcomes_come_from_job_events(runtime: Runtime) -> None:
    registry = CollectorRegistry()
    collector = QueueCollector(runtime.sessions)
    registry.register(collector)
    start = utcnow() - timedelta(hours=1)
    _run_job(runtime, "1.2.3.1", start, [(S.PROCESSING, 2), (S.PROCESSED, 30), (S.SENDING, 1),
                                         (S.DONE, 4)])
    # A retried one: processing fails once, waits in the queue again, then is sent.
    _run_job(runtime, "1.2.3.2", start, [(S.PROCESSING, 1), (S.QUEUED, 5), (S.PROCESSING, 3),
                                         (S.PROCESSED, 60), (S.SENDING, 0.5), (S.PROCESSED, 1),
                                         (S.SENDING, 20), (S.DONE, 2)])
    _run_job(runtime, "1.2.3.3", start, [(S.PROCESSING, 1), (S.IGNORED, 1)])
    _run_job(runtime, "1.2.3.4", start, [])  # still waiting

    found = samples(registry)

    def stage(name: str, suffix: str) -> float:
        return found[(f"denoised_node_stage_seconds_{suffix}", (("stage", name),))]

    assert stage("receive_to_complete", "count") == 4
    assert stage("receive_to_complete", "sum") == pytest.approx(40)
    assert stage("queue_wait", "count") == 4  # 2 + 1 + 3 + 1 (the retry waited 3 s)
    assert stage("queue_wait", "sum") == pytest.approx(2 + 1 + 3 + 1)
    assert stage("inference", "count") == 2
    assert stage("inference", "sum") == pytest.approx(90)
    assert stage("send", "count") == 2
    assert stage("send", "sum") == pytest.approx(4 + 2)  # the last attempt only
    assert stage("end_to_end", "count") == 2
    assert stage("end_to_end", "sum") == pytest.approx((10 + 37) + (10 + 92.5))
    inf = found[("denoised_node_stage_seconds_bucket", (("le", "+Inf"), ("stage", "inference")))]
    le60 = found[("denoised_node_stage_seconds_bucket", (("le", "60.0"), ("stage", "inference")))]
    le30 = found[("denoised_node_stage_seconds_bucket", (("le", "30.0"), ("stage", "inference")))]
    assert (le30, le60, inf) == (1, 2, 2)
    assert found[("denoised_node_series_outcomes_total", (("outcome", "done"),))] == 2
    assert found[("denoised_node_series_outcomes_total", (("outcome", "ignored"),))] == 1
    assert found[("denoised_node_series_outcomes_total", (("outcome", "failed"),))] == 0
    assert found[("denoised_node_series_outcomes_total", (("outcome", "superseded"),))] == 0
    assert found[("denoised_node_queue_jobs", (("state", "queued"),))] == 1
    assert found[("denoised_node_queue_jobs", (("state", "done"),))] == 2
    assert found[("denoised_node_queue_oldest_waiting_seconds", ())] >= 3600

    # The next scrape reads only the new events: nothing is counted twice.
    _run_job(runtime, "1.2.3.5", start, [(S.PROCESSING, 1), (S.FAILED, 1)])
    again = samples(registry)
    assert again[("denoised_node_stage_seconds_count", (("stage", "queue_wait"),))] == 5
    assert again[("denoised_node_series_outcomes_total", (("outcome", "failed"),))] == 1
    assert again[("denoised_node_series_outcomes_total", (("outcome", "done"),))] == 2
    # A fresh collector (a restarted node) rebuilds the same figures from the history.
    rebuilt = CollectorRegistry()
    rebuilt.register(QueueCollector(runtime.sessions))
    age = ("denoised_node_queue_oldest_waiting_seconds", ())
    rebuilt_samples = samples(rebuilt)
    assert rebuilt_samples.pop(age) == pytest.approx(again.pop(age), abs=5)
    assert rebuilt_samples == again


def test_a_superseded_job_is_its_own_outcome(runtime: Runtime) -> None:
    registry = CollectorRegistry()
    registry.register(QueueCollector(runtime.sessions))
    start = utcnow() - timedelta(minutes=5)
    _run_job(runtime, "1.2.5.1", start, [])
    with runtime.sessions.begin() as session:  # more instances arrived: queued again
        series = session.scalars(select(Series)).one()
        series.revision += 1
        enqueue(session, series, reason="complete again", now=start + timedelta(seconds=30))
    found = samples(registry)
    assert found[("denoised_node_series_outcomes_total", (("outcome", "superseded"),))] == 1
    assert found[("denoised_node_series_outcomes_total", (("outcome", "ignored"),))] == 0
    assert found[("denoised_node_queue_jobs", (("state", "queued"),))] == 1


def test_a_replayed_job_is_no_end_to_end_figure(runtime: Runtime) -> None:
    registry = CollectorRegistry()
    registry.register(QueueCollector(runtime.sessions))
    start = utcnow() - timedelta(minutes=5)
    _run_job(runtime, "1.2.4.1", start, [(S.PROCESSING, 1), (S.PROCESSED, 1), (S.SENDING, 1),
                                         (S.DONE, 1), (S.QUEUED, 100), (S.PROCESSING, 1),
                                         (S.PROCESSED, 1), (S.SENDING, 1), (S.DONE, 1)])
    found = samples(registry)
    assert found[("denoised_node_stage_seconds_count", (("stage", "end_to_end"),))] == 1
    assert found[("denoised_node_stage_seconds_count", (("stage", "inference"),))] == 2
    assert found[("denoised_node_series_outcomes_total", (("outcome", "done"),))] == 2


@pytest.fixture
def node_with_metrics(settings_factory: Callable[..., Settings]) -> Iterator[
        tuple[CollectorRegistry, int]]:
    settings = settings_factory(node__port=0, node__allowed_calling_ae_titles='["MOD"]')
    runtime = open_runtime(settings, initialise_empty=True)
    registry, counts = node_registry(runtime.sessions, postgres=False,
                                     gauges={"disk_free_bytes": ("free", lambda: 42.0)})
    listeners = start_scp(settings, Receiver(runtime.store, runtime.sessions, settings), counts)
    yield registry, listeners.port("plain")
    listeners.shutdown()


def test_scp_counts_instances_and_associations(node_with_metrics: tuple[CollectorRegistry, int],
                                               mr_series) -> None:  # type: ignore[no-untyped-def]
    registry, port = node_with_metrics
    ae = AE(ae_title="MOD")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISER")
    for path in mr_series.paths[:3] + mr_series.paths[:1]:
        assoc.send_c_store(path)
    assoc.release()
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(MRImageStorage)
    assert stranger.associate("127.0.0.1", port, ae_title="DENOISER").is_rejected
    found = samples(registry)
    outcome = "denoised_node_received_instances_total"
    assert found[(outcome, (("outcome", "stored"),))] == 3
    assert found[(outcome, (("outcome", "duplicate"),))] == 1
    assert found[(outcome, (("outcome", "refused"),))] == 0
    assert found[("denoised_node_received_bytes_total", ())] > 0
    associations = "denoised_node_associations_total"
    assert found[(associations, (("result", "accepted"), ("transport", "plain")))] == 1
    assert found[(associations, (("result", "rejected"), ("transport", "plain")))] == 1
    assert found[("denoised_node_disk_free_bytes", ())] == 42.0


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_http_endpoints(runtime: Runtime) -> None:
    registry, _ = node_registry(runtime.sessions, postgres=False)
    workers = {"ready": 0}
    readiness = Readiness([
        ("database", probes.database(runtime.engine)),
        ("model", probes.model_loaded(lambda: workers["ready"], 1)),
        ("disk", probes.disk(runtime.store, 0)),
        ("broken", lambda: (_ for _ in ()).throw(RuntimeError("boom"))),
    ])
    server = StatusServer(HttpSettings(port=0), registry, readiness).start()
    try:
        status, kind, body = _get(server.port, "/metrics")
        assert status == 200 and kind.startswith("text/plain; version=")
        assert "denoised_node_queue_jobs" in body and "denoised_node_stage_seconds" in body
        assert _get(server.port, "/healthz")[:2] == (200, "text/plain; charset=utf-8")
        status, kind, body = _get(server.port, "/readyz")
        report = json.loads(body)
        assert (status, kind, report["ready"]) == (503, "application/json", False)
        assert report["checks"]["database"] == {"ok": True, "detail": "sqlite reachable"}
        assert report["checks"]["model"]["ok"] is False
        assert report["checks"]["broken"] == {"ok": False, "detail": "RuntimeError: boom"}
        workers["ready"] = 1
        readiness.checks.pop()
        status, _, body = _get(server.port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert _get(server.port, "/other")[0] == 404
    finally:
        server.shutdown()


def test_disk_under_the_watermark_is_not_ready(runtime: Runtime) -> None:
    result = probes.disk(runtime.store, 2**40)()  # a petabyte
    assert not result.ok and "0xA700" in result.detail
    assert probes.model_loaded(lambda: 0, 0)() == CheckResult(
        True, "no local workers (worker.count = 0)")


def test_http_port_in_use_is_a_clear_error(runtime: Runtime) -> None:
    from denoised_node.config.settings import ConfigError

    registry, _ = node_registry(runtime.sessions, postgres=False)
    first = StatusServer(HttpSettings(port=0), registry, Readiness([]))
    try:
        with pytest.raises(ConfigError, match=r"cannot serve HTTP on 127\.0\.0\.1:\d+ "
                                              r"\(http\.host, http\.port\).*http\.enabled"):
            StatusServer(HttpSettings(port=first.port), registry, Readiness([]))
        with pytest.raises(ConfigError, match=r"cannot serve HTTP on no\.such\.host\.invalid"):
            StatusServer(HttpSettings(host="no.such.host.invalid", port=0), registry,
                         Readiness([]))
    finally:
        first.shutdown()
    try:
        ipv6 = StatusServer(HttpSettings(host="::1", port=0), registry, Readiness([])).start()
    except ConfigError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        with urllib.request.urlopen(f"http://[::1]:{ipv6.port}/healthz", timeout=10) as answer:
            assert answer.status == 200
    finally:
        ipv6.shutdown()
