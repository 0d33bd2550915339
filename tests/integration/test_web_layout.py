"""The status pages' layout in a real headless browser (Debian's chromium driven by
Playwright): pages a unit test's node renders, at the window sizes an administrator uses.
No server: the browser's requests are answered by StatusPages.handle (Playwright routing)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from sqlalchemy import update

from denoised_node.daemon.web.request import Request
from denoised_node.storage.models import Job, JobEvent
from tests.fixtures.mr_series import GeneratedSeries, generate_series
from tests.integration.test_web_browser import SCREENSHOTS
from tests.unit.conftest import ScaledDenoiser, make_settings
from tests.unit.test_web_pages import Node, build_node

pytestmark = pytest.mark.integration

BASE = "http://127.0.0.1:8080"
# What a real node's rows hold at their longest: the shipped model's identity, a send failure
# that names its cause and fix, a long series description.
MODEL = "dn-unet25d-mr-denoise-1.0-152b2715e398"
REASON = ("send to pacs failed: association rejected (permanent): called AE title not "
          "recognised: the destination PACS at 10.20.30.40:104 does not know the AE title "
          "PACS_MAIN_ARCHIVE; set destinations.ae_title to the PACS's own AE title, then "
          "replay the job (send attempt 1 of 20)")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Node:
    root = tmp_path_factory.mktemp("layout")
    numbers = itertools.count(1)

    def series_factory(**spec: Any) -> GeneratedSeries:
        return generate_series(root / f"series{next(numbers)}", **spec)

    built = build_node(make_settings(root, send__max_attempts=1), series_factory,
                       ScaledDenoiser())
    with built.runtime.sessions.begin() as session:
        session.execute(update(Job).values(model_identity=MODEL))
        session.execute(update(Job).where(Job.id == built.failed_job).values(reason=REASON))
        session.execute(update(JobEvent).where(JobEvent.job_id == built.failed_job,
                                               JobEvent.to_state == "failed")
                        .values(reason=REASON))
    return built


def _open(browser: Any, node: Node, path: str, width: int) -> Any:
    page = browser.new_context(viewport={"width": width, "height": 900}).new_page()

    def answer(route: Any) -> None:
        asked = route.request
        target = asked.url.removeprefix(BASE)
        response = node.pages.handle(Request.build(asked.method, target,
                                                   {"Host": "127.0.0.1:8080"}))
        route.fulfill(status=response.status, body=response.body,
                      headers={"Content-Type": response.content_type})

    page.route(f"{BASE}/**", answer)
    page.goto(f"{BASE}{path}")
    return page


@pytest.mark.parametrize("width", [1400, 1024])
def test_the_jobs_table_fits_the_window(node: Node, browser: Any, width: int) -> None:
    """Issue 30, item 14: the /jobs table overflowed a 1400 px window (1568 px wide). At 1400
    px it fits whole; in a narrower window the table scrolls in its box, never the page."""
    page = _open(browser, node, "/jobs", width)
    assert page.locator("table.jobs tbody tr").count() == 2
    assert REASON[:40] in page.content()
    sizes = page.evaluate("""() => ({
        page: document.documentElement.scrollWidth, window: window.innerWidth,
        table: document.querySelector('table.jobs').getBoundingClientRect().right})""")
    assert sizes["page"] <= sizes["window"], sizes
    if width >= 1400:
        assert sizes["table"] <= sizes["window"], sizes
    if SCREENSHOTS:
        page.screenshot(path=f"{SCREENSHOTS}/layout-jobs-{width}.png", full_page=True)
