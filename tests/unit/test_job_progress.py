"""Stage progress: the worker records slices denoised and instances sent on the job, at a
bounded rate, and `jobs list|show` and the pages say how far it is and how long is left."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.job_status import AttemptLimits, job_status
from denoised_node.daemon.jobs.queries import JobRow, list_jobs
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.models import Job, Series, utcnow
from denoised_node.storage.progress import Progress, ProgressRecorder
from denoised_node.storage.queue import JobState, claim, transition
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _queued_job(runtime: Runtime, paths: Sequence[Path]) -> int:
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    with runtime.sessions.begin() as session:
        session.scalars(select(Series)).one().last_received_at -= timedelta(minutes=5)
    (job_id,) = complete_idle_series(runtime.sessions, runtime.settings.series)
    return job_id


def _status(runtime: Runtime) -> str | None:
    with runtime.sessions() as session:
        (row,) = list_jobs(session)
    return job_status(row, utcnow(), AttemptLimits.from_settings(runtime.settings))


class SliceBySlice:
    """Reports each slice, and looks at what `jobs list` says halfway."""

    identity = "unit-test-model-1"

    class card:  # noqa: N801
        name = "unit-test"
        version = "1.0"

    def __init__(self, look: Callable[[], str | None]) -> None:
        self.look = look
        self.seen: list[str | None] = []

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        for index in range(len(volume)):
            if progress:
                progress(index + 1, len(volume))
            if index + 1 == len(volume) // 2:
                self.seen.append(self.look())
        return volume.astype(np.float32)


class ReportingSender:
    def __init__(self, look: Callable[[], str | None]) -> None:
        self.look = look
        self.seen: list[str | None] = []

    def __call__(self, settings: Settings, destination: Destination, files: Sequence[Path],
                 progress: Callable[[int, int], None] | None = None) -> SendResult:
        for index in range(len(files)):
            assert progress is not None
            progress(index + 1, len(files))
            if index + 1 == 3:
                self.seen.append(self.look())
        return SendResult(destination.name, len(files))


def test_worker_records_slices_denoised_and_instances_sent(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.storage.db import make_engine
    from denoised_node.storage.runtime import open_runtime
    from denoised_node.storage.schema import upgrade

    settings = settings_factory(
        worker__progress_interval_seconds=0,
        destinations='[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}]',
    )
    upgrade(make_engine(settings.database_url))
    runtime = open_runtime(settings)
    _queued_job(runtime, mr_series.paths)
    denoiser = SliceBySlice(lambda: _status(runtime))
    sender = ReportingSender(lambda: _status(runtime))
    Worker(settings, runtime.sessions, runtime.store, denoiser, worker_id="w",
           sender=sender).run(burst=True)
    total = len(mr_series.paths)
    assert denoiser.seen and denoiser.seen[0] is not None
    assert denoiser.seen[0].startswith(f"denoise 50% ({total // 2}/{total} slices)")
    assert sender.seen and sender.seen[0] is not None
    assert sender.seen[0].startswith(f"send {100 * 3 // total}% (3/{total} instances)")
    with runtime.sessions() as session:
        (row,) = list_jobs(session)
    assert row.state == "done" and row.progress is None  # a finished stage shows none


def test_progress_writes_are_bounded_in_rate(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    job_id = _queued_job(runtime, mr_series.paths)
    assert claim(runtime.sessions, "w", 60) is not None
    ticks = iter(np.linspace(0.0, 1.0, 200))
    recorder = ProgressRecorder(runtime.sessions, job_id, "w", "denoise", min_interval=2.0,
                                clock=lambda: float(next(ticks)))
    for done in range(1, 201):
        recorder(done, 200)
    assert recorder.writes == 2  # the first and the last, within one second
    with runtime.sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.progress_done, job.progress_total) == (200, 200)


def test_another_workers_recorder_writes_nothing(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    job_id = _queued_job(runtime, mr_series.paths)
    assert claim(runtime.sessions, "w", 60) is not None
    ProgressRecorder(runtime.sessions, job_id, "someone-else", "denoise")(1, 10)
    with runtime.sessions() as session:
        assert session.get_one(Job, job_id).progress_done is None


def test_a_new_claim_clears_the_last_attempts_progress(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    job_id = _queued_job(runtime, mr_series.paths)
    assert claim(runtime.sessions, "w", 60) is not None
    ProgressRecorder(runtime.sessions, job_id, "w", "denoise")(5, 10)
    with runtime.sessions.begin() as session:
        transition(session, job_id, JobState.PROCESSING, JobState.QUEUED, reason="retry",
                   lease_owner=None, lease_expires_at=None, available_at=utcnow())
    assert claim(runtime.sessions, "w", 60) is not None
    with runtime.sessions() as session:
        assert session.get_one(Job, job_id).progress_done is None
    assert _status(runtime) == "processing, no progress reported yet"


def test_time_left_follows_the_rate_so_far() -> None:
    start = utcnow()
    progress = Progress("denoise", 16, 40, start, start + timedelta(seconds=8))
    assert progress.percent == 40
    assert progress.seconds_left(start + timedelta(seconds=8)) == 12.0
    assert progress.seconds_left(start + timedelta(seconds=10)) == 10.0
    assert progress.describe(start + timedelta(seconds=8)) == \
        "denoise 40% (16/40 slices), about 12 s left"
    assert Progress("send", 0, 40, start, start).seconds_left(start) is None


def _row(**values: Any) -> JobRow:
    now = utcnow()
    base: dict[str, Any] = {"id": 1, "state": "processed", "series_uid": "1.2",
                            "study_uid": "1.3", "modality": "MR", "instances": 12,
                            "created_at": now, "updated_at": now, "reason": None,
                            "processing_attempts": 0, "send_attempts": 0,
                            "derived_series_uid": None, "derived_count": 12}
    return JobRow(**{**base, **values})


LIMITS = AttemptLimits({JobState.PROCESSING: 3, JobState.SENDING: 20})


def test_a_retrying_send_says_attempt_next_time_and_last_error() -> None:
    now = utcnow()
    row = _row(send_attempts=3, available_at=now + timedelta(seconds=41),
               reason="pacs (PACS@h:1): association rejected")
    line = job_status(row, now, LIMITS)
    assert line is not None
    assert line.startswith("retrying: send attempt 4 of 20 in 41 s (")
    assert line.endswith("; last error: pacs (PACS@h:1): association rejected")
    due = job_status(_row(state="queued", processing_attempts=1, available_at=now, reason="x"),
                     now, LIMITS)
    assert due == "retrying: attempt 2 of 3, due now (waiting for a free worker); last error: x"
    assert job_status(_row(state="done", reason="sent 12 to pacs"), now,
                      LIMITS) is None
