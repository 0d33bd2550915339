"""Series completion (daemon/jobs/completion.py): idle time, an early finish for a released
gap-free series, late instances and series that are not MR."""

from __future__ import annotations

import logging
from datetime import timedelta

import pydicom
import pytest
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.storage.models import Job, utcnow
from denoised_node.storage.runtime import Runtime
from tests.fixtures.node_state import job_states, receive_files


def test_series_completes_after_idle_time(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receive_files(runtime, mr_series.paths)
    assert complete_idle_series(runtime.sessions, runtime.settings.series) == []
    later = utcnow() + timedelta(seconds=runtime.settings.series.idle_seconds + 1)
    assert len(complete_idle_series(runtime.sessions, runtime.settings.series, later)) == 1
    assert complete_idle_series(runtime.sessions, runtime.settings.series, later) == []
    assert job_states(runtime) == ["queued"]


def test_released_gap_free_series_completes_early(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    delivered = receive_files(runtime, mr_series.paths)
    Receiver(runtime.store, runtime.sessions, runtime.settings).mark_released(delivered)
    soon = utcnow() + timedelta(seconds=runtime.settings.series.released_grace_seconds + 0.1)
    assert len(complete_idle_series(runtime.sessions, runtime.settings.series, soon)) == 1


def test_released_series_with_gaps_waits_for_idle(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    paths = [p for i, p in enumerate(mr_series.paths)
             if pydicom.dcmread(p).InstanceNumber != 5]
    delivered = receive_files(runtime, paths)
    Receiver(runtime.store, runtime.sessions, runtime.settings).mark_released(delivered)
    soon = utcnow() + timedelta(seconds=2)
    assert complete_idle_series(runtime.sessions, runtime.settings.series, soon) == []


def test_late_instances_queue_the_series_again(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    receive_files(runtime, mr_series.paths[:-1])
    later = utcnow() + timedelta(seconds=60)
    complete_idle_series(runtime.sessions, runtime.settings.series, later)
    receive_files(runtime, mr_series.paths[-1:])
    complete_idle_series(runtime.sessions, runtime.settings.series, later + timedelta(seconds=60))
    assert job_states(runtime) == ["ignored", "queued"]


def test_series_without_mr_is_ignored_with_the_reason(runtime: Runtime, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    ct = mr_series_factory(slices=2, sop_class_uid=pydicom.uid.CTImageStorage, modality="CT")
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in ct.paths:
        receiver.receive(path.read_bytes(), pydicom.uid.CTImageStorage, "MOD")
    complete_idle_series(runtime.sessions, runtime.settings.series, utcnow() + timedelta(minutes=1))
    with runtime.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.state == "ignored" and "not an MR image" in (job.reason or "")
    # It listed 0 instances: the job says how many arrived, and that none is denoised.
    assert "2 instance(s) arrived, none to denoise" in (job.reason or "")
    from denoised_node.daemon.jobs.queries import job_detail, list_jobs

    with runtime.sessions() as session:
        row, _ = job_detail(session, job.id)
        (listed,) = list_jobs(session)
    assert (row.arrived, row.instances, listed.arrived) == (2, 0, 2)


def test_a_failed_commit_logs_no_series_complete(runtime: Runtime, mr_series, caplog) -> None:  # type: ignore[no-untyped-def]
    """Issue 29, item 10: the commit that queues the job fails (a full disk): nothing is
    logged as complete (before: "series complete" for a job that never existed), and the
    next pass queues the series."""
    receive_files(runtime, mr_series.paths)
    later = utcnow() + timedelta(seconds=runtime.settings.series.idle_seconds + 1)

    def disk_full(session: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    event.listen(Session, "before_commit", disk_full)
    try:
        with caplog.at_level(logging.INFO, logger="denoised_node"), \
                pytest.raises(OperationalError):
            complete_idle_series(runtime.sessions, runtime.settings.series, later)
    finally:
        event.remove(Session, "before_commit", disk_full)
    assert not [r for r in caplog.records if "series complete" in r.getMessage()]
    assert job_states(runtime) == []
    assert len(complete_idle_series(runtime.sessions, runtime.settings.series, later)) == 1
