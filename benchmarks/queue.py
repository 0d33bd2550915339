"""Queue throughput: jobs/s through claim -> processing -> processed -> sending -> done with
1, 2 and 4 worker processes, on SQLite (WAL, synchronous=FULL) and on PostgreSQL.

    python -m benchmarks.queue                      # starts a throwaway PostgreSQL server
    python -m benchmarks.queue --postgres-url postgresql+psycopg://user@host/db

Each worker is the node's own `Worker` loop (lease expiry pass, SKIP LOCKED claim, heartbeat
thread, the conditional-UPDATE moves and their audit rows) with the denoising and sending
replaced by a sleep of --work-ms: 0 measures the queue alone, a few tens of ms shows how the
work spreads over workers. So it measures the queue, not the network or the DICOM stacks.
Without --postgres-url the server comes from tests/integration/postgres.py (Debian's
binaries, fsync on, like SQLite's synchronous=FULL), which needs pytest installed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from denoised_node.config.settings import Settings, load_settings
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.db import make_engine
from denoised_node.storage.models import Series
from denoised_node.storage.queue import ClaimedJob, JobState, enqueue
from denoised_node.storage.runtime import open_runtime
from denoised_node.storage.schema import upgrade

SPAWN = multiprocessing.get_context("spawn")


class NoModel:
    identity = "benchmark-no-model"


class QueueOnlyWorker(Worker):
    """The real worker loop and state moves; the work itself is a sleep."""

    work_seconds = 0.0

    def perform(self, job: ClaimedJob) -> None:
        if self.work_seconds:
            time.sleep(self.work_seconds)
        self._move(job, JobState.PROCESSING, JobState.PROCESSED, "processed",
                   derived_count=1, model_identity=NoModel.identity)
        job = self._start_sending(job)
        self._move(job, JobState.SENDING, JobState.DONE, "sent")


def _settings(url: str, data_dir: Path) -> Settings:
    return load_settings(None, environ={
        "DENOISED_NODE_NODE__DATA_DIR": str(data_dir), "DENOISED_NODE_NODE__MIN_FREE_MB": "0",
        "DENOISED_NODE_DATABASE__URL": url, "DENOISED_NODE_WORKER__LEASE_SECONDS": "60",
    })


def _work(url: str, data_dir: str, worker_id: str, work_ms: float, ready: Any, start: Any,
          out: Any) -> None:
    settings = _settings(url, Path(data_dir))
    runtime = open_runtime(settings)
    worker = QueueOnlyWorker(settings, runtime.sessions, runtime.store, NoModel(),  # type: ignore[arg-type]
                             worker_id=worker_id, on_idle=lambda: None)
    worker.work_seconds = work_ms / 1000
    runtime.engine.connect().close()  # imports done and connected before the clock starts
    ready.put(worker_id)
    start.wait()
    done = worker.run(burst=True)
    out.put((done, time.perf_counter()))
    runtime.engine.dispose()


def _fill(url: str, data_dir: Path, jobs: int) -> None:
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    runtime = open_runtime(_settings(url, data_dir))
    with runtime.sessions.begin() as session:
        for n in range(jobs):
            series = Series(study_uid="1.2.3", series_uid=f"1.2.3.{n}", state="receiving",
                            revision=1, queued_revision=0, instance_count=1)
            session.add(series)
            session.flush()
            enqueue(session, series, reason="benchmark")
    runtime.engine.dispose()


@dataclass(frozen=True)
class Result:
    engine: str
    workers: int
    work_ms: float
    jobs: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def run_once(url: str, data_dir: Path, workers: int, jobs: int, work_ms: float) -> float:
    """Seconds for ``workers`` processes to take ``jobs`` queued jobs to done."""
    _fill(url, data_dir, jobs)
    ready, start, out = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    processes = [SPAWN.Process(target=_work, args=(url, str(data_dir), f"bench:{i}", work_ms,
                                                   ready, start, out)) for i in range(workers)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=300)
    began = time.perf_counter()
    start.set()
    reports = [out.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(60)
    handled = sum(done for done, _ in reports)
    if handled != jobs:
        raise RuntimeError(f"{handled} jobs handled, {jobs} queued")
    return max(finished for _, finished in reports) - began


def _postgres_database(server_url: str, name: str) -> str:
    engine = make_engine(server_url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--work-ms", default="0,50", help="simulated work per job, ms")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default=None,
                        help="a server to use (a database per run is created on it)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    works = [float(n) for n in args.work_ms.split(",")]
    engines = args.engines.split(",")

    server = None
    postgres_url = args.postgres_url
    if "postgresql" in engines and postgres_url is None:
        from tests.integration.postgres import start_postgres

        server = start_postgres(durable=True)
        postgres_url = server.url()
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="denoised-node-bench-") as temp:
            for run, (engine, work_ms, workers) in enumerate(
                    (e, w, n) for e in engines for w in works for n in counts):
                data_dir = Path(temp) / f"run{run}"
                if engine == "sqlite":
                    url = f"sqlite:///{data_dir / 'node.db'}"
                else:
                    assert postgres_url is not None
                    url = _postgres_database(postgres_url, f"bench_{os.getpid()}_{run}")
                seconds = run_once(url, data_dir, workers, args.jobs, work_ms)
                results.append(Result(engine, workers, work_ms, args.jobs, seconds))
                print(f"  {engine:<10} work {work_ms:>4.0f} ms  workers {workers}: "
                      f"{args.jobs / seconds:7.1f} jobs/s", flush=True)
    finally:
        if server is not None:
            server.stop()
    print()
    print(table(results, counts))


def table(results: list[Result], counts: list[int]) -> str:
    header = "| engine | work per job | " + " | ".join(f"{n} worker{'s' * (n > 1)}"
                                                       for n in counts) + " |"
    lines = [header, "|" + "---|" * (2 + len(counts))]
    for engine, work_ms in dict.fromkeys((r.engine, r.work_ms) for r in results):
        rates = {r.workers: r.rate for r in results if (r.engine, r.work_ms) == (engine, work_ms)}
        cells = " | ".join(f"{rates[n]:.0f} jobs/s" if n in rates else "-" for n in counts)
        lines.append(f"| {engine} | {work_ms:.0f} ms | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
