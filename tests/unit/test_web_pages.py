"""The status pages without a browser: StatusPages.handle on requests built in the test,
over a node that received two series, denoised and sent one, and failed to send the other."""

from __future__ import annotations

import io
import itertools
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from denoised_node.config.settings import Destination, Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.scu import SendError, SendResult
from denoised_node.daemon.jobs.completion import complete_idle_series
from denoised_node.daemon.jobs.worker import Worker
from denoised_node.daemon.web.csrf import TOKEN_FIELD
from denoised_node.daemon.web.health_rows import SlowChecks
from denoised_node.daemon.web.pages import StatusPages
from denoised_node.daemon.web.probes import CheckResult, Readiness
from denoised_node.daemon.web.request import Request, Response
from denoised_node.storage.db import make_engine
from denoised_node.storage.models import Job, JobEvent, Series, utcnow
from denoised_node.storage.retention import purge_series
from denoised_node.storage.runtime import Runtime, open_runtime
from denoised_node.storage.schema import upgrade
from tests.fixtures.identity import StudyInfo
from tests.fixtures.mr_series import GeneratedSeries, MRSeriesSpec, generate_series
from tests.unit.conftest import ScaledDenoiser, make_settings

MR = "1.2.840.10008.5.1.4.1.1.4"
PATIENT = StudyInfo(seed=7, patient_name="Doe^Jane", patient_id="PID-7731",
                    patient_birth_date="19610214")
PATIENT_STRINGS = ("Doe^Jane", "Doe", "PID-7731", "19610214", "1961-02-14")


class FailingFor:
    """Sends every derived series except the one made from ``series``."""

    def __init__(self, series: GeneratedSeries) -> None:
        self.failing = set(series.sop_instance_uids)

    def __call__(self, settings: Settings, destination: Destination,
                 files: Sequence[Path], progress: object = None) -> SendResult:
        derived = pydicom.dcmread(files[0], stop_before_pixels=True)
        if derived.SourceImageSequence[0].ReferencedSOPInstanceUID in self.failing:
            raise SendError(f"{destination.name}: association rejected")
        return SendResult(destination.name, len(files))


@dataclass
class Node:
    runtime: Runtime
    pages: StatusPages
    done: GeneratedSeries
    failed: GeneratedSeries
    done_job: int
    failed_job: int

    def get(self, target: str, **headers: str) -> Response:
        return self.pages.handle(Request.build("GET", target, {"Host": "127.0.0.1:8080",
                                                               **headers}))

    def post(self, target: str, form: str, **headers: str) -> Response:
        return self.pages.handle(Request.build(
            "POST", target, {"Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080",
                             "Content-Type": "application/x-www-form-urlencoded", **headers},
            form.encode()))

    def job_state(self, job_id: int) -> str:
        with self.runtime.sessions() as session:
            return session.get_one(Job, job_id).state


def _readiness() -> Readiness:
    return Readiness([("database", lambda: CheckResult(True, "sqlite reachable")),
                      ("disk", lambda: CheckResult(True, "1000 MiB free"))])


def _slow() -> SlowChecks:
    return SlowChecks([("destination pacs", lambda: CheckResult(False, "PACS: no answer"))])


def build_node(settings: Settings, series_factory: Callable[..., GeneratedSeries],
               denoiser: object) -> Node:
    upgrade(make_engine(settings.database_url))
    runtime = open_runtime(settings)
    done = series_factory(study=PATIENT, seed=7, slices=9)
    failed = series_factory(study=PATIENT, seed=8, slices=6, series_number=4,
                            series_description="T2 AX")
    receiver = Receiver(runtime.store, runtime.sessions, settings)
    for path in [*done.paths, *failed.paths]:
        receiver.receive(path.read_bytes(), MR, "MR_SCANNER")
    with runtime.sessions.begin() as session:
        for series in session.scalars(select(Series)):
            series.last_received_at -= timedelta(minutes=5)
    complete_idle_series(runtime.sessions, settings.series)
    worker = Worker(settings, runtime.sessions, runtime.store, denoiser,  # type: ignore[arg-type]
                    worker_id="test-worker", sender=FailingFor(failed))
    worker.run(burst=True)
    with runtime.sessions() as session:
        jobs = {s.series_uid: j.id for j, s in session.execute(
            select(Job, Series).join(Series, Job.series_id == Series.id))}
    pages = StatusPages(settings, runtime.sessions, runtime.store, _readiness(), slow=_slow())
    return Node(runtime, pages, done, failed, jobs[done.series_uid], jobs[failed.series_uid])


