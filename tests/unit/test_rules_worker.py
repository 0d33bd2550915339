"""The worker under rules: ignored with the reason, several models, shadow destinations,
review (held, approved, rejected), held gate refusals and the webhook."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from denoised_node.config.rules import NotificationSettings
from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.cli.main import main
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.model_pool import ModelPool
from denoised_node.daemon.jobs.queries import AdminError, review
from denoised_node.daemon.jobs.webhook import JobNotice, Notifier
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.storage.db import make_engine
from denoised_node.storage.models import Job, Series
from denoised_node.storage.runtime import Runtime, open_runtime
from denoised_node.storage.schema import upgrade
from tests.unit.conftest import ScaledDenoiser

MR = "1.2.840.10008.5.1.4.1.1.4"
DESTINATIONS = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                {"name": "test-pacs", "ae_title": "TESTPACS", "host": "127.0.0.1",
                 "port": 4243, "shadow": True}]


class Recorder:
    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()

    def __call__(self, settings: Settings, destination: Destination,
                 files: Sequence[Path], progress: object = None) -> SendResult:
        self.sent[destination.name] += len(files)
        return SendResult(destination.name, len(files))


class NamedDenoiser(ScaledDenoiser):
    def __init__(self, identity: str, size: int = 0) -> None:
        super().__init__()
        self.identity = identity  # type: ignore[misc]
        self.weight_bytes = size


def _runtime(settings_factory: Any, rules: list[dict[str, Any]], **overrides: Any) -> Runtime:
    settings = settings_factory(destinations=json.dumps(DESTINATIONS), rules=json.dumps(rules),
                                models=json.dumps({"second": "/models/second.safetensors"}),
                                **overrides)
    upgrade(make_engine(settings.database_url))
    return open_runtime(settings)


def _receive_and_complete(runtime: Runtime, *series: Any) -> None:
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for one in series:
        for path in one.paths:
            receiver.receive(path.read_bytes(), MR, "SCANNER1")
    with runtime.sessions.begin() as session:
        for row in session.scalars(select(Series)):
            row.last_received_at -= timedelta(minutes=5)
    assert complete_idle_series(runtime.sessions, runtime.settings.series)


def _worker(runtime: Runtime, sender: Recorder, **kwargs: Any) -> Worker:
    loaded: list[str] = []

    def load(checkpoint: str) -> NamedDenoiser:
        loaded.append(checkpoint)
        return NamedDenoiser(f"model-from-{Path(checkpoint).stem}")

    pool = ModelPool(load, 2**30)
    worker = Worker(runtime.settings, runtime.sessions, runtime.store,
                    NamedDenoiser("default-model"), worker_id="w", sender=sender, models=pool,
                    **kwargs)
    worker.loaded_checkpoints = loaded  # type: ignore[attr-defined]
    return worker


def _jobs(runtime: Runtime) -> dict[str, Job]:
    with runtime.sessions() as session:
        rows = session.execute(select(Job, Series).join(Series)).all()
        return {series.series_uid: job for job, series in rows}


def _uid(series: Any) -> str:
    import pydicom

    return str(pydicom.dcmread(series.paths[0]).SeriesInstanceUID)


def test_two_rules_two_models_and_a_shadow_destination(settings_factory, mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [
        {"name": "t1", "match": {"SeriesDescription": "T1"}, "destinations": ["pacs"]},
        {"name": "t2-trial", "match": {"SeriesDescription": "T2"}, "model": "second",
         "destinations": ["test-pacs"]}])
    t1 = mr_series_factory(slices=3, series_description="T1 AX", seed=1)
    t2 = mr_series_factory(slices=4, series_description="T2 AX", seed=2)
    pd = mr_series_factory(slices=2, series_description="PD AX", seed=3)
    _receive_and_complete(runtime, t1, t2, pd)
    sender = Recorder()
    worker = _worker(runtime, sender)
    assert worker.run(burst=True) == 3
    jobs = _jobs(runtime)
    assert (jobs[_uid(t1)].state, jobs[_uid(t1)].rule_name) == ("done", "t1")
    assert jobs[_uid(t1)].model_identity == "default-model"
    assert jobs[_uid(t2)].model_identity == "model-from-second"
    assert json.loads(jobs[_uid(t2)].destinations or "") == ["test-pacs"]
    assert jobs[_uid(pd)].state == "ignored" and "no rule matches" in (jobs[_uid(pd)].reason or "")
    assert sender.sent == {"pacs": 3, "test-pacs": 4}  # the shadow gets only what names it
    assert worker.loaded_checkpoints == ["/models/second.safetensors"]  # type: ignore[attr-defined]


def test_shadow_destinations_get_nothing_by_default(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [])
    _receive_and_complete(runtime, mr_series)
    sender = Recorder()
    _worker(runtime, sender).run(burst=True)
    assert sender.sent == {"pacs": len(mr_series.paths)}


def _held(settings_factory: Any, series: Any, **rule: Any) -> tuple[Runtime, Recorder, Worker, Job]:
    """A node whose one rule asks for review, after its worker held ``series``."""
    runtime = _runtime(settings_factory, [{"name": "careful", "review": True, **rule}])
    _receive_and_complete(runtime, series)
    sender = Recorder()
    worker = _worker(runtime, sender)
    worker.run(burst=True)
    (job,) = _jobs(runtime).values()
    return runtime, sender, worker, job


def test_review_holds_until_approved_from_the_cli(settings_factory, mr_series, tmp_path) -> None:  # type: ignore[no-untyped-def]
    runtime, sender, worker, job = _held(settings_factory, mr_series)
    assert job.state == "held" and "held for review by rule 'careful'" in (job.reason or "")
    assert sender.sent == {}
    listed = CliRunner().invoke(main, ["jobs", "list", "--state", "held", "--json"],
                                env=_env(runtime))
    assert [row["id"] for row in json.loads(listed.output)] == [job.id]
    approved = CliRunner().invoke(main, ["jobs", "approve", str(job.id)], env=_env(runtime))
    assert approved.exit_code == 0, approved.output
    assert "approved" in approved.output
    worker.run(burst=True)
    assert _jobs(runtime)[_uid(mr_series)].state == "done"
    assert sender.sent == {"pacs": len(mr_series.paths)}
    again = CliRunner().invoke(main, ["jobs", "approve", str(job.id)], env=_env(runtime))
    assert again.exit_code != 0 and "is done, not held" in again.output


def test_a_rejected_job_sends_nothing(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    runtime, sender, worker, job = _held(settings_factory, mr_series)
    with runtime.sessions.begin() as session:
        assert "rejected" in review(session, job.id, approve=False, who="tester")
    worker.run(burst=True)
    assert _jobs(runtime)[_uid(mr_series)].state == "ignored" and sender.sent == {}
    with runtime.sessions.begin() as session, pytest.raises(AdminError, match="not held"):
        review(session, job.id, approve=True, who="tester")


class RefusingDenoiser(NamedDenoiser):
    """Shifts every value: the gate's tissue-mean check refuses it."""

    def denoise(self, volume: np.ndarray, progress: Any = None, spacing: Any = None) -> np.ndarray:
        return (volume * 1.5).astype(np.float32)


