from __future__ import annotations

from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import select

from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.maintenance import release_dead_local_leases
from denoised_node.storage.models import Instance, Job, JobEvent, Series, utcnow
from denoised_node.storage.queue import JobState, attempt_limits, claim, transition
from denoised_node.storage.retention import forget_purged, purge_finished
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _finished_series(runtime: Runtime, paths, final: JobState) -> int:  # type: ignore[no-untyped-def]
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    with runtime.sessions.begin() as session:
        for series in session.scalars(select(Series)):
            series.last_received_at -= timedelta(hours=2)
    (job_id,) = complete_idle_series(runtime.sessions, runtime.settings.series)
    with runtime.sessions.begin() as session:
        transition(session, job_id, JobState.QUEUED, JobState.PROCESSING)
        if final == JobState.DONE:
            transition(session, job_id, JobState.PROCESSING, JobState.PROCESSED)
            transition(session, job_id, JobState.PROCESSED, JobState.SENDING)
        transition(session, job_id, JobState(session.get_one(Job, job_id).state), final,
                   now=utcnow() - timedelta(hours=2))
    runtime.store.derived_dir(job_id).mkdir(parents=True)
    (runtime.store.derived_dir(job_id) / "x.dcm").write_bytes(b"derived")
    return job_id


def test_done_series_are_purged_after_the_retention_time(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    job_id = _finished_series(runtime, mr_series.paths, JobState.DONE)
    assert purge_finished(runtime.sessions, runtime.store, timedelta(hours=3)).series == 0
    result = purge_finished(runtime.sessions, runtime.store, timedelta(hours=1))
    assert result.series == 1 and result.files == len(mr_series.paths)
    assert not list(runtime.store.instances.rglob("*.dcm"))
    assert not runtime.store.derived_dir(job_id).exists()
    with runtime.sessions() as session:
        series = session.scalars(select(Series)).one()
        assert series.state == "purged" and session.scalars(select(Instance)).all() == []
        assert session.get(Job, job_id) is not None  # the history stays


def test_failed_series_are_kept_unless_asked(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    _finished_series(runtime, mr_series.paths, JobState.FAILED)
    assert purge_finished(runtime.sessions, runtime.store, timedelta(0)).series == 0
    dry = purge_finished(runtime.sessions, runtime.store, timedelta(0), include_failed=True,
                         dry_run=True)
    assert dry.series == 1 and len(list(runtime.store.instances.rglob("*.dcm"))) == 12
    assert dry.files == 12  # what the real purge would remove, counted (it said 0)
    assert purge_finished(runtime.sessions, runtime.store, timedelta(0),
                          include_failed=True).series == 1


def test_purged_rows_are_forgotten_later(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    _finished_series(runtime, mr_series.paths, JobState.DONE)
    purge_finished(runtime.sessions, runtime.store, timedelta(0))
    assert forget_purged(runtime.sessions, timedelta(days=1)) == 0
    assert forget_purged(runtime.sessions, timedelta(0), now=utcnow() + timedelta(seconds=1)) == 1
    with runtime.sessions() as session:
        for table in (Series, Job, JobEvent, Instance):
            assert session.scalars(select(table)).all() == []


def test_purge_command(runtime: Runtime, mr_series, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.cli.main import main

    _finished_series(runtime, mr_series.paths, JobState.FAILED)
    config = tmp_path / "c.toml"
    config.write_text(f'[node]\ndata_dir = "{runtime.settings.node.data_dir}"\nmin_free_mb = 0\n')
    result = CliRunner().invoke(main, ["purge", "--config", str(config), "--older-than", "0"])
    assert result.exit_code == 0 and "purged 0 series" in result.stdout
    result = CliRunner().invoke(main, ["purge", "--config", str(config), "--older-than", "0",
                                       "--failed"])
    assert "purged 1 series (12 files)" in result.stdout


def test_dead_local_worker_leases_are_released(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    import socket

    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in mr_series.paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    with runtime.sessions.begin() as session:
        session.scalars(select(Series)).one().last_received_at -= timedelta(minutes=1)
    complete_idle_series(runtime.sessions, runtime.settings.series)
    dead = f"{socket.gethostname()}:999999"
    job = claim(runtime.sessions, dead, 3600)
    assert job is not None
    limits = attempt_limits(runtime.settings)
    assert release_dead_local_leases(runtime.sessions, limits) == [job.id]
    with runtime.sessions() as session:
        released = session.get_one(Job, job.id)
        assert (released.state, released.processing_attempts) == ("queued", 1)  # an attempt
