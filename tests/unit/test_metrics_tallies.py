"""/metrics by category, from what workers record in the database: send attempts, failures and
retries per destination (send_attempts rows), gate refusals by check and ignored series by
reason (job_events.label), counted by the queue collector of daemon/web/metrics.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import select, update

from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.dicom.scu import SendError, SendResult
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.daemon.web.metrics import QueueCollector
from denoised_node.storage.job_events import IgnoredAs, ignored_as
from denoised_node.storage.models import Job, JobEvent, utcnow
from denoised_node.storage.queue import EventKind
from tests.unit.test_http_metrics import samples
from tests.unit.test_rules_worker import (
    NamedDenoiser,
    RefusingDenoiser,
    _receive_and_complete,
    _runtime,
)


class FlakySender:
    """test-pacs fails its first ``failures`` attempts; pacs always takes the series."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self, settings: Settings, destination: Destination,
                 files: Sequence[Path], progress: object = None) -> SendResult:
        if destination.name == "test-pacs" and self.failures > 0:
            self.failures -= 1
            raise SendError("test-pacs: connection refused")
        return SendResult(destination.name, len(files))


def _counters(runtime: Any) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(QueueCollector(runtime.sessions))
    return {(name.removeprefix("denoised_node_"), labels[0][1]): value
            for (name, labels), value in samples(registry).items()
            if len(labels) == 1 and name.endswith("_total")}


def _run_until_settled(runtime: Any, worker: Worker) -> None:
    """Run the worker; a job waiting out its backoff is made due at once."""
    for _ in range(5):
        worker.run(burst=True)
        with runtime.sessions.begin() as session:
            if not session.execute(update(Job).where(Job.state == "processed")
                                   .values(available_at=utcnow())).rowcount:
                return


def test_sends_are_counted_per_destination_and_ignored_series_by_reason(
        settings_factory, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    rules: list[dict[str, Any]] = [
        {"name": "no-t2", "match": {"SeriesDescription": "T2"}, "ignore": True},
        {"name": "all", "destinations": ["pacs", "test-pacs"]},
    ]
    runtime = _runtime(settings_factory, rules, send__max_attempts=3)
    _receive_and_complete(runtime, mr_series_factory(seed=1, slices=2),
                          mr_series_factory(seed=2, slices=2, series_description="AX T2"))
    worker = Worker(runtime.settings, runtime.sessions, runtime.store, NamedDenoiser("m"),
                    worker_id="w", sender=FlakySender(failures=1))
    _run_until_settled(runtime, worker)
    counts = _counters(runtime)
    # Attempt 1: pacs took it, test-pacs refused (retried); attempt 2: both took it.
    assert counts[("send_attempts_total", "pacs")] == 2
    assert counts[("send_attempts_total", "test-pacs")] == 2
    assert counts[("send_failures_total", "test-pacs")] == 1
    assert counts[("send_retries_total", "test-pacs")] == 1
    assert ("send_failures_total", "pacs") not in counts
    assert counts[("series_ignored_total", "rule")] == 1
    assert counts[("series_ignored_total", "no_rule")] == 0  # every category, from 0


def test_a_send_that_fails_for_good_is_a_failure_not_a_retry(settings_factory,
                                                             mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [{"name": "all", "destinations": ["test-pacs"]}],
                       send__max_attempts=2)
    _receive_and_complete(runtime, mr_series_factory(seed=3, slices=2))
    _run_until_settled(runtime, Worker(runtime.settings, runtime.sessions, runtime.store,
                                       NamedDenoiser("m"), worker_id="w",
                                       sender=FlakySender(failures=5)))
    counts = _counters(runtime)
    assert counts[("send_attempts_total", "test-pacs")] == 2
    assert counts[("send_failures_total", "test-pacs")] == 2
    assert counts[("send_retries_total", "test-pacs")] == 1  # the second failed the job


def test_gate_refusals_are_counted_by_check(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [{"name": "r"}], gate__enabled=True)
    _receive_and_complete(runtime, mr_series)
    Worker(runtime.settings, runtime.sessions, runtime.store, RefusingDenoiser("shifty"),
           worker_id="w", sender=FlakySender(0)).run(burst=True)
    with runtime.sessions() as session:
        failed = session.scalars(select(JobEvent).where(JobEvent.kind == EventKind.FAILED)).one()
    checks = (failed.label or "").split()
    assert "tissue_mean_change" in checks  # what RefusingDenoiser breaks
    counts = _counters(runtime)
    assert all(counts[("gate_refusals_total", check)] == 1 for check in checks)


def test_series_left_out_on_receipt_and_old_rows_have_a_category() -> None:
    assert ignored_as(EventKind.IGNORED, "on_receipt") is IgnoredAs.ON_RECEIPT
    assert ignored_as(EventKind.IGNORED, None) is IgnoredAs.OTHER  # before revision 0007
    assert ignored_as(EventKind.IGNORED, "from-a-newer-release") is IgnoredAs.OTHER
    assert ignored_as(EventKind.REJECTED, None) is IgnoredAs.REJECTED
    assert ignored_as(EventKind.SUPERSEDED, None) is None  # an outcome of its own


def test_the_migration_adds_the_label_and_send_attempts_as_the_models_have_them(
        tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from denoised_node.storage.db import make_engine
    from denoised_node.storage.models import Base
    from denoised_node.storage.schema import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    tables = {str(d[1].name) for d in differences if d[0] in ("add_table", "remove_table")}
    columns = {f"{d[2]}.{d[3]}" if d[0] == "add_column" else str(d) for d in differences
               if d[0] in ("add_column", "remove_column")}
    assert not {"send_attempts", "job_events"} & tables and not columns, differences
    engine.dispose()