@pytest.mark.parametrize("hold", [True, False])
def test_gate_refusals_are_held_when_the_rule_says(settings_factory, mr_series, hold: bool) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [{"name": "r", "hold_gate_failures": hold}],
                       gate__enabled=True)
    _receive_and_complete(runtime, mr_series)
    sender = Recorder()
    notices: list[JobNotice] = []
    notifier = Notifier(NotificationSettings(webhook_url="http://127.0.0.1:9/hook"), "NODE")
    notifier.notify = notices.append  # type: ignore[method-assign]
    worker = Worker(runtime.settings, runtime.sessions, runtime.store,
                    RefusingDenoiser("shifty"), worker_id="w", sender=sender, notifier=notifier)
    worker.run(burst=True)
    (job,) = _jobs(runtime).values()
    assert job.state == ("held" if hold else "failed")
    assert "safety gate failed" in (job.reason or "") and sender.sent == {}
    assert [(n.event, n.state) for n in notices] == [("gate_refused", job.state)]
    if hold:
        assert job.derived_count == len(mr_series.paths)  # kept for the reviewer


def test_model_pool_unloads_the_least_recently_used() -> None:
    made: list[str] = []

    def load(checkpoint: str) -> NamedDenoiser:
        made.append(checkpoint)
        return NamedDenoiser(checkpoint, size=600)

    pool = ModelPool(load, budget_bytes=1000)
    pool.get("a")
    pool.get("b")  # a + b exceed the budget: a goes
    assert pool.loaded == ["b"]
    pool.get("a")
    assert made == ["a", "b", "a"] and pool.loaded == ["a"]


