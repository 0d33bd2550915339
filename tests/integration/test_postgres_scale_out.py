"""Scale-out on a real PostgreSQL server: the schema from the same Alembic migrations, several
worker processes on one queue doing every job exactly once, a killed worker's job taken over
once its lease expires, and completers of two `serve` instances racing on the same series.

Workers here are real `Worker` loops in their own processes with a fast stand-in for the
network and a sender that logs what it would C-STORE; test_postgres_two_nodes.py runs the
real `serve` and `denoised-node worker` commands end to end.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select

from denoised_node.config.settings import Destination, Settings, load_settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.db import make_engine
from denoised_node.storage.files import STALE_TEMP_SECONDS, FileStore
from denoised_node.storage.models import Base, Instance, Job, JobEvent, Series, utcnow
from denoised_node.storage.queue import JobState
from denoised_node.storage.runtime import Runtime, open_runtime
from denoised_node.storage.schema import check_schema, upgrade
from tests.integration.postgres import postgres_server, postgres_url  # noqa: F401

MR = "1.2.840.10008.5.1.4.1.1.4"
SPAWN = multiprocessing.get_context("spawn")


def node_environ(data_dir: Path, url: str, **overrides: object) -> dict[str, str]:
    """Settings as environment variables, so a spawned process can load the same ones."""
    env = {"DENOISED_NODE_NODE__DATA_DIR": str(data_dir), "DENOISED_NODE_NODE__MIN_FREE_MB": "0",
           "DENOISED_NODE_GATE__ENABLED": "false", "DENOISED_NODE_DATABASE__URL": url,
           "DENOISED_NODE_WORKER__POLL_SECONDS": "0.1"}
    env.update({f"DENOISED_NODE_{key.upper()}": str(value) for key, value in overrides.items()})
    return env


@pytest.fixture
def environ(tmp_path: Path, postgres_url: str) -> dict[str, str]:  # noqa: F811
    return node_environ(tmp_path / "shared-store", postgres_url)


@pytest.fixture
def runtime(environ: dict[str, str]) -> Iterator[Runtime]:
    settings = load_settings(None, environ=environ)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    opened = open_runtime(settings)
    yield opened
    opened.engine.dispose()


class FastDenoiser:
    """Stands in for the network: the worker's interface, a trivial deterministic filter."""

    identity = "postgres-test-model-1"

    class card:  # noqa: N801 - mimics the model card's attributes
        name = "postgres-test"
        version = "1.0"

    def __init__(self, hang_flag: str | None = None) -> None:
        self.hang_flag = hang_flag

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        if self.hang_flag:  # tell the test the job is in hand, then never finish it
            Path(self.hang_flag).touch()
            while True:
                time.sleep(1)
        if progress:
            progress(len(volume), len(volume))
        return (volume * 0.95).astype(np.float32)


class LoggingSender:
    """Logs 'worker job-id file-count' per series sent, one O_APPEND line (atomic)."""

    def __init__(self, log: Path, worker: str) -> None:
        self.log = log
        self.worker = worker

    def __call__(self, settings: Settings, destination: Destination,
                 files: Sequence[Path], progress: object = None) -> SendResult:
        line = f"{self.worker} {files[0].parent.name} {len(files)}\n".encode()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return SendResult(destination.name, len(files))


def sent_lines(log: Path) -> list[tuple[str, int, int]]:
    if not log.exists():
        return []
    return [
        (w, int(j), int(n)) for w, j, n in (line.split() for line in log.read_text().splitlines())
    ]


def run_worker(environ: dict[str, str], worker_id: str, sent_log: str,
               start: Any = None, hang_flag: str | None = None) -> None:
    """A worker process: the real Worker loop until the queue is empty (burst)."""
    settings = load_settings(None, environ=environ)
    runtime = open_runtime(settings)
    worker = Worker(settings, runtime.sessions, runtime.store, FastDenoiser(hang_flag),
                    worker_id=worker_id, sender=LoggingSender(Path(sent_log), worker_id))
    if start is not None:
        start.wait(120)  # every worker starts claiming at the same moment
    try:
        worker.run(burst=True)
    finally:
        runtime.engine.dispose()


