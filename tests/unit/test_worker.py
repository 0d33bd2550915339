"""The worker loop (daemon/jobs/worker.py): claim, denoise, derive, send; retries, backoff,
stops and lost leases. The series are received and completed through the real code first."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.dicom.scu import SendError, SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.models import Job, JobEvent, Series, utcnow
from denoised_node.storage.queue import JobState
from denoised_node.storage.runtime import Runtime
from tests.fixtures.dicom_peer import loopback_scp
from tests.fixtures.node_state import job_states, receive_files
from tests.unit.conftest import ScaledDenoiser


class RecordingSender:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sent: list[list[Path]] = []

    def __call__(self, settings: Settings, destination: Destination,
                 files: Sequence[Path], progress: object = None) -> SendResult:
        if self.failures > 0:
            self.failures -= 1
            raise SendError(f"{destination.name}: association rejected")
        self.sent.append(list(files))
        return SendResult(destination.name, len(files))


def _worker(runtime: Runtime, denoiser, sender) -> Worker:  # type: ignore[no-untyped-def]
    return Worker(runtime.settings, runtime.sessions, runtime.store, denoiser,
                  worker_id="test-worker", sender=sender)


def _complete(runtime: Runtime) -> None:
    """Age every series past its idle time, then run completion at the real time."""
    with runtime.sessions.begin() as session:
        for series in session.scalars(select(Series)):
            series.last_received_at -= timedelta(minutes=5)
    assert complete_idle_series(runtime.sessions, runtime.settings.series)


def test_worker_denoises_and_sends_every_instance(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                 fake_denoiser) -> None:
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    sender = RecordingSender()
    assert _worker(runtime, fake_denoiser, sender).run(burst=True) == 1
    assert job_states(runtime) == ["done"]
    assert len(sender.sent) == 1 and len(sender.sent[0]) == len(mr_series.paths)
    refs = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID
            for p in sender.sent[0]}
    assert refs == set(mr_series.sop_instance_uids)
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.derived_count == len(mr_series.paths)
        assert job.model_identity == fake_denoiser.identity
        moves = [(e.from_state, e.to_state) for e in session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id))]
    assert moves == [(None, "queued"), ("queued", "processing"), ("processing", "processed"),
                     ("processed", "sending"), ("sending", "done")]


def test_send_failure_retries_then_succeeds(runtime: Runtime, mr_series, fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    sender = RecordingSender(failures=1)
    worker = _worker(runtime, fake_denoiser, sender)
    worker.run(burst=True)
    assert job_states(runtime) == ["processed"]  # waiting out its backoff
    with runtime.sessions.begin() as session:
        session.scalars(select(Job)).one().available_at = utcnow()
    worker.run(burst=True)
    assert job_states(runtime) == ["done"] and fake_denoiser.calls == 1
    with runtime.sessions() as session:  # it said 0 or the failures only: count them all
        assert session.scalars(select(Job)).one().send_attempts == 2


def test_a_retrying_send_shows_one_timing(runtime: Runtime, mr_series, fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    """The line read "... in 6 s ...; last error: ... (send attempt 4 of 20; retry in 11 s)"."""
    from denoised_node.daemon.jobs.job_status import AttemptLimits, job_status
    from denoised_node.daemon.jobs.queries import job_detail

    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    _worker(runtime, fake_denoiser, RecordingSender(failures=1)).run(burst=True)
    with runtime.sessions() as session:
        row, _ = job_detail(session, session.scalars(select(Job)).one().id)
    assert row.available_at is not None
    now = row.available_at - timedelta(seconds=41)  # a fixed moment: no flaky "due now"
    line = job_status(row, now, AttemptLimits.from_settings(runtime.settings)) or ""
    assert line.startswith("retrying: send attempt 2 of 20 in 41 s ("), line
    assert line.count(" s ") + line.count(" min ") == 1 and "retry in" not in line, line
    assert line.endswith("; last error: SendError: pacs: association rejected "
                         "(send attempt 1 of 20 failed)"), line


def test_send_fails_after_the_attempt_limit(settings_factory, mr_series_factory,  # type: ignore[no-untyped-def]
                                            fake_denoiser) -> None:
    from denoised_node.storage.runtime import open_runtime

    settings = settings_factory(send__max_attempts=1)
    runtime = open_runtime(settings, initialise_empty=True)
    receive_files(runtime, mr_series_factory(slices=2).paths)
    _complete(runtime)
    _worker(runtime, fake_denoiser, RecordingSender(failures=5)).run(burst=True)
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
    assert job.state == "failed" and "association rejected" in (job.reason or "")


class ExplodingDenoiser:
    identity = "boom"
    card = None

    def denoise(self, volume, progress=None, spacing=None):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: out of memory")


def test_processing_errors_retry_a_bounded_number_of_times(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    worker = _worker(runtime, ExplodingDenoiser(), RecordingSender())
    for _ in range(runtime.settings.worker.max_processing_attempts):
        with runtime.sessions.begin() as session:
            session.scalars(select(Job)).one().available_at = utcnow()
        worker.run(burst=True)
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
    assert job.state == "failed" and "out of memory" in (job.reason or "")
    assert job.processing_attempts == runtime.settings.worker.max_processing_attempts


def test_processing_and_sending_retry_with_their_own_backoff(settings_factory,  # type: ignore[no-untyped-def]
                                                             mr_series_factory,
                                                             fake_denoiser) -> None:
    from denoised_node.storage.runtime import open_runtime

    settings = settings_factory(worker__processing_backoff_base_seconds=1000,
                                worker__processing_backoff_max_seconds=1000,
                                send__backoff_base_seconds=10, send__backoff_max_seconds=10)
    runtime = open_runtime(settings, initialise_empty=True)
    receive_files(runtime, mr_series_factory(slices=2).paths)
    _complete(runtime)

    def waits() -> tuple[str, float, str]:
        with runtime.sessions() as session:
            job = session.scalars(select(Job)).one()
            return (job.state, (job.available_at - utcnow()).total_seconds(), job.reason or "")

    _worker(runtime, ExplodingDenoiser(), RecordingSender()).run(burst=True)
    state, wait, reason = waits()
    # Attempt 1 of processing waits in [base/2, base] of the processing settings.
    assert state == "queued" and 490 <= wait <= 1000, (wait, reason)
    assert "attempt 1 of 3" in reason
    with runtime.sessions.begin() as session:
        session.scalars(select(Job)).one().available_at = utcnow()
    _worker(runtime, fake_denoiser, RecordingSender(failures=1)).run(burst=True)
    state, wait, reason = waits()
    assert state == "processed" and 4 <= wait <= 10, (wait, reason)
    assert "send attempt 1 of 20" in reason
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert (job.processing_attempts, job.send_attempts) == (1, 1)


def test_missing_source_files_fail_with_a_clear_reason(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                      fake_denoiser) -> None:
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    for path in runtime.store.instances.rglob("*.dcm"):
        path.unlink()
    _worker(runtime, fake_denoiser, RecordingSender()).run(burst=True)
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
    assert job.state == "failed" and "missing" in (job.reason or "")


def test_stop_request_releases_nothing_when_idle(runtime: Runtime, fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    worker = _worker(runtime, fake_denoiser, RecordingSender())
    worker.request_stop()
    assert worker.run() == 0


def test_second_stop_returns_the_job_to_the_queue(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.jobs.worker import StopNow

    class Interrupted:
        identity = "x"
        card = None

        def denoise(self, volume, progress=None, spacing=None):  # type: ignore[no-untyped-def]
            raise StopNow()

    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    with pytest.raises(StopNow):
        _worker(runtime, Interrupted(), RecordingSender()).run()
    assert job_states(runtime) == ["queued"]


def test_configured_worker_id_gets_the_pid(settings_factory, fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    import os

    from denoised_node.storage.runtime import open_runtime

    settings = settings_factory(worker__worker_id="gpu-host-a")
    runtime = open_runtime(settings, initialise_empty=True)
    worker = Worker(settings, runtime.sessions, runtime.store, fake_denoiser)
    assert worker.worker_id == f"gpu-host-a:{os.getpid()}"


def test_lost_lease_before_sending_drops_the_job_quietly(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                         fake_denoiser, monkeypatch) -> None:
    from denoised_node.storage.queue import transition as real_transition

    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    worker = _worker(runtime, fake_denoiser, RecordingSender())
    original = worker._start_sending

    def taken_over(job):  # type: ignore[no-untyped-def]
        with runtime.sessions.begin() as session:  # another worker moved it first
            real_transition(session, job.id, JobState.PROCESSED, JobState.SENDING, worker="other")
        return original(job)

    monkeypatch.setattr(worker, "_start_sending", taken_over)
    assert worker.run(burst=True, max_jobs=1) == 1
    assert job_states(runtime) == ["sending"]


def _lose_the_worker(runtime: Runtime, owner: str) -> None:
    """A worker claims the job and dies with it (kill -9, out of memory): its lease runs out."""
    from denoised_node.storage.queue import claim

    assert claim(runtime.sessions, owner, 30) is not None
    with runtime.sessions.begin() as session:
        session.scalars(select(Job)).one().lease_expires_at = utcnow() - timedelta(seconds=1)


def test_a_lost_lease_counts_as_a_processing_attempt(runtime: Runtime, mr_series,  # type: ignore[no-untyped-def]
                                                     fake_denoiser) -> None:
    """Issue 29, item 5: a worker that dies with the job has made an attempt."""
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    _lose_the_worker(runtime, "gone:1")
    assert _worker(runtime, fake_denoiser, RecordingSender()).run(burst=True) == 1
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
        released = session.scalars(select(JobEvent.reason).where(
            JobEvent.kind == "released")).all()
    assert (job.state, job.processing_attempts) == ("done", 1)
    limit = runtime.settings.worker.max_processing_attempts
    assert released == [f"lease of gone:1 expired: the worker was lost (attempt 1 of {limit})"]


def test_a_series_that_keeps_killing_its_worker_fails_at_the_attempt_limit(  # type: ignore[no-untyped-def]
        settings_factory, mr_series, fake_denoiser, monkeypatch) -> None:
    from denoised_node.daemon.jobs import worker as worker_module
    from denoised_node.storage.runtime import open_runtime

    runtime = open_runtime(settings_factory(worker__max_processing_attempts=2),
                           initialise_empty=True)
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    sender = RecordingSender()
    _lose_the_worker(runtime, "gone:1")
    with monkeypatch.context() as patch:  # a pass that only returns the job to the queue
        patch.setattr(worker_module, "claim", lambda *args, **kwargs: None)
        _worker(runtime, fake_denoiser, sender).run(burst=True)
    _lose_the_worker(runtime, "gone:2")
    _worker(runtime, fake_denoiser, sender).run(burst=True)
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
    assert (job.state, job.processing_attempts) == ("failed", 2)
    assert job.reason == "lease of gone:2 expired: the worker was lost (attempt 2 of 2)"
    assert sender.sent == []


def _pacs(**attributes: object):  # type: ignore[no-untyped-def]
    """A storage SCP "PACS" on loopback taking MR (unless ``contexts`` says otherwise), with
    ``attributes`` set on its AE; yields its port."""
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    contexts = attributes.pop("contexts", [MRImageStorage])
    ae_title = str(attributes.pop("ae_title", "PACS"))
    return loopback_scp(ae_title, contexts, **attributes)  # type: ignore[arg-type]


def _send_to_port(settings_factory, mr_series, port: int) -> tuple[Runtime, Job]:  # type: ignore[no-untyped-def]
    """One series denoised and sent with the real SCU to PACS@127.0.0.1:port."""
    from denoised_node.daemon.dicom.scu import send_files
    from denoised_node.storage.runtime import open_runtime

    settings = settings_factory(node__acse_timeout=5, destinations=json.dumps(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]))
    runtime = open_runtime(settings, initialise_empty=True)
    receive_files(runtime, mr_series.paths)
    _complete(runtime)
    _worker(runtime, ScaledDenoiser(), send_files).run(burst=True)
    with runtime.sessions() as session:
        return runtime, session.scalars(select(Job)).one()


@pytest.mark.parametrize(("peer", "reason", "fix"), [
    ({"ae_title": "REALPACS", "require_called_aet": True}, "Called AE title not recognised",
     "ae_title of destination pacs"),
    ({"require_calling_aet": ["SCANNER"]}, "Calling AE title not recognised",
     "declare this node's AE title DENOISER in PACS"),
    ({"contexts": [Verification]}, "no presentation context accepted", "let PACS accept"),
], ids=["called-ae", "calling-ae", "no-context"])
def test_a_permanent_refusal_fails_the_job_at_once(settings_factory, mr_series, peer: dict,  # type: ignore[no-untyped-def,type-arg]
                                                  reason: str, fix: str) -> None:
    with _pacs(**peer) as port:
        runtime, job = _send_to_port(settings_factory, mr_series, port)
    assert job.state == "failed" and job.send_attempts == 1  # not 20 attempts over 45 min
    assert reason in (job.reason or "") and fix in (job.reason or "")
    assert "replay" in (job.reason or "")
    from denoised_node.daemon.jobs.queries import replay  # replayable, as any failed job

    with runtime.sessions.begin() as session:
        assert replay(session, job_id=job.id)[0].requeued


def test_a_refused_connection_is_retried(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.peers.tools import free_port

    runtime, job = _send_to_port(settings_factory, mr_series, free_port())
    assert job.state == "processed" and job.send_attempts == 1  # waiting out its backoff
    from denoised_node.daemon.jobs.queries import job_detail  # what `jobs show` and the page print

    with runtime.sessions() as session:
        row, events = job_detail(session, job.id)
    assert "association failed: connection refused" in (row.reason or "")
    assert "association failed: connection refused" in (events[-1].reason or "")