# -- the webhook ---------------------------------------------------------------------------
@pytest.fixture
def webhook_server() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    received: list[dict[str, Any]] = []
    answers = [500]  # the first request fails: the notifier must retry

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = answers.pop(0) if answers else 204
            if status < 300:
                received.append(json.loads(body))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received, answers
    server.shutdown()


def test_failed_jobs_reach_the_webhook_without_patient_data(settings_factory, mr_series,  # type: ignore[no-untyped-def]
                                                            webhook_server) -> None:
    url, received, _ = webhook_server
    runtime = _runtime(settings_factory, [{"name": "r"}], gate__enabled=True,
                       notifications__webhook_url=url,
                       notifications__backoff_base_seconds=0.01)
    worker = Worker(runtime.settings, runtime.sessions, runtime.store,
                    RefusingDenoiser("shifty"), worker_id="w", sender=Recorder())
    _receive_and_complete(runtime, mr_series)
    worker.run(burst=True)
    worker.notifier.flush()
    (body,) = received
    assert body["event"] == "gate_refused" and body["state"] == "failed"
    assert body["series_uid"] == _uid(mr_series) and body["model"] == "shifty"
    assert body["series_description"] == "T1 AX" and "patient" not in body
    text = json.dumps(body)
    import pydicom

    source = pydicom.dcmread(mr_series.paths[0])
    assert str(source.PatientName) not in text and source.PatientID not in text


def test_patient_data_only_when_allowed(mr_series, webhook_server) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.jobs.series_attributes import attributes_from_file

    url, received, answers = webhook_server
    answers.clear()
    notifier = Notifier(NotificationSettings(webhook_url=url, include_patient_data=True), "NODE")
    facts = attributes_from_file(mr_series.paths[0])
    assert notifier.deliver(JobNotice("held", 1, "held", "review", facts.series_uid, facts=facts))
    assert received[0]["patient"]["PatientID"] == facts.text("PatientID")


def test_the_webhook_gives_up_after_its_attempts(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def refuse(url: str, data: bytes, headers: dict[str, str], timeout: float) -> int:
        calls.append(url)
        raise OSError("connection refused")

    settings = NotificationSettings(webhook_url="http://127.0.0.1:9/", max_attempts=3,
                                    backoff_base_seconds=0.001)
    notifier = Notifier(settings, "NODE", post=refuse)
    assert not notifier.deliver(JobNotice("failed", 7, "failed", "boom", "1.2.3"))
    assert len(calls) == 3 and "webhook gave up after 3 attempts" in caplog.text


def _env(runtime: Runtime) -> dict[str, str]:
    settings = runtime.settings
    return {"DENOISED_NODE_NODE__DATA_DIR": str(settings.node.data_dir),
            "DENOISED_NODE_DATABASE__URL": settings.database_url}


def test_a_rule_naming_a_missing_model_fails_the_job_with_the_path(
    settings_factory, mr_series
) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [{"name": "r", "model": "/nowhere/model.safetensors"}])
    _receive_and_complete(runtime, mr_series)
    Worker(runtime.settings, runtime.sessions, runtime.store, NamedDenoiser("default-model"),
           worker_id="w", sender=Recorder()).run(burst=True)
    (job,) = _jobs(runtime).values()
    assert job.state == "failed"
    assert job.reason == "checkpoint /nowhere/model.safetensors does not exist"