def queue_series(runtime: Runtime, factory: Callable[..., Any], count: int) -> list[int]:
    """Receive ``count`` small generated series into the store and queue them."""
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for n in range(count):
        series = factory(seed=100 + n, slices=3, rows=32, columns=32, private_tags=False)
        for path in series.paths:
            receiver.receive(path.read_bytes(), MR, "MODALITY")
    with runtime.sessions.begin() as session:  # idle long enough, so queued for now
        for row in session.scalars(select(Series)):
            row.last_received_at -= timedelta(minutes=5)
    job_ids = complete_idle_series(runtime.sessions, runtime.settings.series)
    assert len(job_ids) == count
    return job_ids


def events(runtime: Runtime, job_id: int) -> list[tuple[str | None, str, str | None, str | None]]:
    with runtime.sessions() as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                               .order_by(JobEvent.id)).all()
        return [(e.from_state, e.to_state, e.worker, e.reason) for e in rows]


def test_migrations_build_the_models_schema_on_postgres(runtime: Runtime) -> None:
    check_schema(runtime.engine)  # at head, through the same Alembic revisions as SQLite
    with runtime.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_migrations_build_the_models_schema_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_an_instance_of_more_than_2_gib_is_indexed(runtime: Runtime) -> None:
    with runtime.sessions.begin() as session:
        series = Series(study_uid="1.2.3", series_uid="1.2.3.4", state="receiving")
        session.add(series)
        session.flush()
        session.add(Instance(series_id=series.id, sop_instance_uid="1.2.3.4.5",
                             sop_class_uid=MR, transfer_syntax_uid="1.2.840.10008.1.2.1",
                             path="instances/x.dcm", size_bytes=3 * 2**30, sha256="0" * 64))
    with runtime.sessions() as session:
        assert session.scalars(select(Instance.size_bytes)).one() == 3 * 2**30


def test_two_processes_creating_the_schema_at_once_both_succeed(postgres_url: str) -> None:  # noqa: F811
    # Two `serve` instances started together on an empty database both create the schema.
    engines = [make_engine(postgres_url) for _ in range(2)]
    errors: list[BaseException] = []

    def create(engine: Any) -> None:
        try:
            upgrade(engine)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=create, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    check_schema(engines[0])
    for engine in engines:
        engine.dispose()


