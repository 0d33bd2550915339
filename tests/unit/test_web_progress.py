"""The pages show what a waiting person wants to know: how far a job is, that a send is
retrying (attempt n of m, the last error, when the next comes), and a health check whose
answer is old."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from denoised_node.config.settings import Settings
from denoised_node.daemon.web.health_rows import SlowChecks
from denoised_node.daemon.web.probes import CheckResult
from denoised_node.storage.models import Job, utcnow
from denoised_node.storage.progress import ProgressRecorder
from denoised_node.storage.queue import JobState, transition
from tests.fixtures.mr_series import GeneratedSeries
from tests.unit.test_web_pages import Node, _html, build_node


def _node(settings_factory: Callable[..., Settings],
          mr_series_factory: Callable[..., GeneratedSeries], fake_denoiser: object) -> Node:
    return build_node(settings_factory(send__max_attempts=5), mr_series_factory, fake_denoiser)


def test_a_sending_job_shows_its_progress_and_a_retrying_one_its_next_attempt(
        settings_factory, mr_series_factory, fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    node = _node(settings_factory, mr_series_factory, fake_denoiser)
    # With five attempts allowed, the series whose send fails waits to try again.
    assert node.job_state(node.failed_job) == "processed"
    with node.runtime.sessions.begin() as session:
        session.get_one(Job, node.failed_job).available_at = utcnow() + timedelta(seconds=50)
        transition(session, node.done_job, JobState.DONE, JobState.QUEUED, reason="replayed")
        transition(session, node.done_job, JobState.QUEUED, JobState.PROCESSING,
                   lease_owner="w", reason="claimed")
    ProgressRecorder(node.runtime.sessions, node.done_job, "w", "denoise")(3, 9)

    jobs = _html(node.get("/jobs"))
    assert "retrying: send attempt 2 of 5 in" in jobs
    assert "last error: SendError: pacs: association rejected" in jobs
    assert "denoise 33% (3/9 slices)" in jobs
    assert '<progress max="9" value="3"' in jobs
    assert 'http-equiv="refresh"' in jobs  # a job in hand: the page follows it
    series = _html(node.get(f"/series/{node.done.series_uid}"))
    assert "denoise 33% (3/9 slices)" in series
    overview = _html(node.get("/"))
    assert "retrying after a failure" in overview


def test_an_old_check_answer_is_shown_as_stale() -> None:
    checks = SlowChecks([("destination pacs", lambda: CheckResult(True, "PACS: answered"))],
                        refresh=0.05)
    checks.rows(wait=5.0)
    (fresh,) = checks.rows()
    assert fresh.ok and not fresh.stale
    checks._running = True  # the next check hangs (an echo waiting out its timeout)
    import time

    time.sleep(0.15)
    (old,) = checks.rows()
    assert old.ok and old.stale and old.age_seconds is not None and old.age_seconds > 0.1


def test_the_overview_marks_a_stale_check_amber(settings_factory, mr_series_factory,  # type: ignore[no-untyped-def]
                                                fake_denoiser) -> None:
    node = _node(settings_factory, mr_series_factory, fake_denoiser)
    stale = SlowChecks([("destination pacs", lambda: CheckResult(True, "PACS: answered"))],
                       refresh=0.05)
    stale.rows(wait=5.0)
    stale._running = True
    import time

    time.sleep(0.15)
    node.pages.slow = stale
    html = _html(node.get("/"))
    assert 'class="check check-wait check-stale"' in html and "stale: ok" in html