@pytest.fixture
def node(settings_factory: Callable[..., Settings],
         mr_series_factory: Callable[..., GeneratedSeries], fake_denoiser: object) -> Node:
    """A node of its own, for a test that changes the database, the store or the pages."""
    settings = settings_factory(send__max_attempts=1)
    return build_node(settings, mr_series_factory, fake_denoiser)


@pytest.fixture(scope="module")
def read_only_node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    """The same node built once for the tests that only GET pages (receiving, denoising and
    sending its two series is what takes the time); a test that writes takes `node`."""
    root = tmp_path_factory.mktemp("web-pages")
    numbers = itertools.count(1)

    def series_factory(spec: MRSeriesSpec | None = None, **overrides: Any) -> GeneratedSeries:
        return generate_series(root / f"series{next(numbers)}", spec, **overrides)

    return build_node(make_settings(root, send__max_attempts=1), series_factory,
                      ScaledDenoiser())


def _html(response: Response) -> str:
    assert response.content_type == "text/html; charset=utf-8"
    return response.body.decode()


def _token(html: str) -> str:
    found = re.search(rf'name="{TOKEN_FIELD}" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def _no_patient_data(text: str) -> None:
    for value in PATIENT_STRINGS:
        assert value not in text


def test_the_run_behind_the_pages(read_only_node: Node) -> None:
    node = read_only_node
    assert node.job_state(node.done_job) == "done"
    assert node.job_state(node.failed_job) == "failed"


def test_overview_shows_health_counts_and_the_last_hour(read_only_node: Node) -> None:
    node = read_only_node
    response = node.get("/")
    html = _html(response)
    assert response.status == 200
    assert '<meta http-equiv="refresh" content="30">' in html
    for name in ("database", "disk", "destination pacs"):
        assert f'<th scope="row">{name}</th>' in html
    assert "sqlite reachable" in html
    for state in ("done", "failed"):
        assert f'<span class="count">1</span><span class="label">{state}</span>' in html
    assert re.search(r"series denoised and sent</th><td class=\"num\">1<", html)
    assert re.search(r"instances received</th><td class=\"num\">15<", html)
    assert re.search(r"derived instances sent</th><td class=\"num\">9<", html)
    for label in ("receive", "wait", "denoise", "send", "total"):
        assert f'<th scope="row">{label}</th>' in html
    assert "association rejected" in html  # the failed job, with its reason
    assert f'action="/jobs/{node.failed_job}/replay"' in html
    assert "unit-test-model-1" in html  # the model of the latest job
    _no_patient_data(html)


def test_slow_checks_never_hold_up_a_page(node: Node) -> None:
    release = threading.Event()

    def slow_echo() -> CheckResult:
        release.wait(10)
        return CheckResult(True, "C-ECHO answered at last")

    node.pages.slow = SlowChecks([("destination slow", slow_echo)])
    html = _html(node.get("/"))
    release.set()
    assert 'destination slow</th><td><span class="check check-wait">checking</span>' in html
    assert "at last" not in html


def test_jobs_lists_states_stage_times_and_a_replay_button_for_failed(read_only_node: Node) -> None:
    node = read_only_node
    html = _html(node.get("/jobs"))
    done_row = re.search(rf'<tr class="row-done" data-job="{node.done_job}">(.*?)</tr>', html,
                         re.DOTALL)
    failed_row = re.search(rf'<tr class="row-failed" data-job="{node.failed_job}">(.*?)</tr>',
                           html, re.DOTALL)
    assert done_row and failed_row
    assert "9 → 9" in done_row.group(1)  # instances received, derived
    assert re.search(r'<td class="num">\d+\.\d s</td>', done_row.group(1))  # stage times
    assert "replay" not in done_row.group(1)
    assert "association rejected" in failed_row.group(1)
    assert f'action="/jobs/{node.failed_job}/replay"' in failed_row.group(1)
    filtered = _html(node.get("/jobs?state=failed"))
    assert (
        f'data-job="{node.failed_job}"' in filtered
        and f'data-job="{node.done_job}"' not in filtered
    )
    _no_patient_data(html)


def test_series_page_shows_before_after_residual_and_gate_figures(read_only_node: Node) -> None:
    node = read_only_node
    response = node.get(f"/series/{node.done.series_uid}")
    html = _html(response)
    assert response.status == 200
    assert "T1 AX" in html and "MR_SCANNER" in html  # from the header and the index
    for kind in ("before", "after", "residual"):
        assert f'src="/jobs/{node.done_job}/{kind}.png?stack=0"' in html
    assert "slice 5 of 9" in html
    for figure in ("residual_mean_ratio", "residual_std_ratio", "edge_correlation",
                   "tissue_mean_change", "sigma_estimate"):
        assert f"<code>{figure}</code>" in html
    assert "gate.enabled = false" in html  # the unit settings turn the gate off
    _no_patient_data(html)
    assert "<h3>Patient</h3>" not in html


def test_the_pictures_are_pngs_of_the_middle_slice(read_only_node: Node) -> None:
    node = read_only_node
    sizes = set()
    for kind in ("before", "after", "residual"):
        response = node.get(f"/jobs/{node.done_job}/{kind}.png?stack=0")
        assert (response.status, response.content_type) == (200, "image/png")
        image = Image.open(io.BytesIO(response.body))
        assert image.mode == "L"
        sizes.add(image.size)
        assert len(set(image.tobytes())) > 1, f"{kind} is flat"
    assert sizes == {(4 * 56, 4 * 64)}  # 64x56 enlarged by whole pixels to at least 256


def test_a_failed_job_shows_its_reason_and_what_it_wrote(node: Node) -> None:
    html = _html(node.get(f"/series/{node.failed.series_uid}"))
    assert "association rejected" in html and f'action="/jobs/{node.failed_job}/replay"' in html
    # It failed while sending: its derived series is in the store, so all three pictures.
    for kind in ("before", "after", "residual"):
        assert f'src="/jobs/{node.failed_job}/{kind}.png?stack=0"' in html
    # A job the safety gate failed wrote nothing: the source alone, and the reason.
    with node.runtime.sessions.begin() as session:
        job = session.get_one(Job, node.failed_job)
        job.derived_count, job.reason = None, "safety gate failed on stack 64x56: residual"
        job.updated_at = utcnow()  # as every transition does
    html = _html(node.get(f"/series/{node.failed.series_uid}"))
    assert f'src="/jobs/{node.failed_job}/before.png?stack=0"' in html
    assert "after.png" not in html
    assert "failed before writing a derived series: safety gate failed" in html
    assert node.get(f"/jobs/{node.failed_job}/after.png").status == 404


class Shifting(ScaledDenoiser):
    """Brightens every value: the safety gate refuses the result."""

    def denoise(self, volume: Any, progress: Any = None, spacing: Any = None) -> Any:
        return volume * 1.5


def test_a_gate_refusal_shows_the_refused_result_marked_not_sent(
        settings_factory: Callable[..., Settings],
        mr_series_factory: Callable[..., GeneratedSeries]) -> None:
    settings = settings_factory(send__max_attempts=1, gate__enabled=True)
    node = build_node(settings, mr_series_factory, Shifting())
    with node.runtime.sessions() as session:
        job = session.get_one(Job, node.done_job)
        assert job.state == "failed" and "safety gate failed" in (job.reason or "")
    refused = sorted(node.runtime.store.refused_dir(node.done_job).glob("*.dcm"))
    assert len(refused) == len(node.done.paths)  # the refused stack, nothing more
    assert not list(node.runtime.store.derived_dir(node.done_job).glob("*.dcm"))  # never sent
    html = _html(node.get(f"/series/{node.done.series_uid}"))
    for kind in ("before", "after", "residual"):
        assert f'src="/jobs/{node.done_job}/{kind}.png?stack=0"' in html
        assert node.get(f"/jobs/{node.done_job}/{kind}.png").status == 200
    assert "Refused, not sent" in html and "it was not sent to any destination" in html
    assert "tissue_mean_change" in html  # the gate's figures, recomputed on the refused result
    # Retention purges it with the series.
    with node.runtime.sessions.begin() as session:
        purge_series(session, node.runtime.store,
                     session.scalars(select(Series).where(
                         Series.series_uid == node.done.series_uid)).one(), utcnow())
    assert not node.runtime.store.refused_dir(node.done_job).exists()


def test_a_purged_series_says_so_and_has_no_pictures(node: Node) -> None:
    with node.runtime.sessions.begin() as session:
        series = session.scalars(select(Series).where(
            Series.series_uid == node.done.series_uid)).one()
        purge_series(session, node.runtime.store, series, utcnow())
    html = _html(node.get(f"/series/{node.done.series_uid}"))
    assert "were purged on" in html and ".png" not in html
    assert node.get(f"/jobs/{node.done_job}/before.png").status == 404
    assert _html(node.get("/jobs")).count("purged") >= 1


def test_replay_needs_the_pages_token_and_requeues_through_admin(node: Node) -> None:
    refused = node.post(f"/jobs/{node.failed_job}/replay", f"{TOKEN_FIELD}=forged")
    assert refused.status == 403 and "reload the page" in _html(refused)
    token = _token(_html(node.get("/jobs")))
    elsewhere = node.post(f"/jobs/{node.failed_job}/replay", f"{TOKEN_FIELD}={token}",
                          Origin="https://evil.example")
    assert elsewhere.status == 403 and "another site" in _html(elsewhere)
    assert node.job_state(node.failed_job) == "failed"

    accepted = node.post(f"/jobs/{node.failed_job}/replay", f"{TOKEN_FIELD}={token}")
    assert accepted.status == 200 and f"job {node.failed_job} queued" in _html(accepted)
    assert node.job_state(node.failed_job) == "queued"
    with node.runtime.sessions() as session:
        last = session.scalars(select(JobEvent).where(JobEvent.job_id == node.failed_job)
                               .order_by(JobEvent.id.desc())).first()
    assert last is not None and (last.worker, last.reason) == ("web", "replayed by web")

    again = node.post(f"/jobs/{node.failed_job}/replay", f"{TOKEN_FIELD}={token}")
    assert again.status == 409 and "already queued" in _html(again)
    assert node.post("/jobs/999/replay", f"{TOKEN_FIELD}={token}").status == 404


def test_text_from_the_database_is_escaped(node: Node) -> None:
    with node.runtime.sessions.begin() as session:
        session.get_one(Job, node.failed_job).reason = '<script>alert("x")</script>'
    for page in ("/", "/jobs", f"/series/{node.failed.series_uid}"):
        html = _html(node.get(page))
        assert "<script>" not in html and "&lt;script&gt;" in html


def test_patient_data_only_where_the_setting_allows(
    settings_factory: Callable[..., Settings],
    mr_series_factory: Callable[..., GeneratedSeries],
    fake_denoiser: object,
) -> None:
    settings = settings_factory(send__max_attempts=1, http__show_patient_data=True)
    shown = build_node(settings, mr_series_factory, fake_denoiser)
    html = _html(shown.get(f"/series/{shown.done.series_uid}"))
    assert "Doe^Jane" in html and "PID-7731" in html and "19610214" in html
    _no_patient_data(_html(shown.get("/jobs")) + _html(shown.get("/")))


def test_unknown_paths_methods_and_uids(read_only_node: Node) -> None:
    node = read_only_node
    assert node.get("/nothing").status == 404
    assert node.get("/series/1.2.3").status == 404
    assert node.get("/series/not-a-uid").status == 404
    assert node.get("/jobs/12345").status == 404
    assert node.get(f"/jobs/{node.done_job}/replay").status == 405
    redirect = node.get(f"/jobs/{node.done_job}")
    assert redirect.status == 303
    assert dict(redirect.headers)["Location"] == (f"/series/{node.done.series_uid}"
                                                  f"?job={node.done_job}")
    css = node.get("/static/style.css")
    assert css.status == 200 and css.content_type.startswith("text/css")


def test_every_page_carries_the_security_headers(read_only_node: Node) -> None:
    node = read_only_node
    headers = dict(node.get("/").all_headers())
    assert "script-src" not in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"


def test_a_series_of_several_stacks_offers_each(settings_factory: Callable[..., Settings],
                                                mr_series_factory: Callable[..., GeneratedSeries],
                                                fake_denoiser: object) -> None:
    settings = settings_factory()
    upgrade(make_engine(settings.database_url))
    runtime = open_runtime(settings)
    series = mr_series_factory(seed=9, slices=4, echoes=2)
    receiver = Receiver(runtime.store, runtime.sessions, settings)
    for path in series.paths:
        receiver.receive(path.read_bytes(), MR, "MR_SCANNER")
    with runtime.sessions.begin() as session:
        for row in session.scalars(select(Series)):
            row.last_received_at -= timedelta(minutes=5)
    complete_idle_series(runtime.sessions, settings.series)
    Worker(
        settings,
        runtime.sessions,
        runtime.store,
        fake_denoiser,  # type: ignore[arg-type]
        worker_id="w",
        sender=lambda s, d, f, progress: SendResult(d.name, len(f)),
    ).run(burst=True)
    pages = StatusPages(settings, runtime.sessions, runtime.store, _readiness(), slow=_slow())
    html = pages.handle(Request.build("GET", f"/series/{series.series_uid}",
                                      {"Host": "127.0.0.1"})).body.decode()
    assert "64x56, echo 1" in html and "64x56, echo 2" in html
    second = pages.handle(Request.build("GET", f"/series/{series.series_uid}?job=1&stack=1",
                                        {"Host": "127.0.0.1"})).body.decode()
    assert 'src="/jobs/1/after.png?stack=1"' in second and "(64x56, echo 2)" in second
    image = pages.handle(Request.build("GET", "/jobs/1/residual.png?stack=1",
                                       {"Host": "127.0.0.1"}))
    assert image.status == 200 and image.body.startswith(b"\x89PNG")