def test_workers_on_one_queue_do_every_job_exactly_once(runtime: Runtime, environ: dict[str, str],
                                                         mr_series_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job_ids = queue_series(runtime, mr_series_factory, 16)
    sent_log = tmp_path / "sent.log"
    start = SPAWN.Event()
    workers = [SPAWN.Process(target=run_worker, args=(environ, f"host{i % 2}:{1000 + i}",
                                                      str(sent_log), start))
               for i in range(4)]
    for process in workers:
        process.start()
    try:
        time.sleep(1.0)  # let them import and connect, then open the gate together
        start.set()
        for process in workers:
            process.join(180)
            assert process.exitcode == 0
    finally:
        for process in workers:
            if process.is_alive():
                process.kill()

    with runtime.sessions() as session:
        states = dict(session.execute(select(Job.id, Job.state)).all())
    assert states == {job_id: JobState.DONE.value for job_id in job_ids}
    sent = sent_lines(sent_log)
    assert sorted(job for _, job, _ in sent) == sorted(job_ids)  # each series sent once
    assert all(count == 3 for _, _, count in sent)
    for job_id in job_ids:
        moves = [(a, b) for a, b, _, _ in events(runtime, job_id)]
        assert moves == [(None, "queued"), ("queued", "processing"),
                         ("processing", "processed"), ("processed", "sending"),
                         ("sending", "done")]
    assert len({worker for worker, _, _ in sent}) >= 2, "the jobs were not shared out"


def test_a_killed_workers_job_is_taken_over_after_its_lease(runtime: Runtime, tmp_path: Path,
                                                             mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    (job_id,) = queue_series(runtime, mr_series_factory, 1)
    environ = node_environ(runtime.settings.node.data_dir, runtime.settings.database_url,
                           worker__lease_seconds=2)
    sent_log, flag = tmp_path / "sent.log", tmp_path / "in-hand"
    doomed = SPAWN.Process(target=run_worker,
                           args=(environ, "gpu-a:4242", str(sent_log), None, str(flag)))
    doomed.start()
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert doomed.is_alive() and time.monotonic() < deadline, "worker never claimed"
            time.sleep(0.1)
        # Alive, it keeps its lease past its length: the heartbeat renews it.
        time.sleep(3)
        with runtime.sessions() as session:
            job = session.get_one(Job, job_id)
            assert (job.state, job.lease_owner) == ("processing", "gpu-a:4242")
            renewed_until = job.lease_expires_at
        assert renewed_until > utcnow()
        doomed.kill()  # SIGKILL: no release, no last heartbeat
        doomed.join(10)
    finally:
        if doomed.is_alive():
            doomed.kill()

    settings = load_settings(None, environ=environ)
    taker = Worker(settings, runtime.sessions, runtime.store, FastDenoiser(),
                   worker_id="gpu-b:77", sender=LoggingSender(sent_log, "gpu-b:77"))
    thread = threading.Thread(target=taker.run, kwargs={"max_jobs": 1})
    thread.start()
    thread.join(60)
    if thread.is_alive():
        taker.request_stop()
        thread.join(10)
        pytest.fail("the job was not taken over")

    history = events(runtime, job_id)
    claims = [worker for a, b, worker, _ in history if (a, b) == ("queued", "processing")]
    assert claims == ["gpu-a:4242", "gpu-b:77"]
    # The lost worker counts as an attempt (issue 29, item 5).
    limit = runtime.settings.worker.max_processing_attempts
    assert ("processing", "queued", None,
            f"lease of gpu-a:4242 expired: the worker was lost (attempt 1 of {limit})") in history
    assert history[-1][:3] == ("sending", "done", "gpu-b:77")
    assert sent_lines(sent_log) == [("gpu-b:77", job_id, 3)]


def race_completion(environ: dict[str, str], start: Any, out: Any) -> None:
    """One `serve`'s completion loop, run flat out until nothing is left to queue."""
    settings = load_settings(None, environ=environ)
    runtime = open_runtime(settings)
    start.wait(120)
    queued: list[int] = []
    idle_passes = 0
    while idle_passes < 3:
        new = complete_idle_series(runtime.sessions, settings.series)
        queued += new
        idle_passes = 0 if new else idle_passes + 1
    runtime.engine.dispose()
    out.put(queued)


def test_two_completers_queue_each_series_once(runtime: Runtime, environ: dict[str, str]) -> None:
    count = 400
    old = utcnow() - timedelta(minutes=10)
    with runtime.sessions.begin() as session:
        session.add_all(Series(study_uid="1.2.3", series_uid=f"1.2.3.{n}", state="receiving",
                               revision=2, queued_revision=0, instance_count=2,
                               first_received_at=old, last_received_at=old)
                        for n in range(count))
    start, out = SPAWN.Event(), SPAWN.Queue()
    completers = [SPAWN.Process(target=race_completion, args=(environ, start, out))
                  for _ in range(3)]
    for process in completers:
        process.start()
    try:
        time.sleep(1.0)
        start.set()
        queued = [job for _ in completers for job in out.get(timeout=120)]
        for process in completers:
            process.join(30)
    finally:
        for process in completers:
            if process.is_alive():
                process.kill()

    with runtime.sessions() as session:
        per_series = Counter(session.scalars(select(Job.series_id)).all())
        assert len(per_series) == count and set(per_series.values()) == {1}
        assert session.scalar(select(func.count()).select_from(Job)
                              .where(Job.state != JobState.QUEUED.value)) == 0
        assert session.scalar(select(func.count()).select_from(Series)
                              .where(Series.queued_revision != 2)) == 0
    assert len(queued) == len(set(queued)) == count


def test_a_shared_store_keeps_another_hosts_temp_files_until_stale(tmp_path: Path) -> None:
    # A `serve` starting on host B must not delete what host A's SCP is writing right now.
    store = FileStore(tmp_path)
    mine = store.incoming / f"{socket.gethostname()}~a.part"
    theirs = store.incoming / "other-host~b.part"
    untagged = store.incoming / "c.part"
    for leftover in (mine, theirs, untagged):
        leftover.write_bytes(b"half")
    assert store.clean_incoming() == 2
    assert [p.name for p in store.incoming.iterdir()] == [theirs.name]
    assert store.clean_incoming(now=time.time() + STALE_TEMP_SECONDS + 1) == 1
    assert list(store.incoming.iterdir()) == []


def test_a_worker_refuses_a_data_dir_without_the_shared_store(tmp_path: Path,
                                                             postgres_url: str) -> None:  # noqa: F811
    env = {**os.environ, **node_environ(tmp_path / "not-mounted", postgres_url)}
    env.pop("DENOISED_NODE_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "denoised_node.daemon.cli.main", "worker", "--burst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "holds no file store" in done.stderr and "mount the shared store" in done.stderr
    assert not (tmp_path / "not-mounted").exists()  # nothing created on the local disk