def test_held_jobs_are_approved_from_the_status_page(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.web.csrf import TOKEN_FIELD
    from denoised_node.daemon.web.health_rows import SlowChecks
    from denoised_node.daemon.web.pages import StatusPages
    from denoised_node.daemon.web.probes import CheckResult, Readiness
    from denoised_node.daemon.web.request import Request

    runtime, sender, worker, job = _held(settings_factory, mr_series, destinations=["test-pacs"])
    pages = StatusPages(runtime.settings, runtime.sessions, runtime.store,
                        Readiness([("db", lambda: CheckResult(True, "ok"))]),
                        slow=SlowChecks([]))
    headers = {"Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080",
               "Content-Type": "application/x-www-form-urlencoded"}
    page = pages.handle(Request.build("GET", f"/series/{_uid(mr_series)}", headers)).body.decode()
    assert "Approve and send" in page and "careful: to test-pacs" in page
    assert "default-model" in page and f'action="/jobs/{job.id}/approve"' in page
    token = re.search(rf'name="{TOKEN_FIELD}" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    forged = pages.handle(Request.build("POST", f"/jobs/{job.id}/approve", headers,
                                        f"{TOKEN_FIELD}=forged".encode()))
    assert forged.status == 403 and _jobs(runtime)[_uid(mr_series)].state == "held"
    done = pages.handle(Request.build("POST", f"/jobs/{job.id}/approve", headers,
                                      f"{TOKEN_FIELD}={token}".encode()))
    assert done.status == 200 and "will be sent" in done.body.decode()
    again = pages.handle(Request.build("POST", f"/jobs/{job.id}/reject", headers,
                                       f"{TOKEN_FIELD}={token}".encode()))
    assert again.status == 409 and "not held" in again.body.decode()
    worker.run(burst=True)
    assert sender.sent == {"test-pacs": len(mr_series.paths)}


def test_rules_test_reads_a_stored_series(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    runtime = _runtime(settings_factory, [{"name": "from-scanner1",
                                           "match": {"CallingAETitle": "^SCANNER1$"},
                                           "destinations": ["test-pacs"], "review": True}])
    _receive_and_complete(runtime, mr_series)
    env = {**_env(runtime), "DENOISED_NODE_RULES": json.dumps([r.model_dump() for r in
                                                              runtime.settings.rules]),
           "DENOISED_NODE_DESTINATIONS": json.dumps(DESTINATIONS)}
    result = CliRunner().invoke(main, ["rules", "test", "--series", _uid(mr_series)], env=env)
    assert result.exit_code == 0, result.output
    assert "rule: from-scanner1 (rule 'from-scanner1': CallingAETitle='SCANNER1')" in result.output
    assert "destinations: test-pacs" in result.output and "review: yes" in result.output
    unknown = CliRunner().invoke(main, ["rules", "test", "--series", "1.2.3"], env=env)
    assert (
        unknown.exit_code != 0 and "no stored series with SeriesInstanceUID 1.2.3" in unknown.output
    )


def test_doctor_checks_every_model_a_rule_names(settings_factory) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.daemon.cli.doctor import _rule_models

    settings = settings_factory(rules=json.dumps([
        {"name": "old", "model": "previous"}, {"name": "gone", "model": "/nowhere/m.safetensors"},
        {"name": "same", "model": "default"}]), models=json.dumps({"previous": "unet25d-1.0"}))
    checks = {c.name: c for c in _rule_models(settings)}
    assert set(checks) == {"model previous", "model /nowhere/m.safetensors"}
    assert checks["model previous"].ok and "dn-unet25d-1.0" in checks["model previous"].detail
    assert not checks["model /nowhere/m.safetensors"].ok


class FlooredDenoiser(NamedDenoiser):
    """A card whose intended use has a noise floor above anything the test series read."""

    class card:  # noqa: N801 - mimics the model card's attributes
        name, version = "floored", "1.0"
        intended_use: ClassVar[dict[str, float]] = {"noise_floor_percent": 90.0}


@pytest.mark.parametrize("override", [False, True])
def test_a_series_under_the_noise_floor_is_ignored_unless_overridden(settings_factory, mr_series,  # type: ignore[no-untyped-def]
                                                                     override: bool) -> None:
    runtime = _runtime(settings_factory, [{"name": "r", "override_intended_use": override}])
    _receive_and_complete(runtime, mr_series)
    network = FlooredDenoiser("floored")
    worker = Worker(runtime.settings, runtime.sessions, runtime.store, network, worker_id="w",
                    sender=Recorder())
    worker.run(burst=True)
    (job,) = _jobs(runtime).values()
    with runtime.sessions() as session:
        labels = [e.label for e in session.get(Job, job.id).events if e.label]
    if override:
        assert job.state == "done" and network.calls == 1
    else:
        assert job.state == "ignored" and network.calls == 0
        assert "nothing to denoise: noise reads" in (job.reason or "") and "under the 90 %" in (
            job.reason or ""
        )
        assert labels == ["no_noise"]
