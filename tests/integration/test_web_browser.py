"""The status pages in a real headless browser (Debian's chromium driven by Playwright) over a
real run: storescu sends two MR series to `denoised-node serve`; the first is denoised and sent
to Orthanc, the second fails to send while Orthanc is down. Orthanc comes back; the
administrator opens the pages, looks at the finished series' pictures, and replays the failed
job with a click.

STATUS_PAGE_SCREENSHOTS=docs/images saves a screenshot of each page there (the docs' ones).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.identity import StudyInfo
from tests.fixtures.mr_series import GeneratedSeries, generate_series
from tests.integration.node import NODE_AET, Node, node_config, start_node
from tests.integration.peers import (
    ManagedProcess,
    Modality,
    Orthanc,
    echoscu,
    free_port,
    nodelay_env,
    require_tool,
    start_orthanc,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# No sandbox (root in CI), no GPU, and nothing that talks to the network on its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = os.environ.get("STATUS_PAGE_SCREENSHOTS")
PATIENT = StudyInfo(seed=31, patient_name="Okonkwo^Adaeze", patient_id="PID-55120-WEB",
                    patient_birth_date="19580923")
FORBIDDEN = ("Okonkwo", "Adaeze", "PID-55120-WEB", "55120", "19580923", "1958-09-23")

@dataclass
class Run:
    node: Node
    orthanc: Orthanc
    base: str  # the status pages' URL
    done: GeneratedSeries
    failed: GeneratedSeries

    def job_of(self, series: GeneratedSeries) -> dict[str, Any]:
        (job,) = [j for j in self.node.jobs() if j["series_uid"] == series.series_uid]
        return job


def _restart(orthanc: Orthanc) -> None:
    """Start Orthanc again on its configuration (same ports, same storage)."""
    orthanc.process = ManagedProcess.start(
        [require_tool("Orthanc"), f"--logfile={orthanc.workdir / 'orthanc-again.log'}",
         str(orthanc.workdir / "orthanc.json")],
        log=orthanc.workdir / "orthanc-again.stdout", env=nodelay_env(), cwd=orthanc.workdir)
    wait_until(lambda: orthanc.process.check_alive() and echoscu(
        "127.0.0.1", orthanc.dicom_port, orthanc.aet), timeout=60, what="Orthanc back")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("web")
    node_port, http_port = free_port(), free_port()
    orthanc = start_orthanc(workdir / "orthanc",
                            modalities={NODE_AET: Modality(NODE_AET, node_port)})
    node = None
    try:
        config = node_config(workdir, node_port, orthanc,
                             http={"enabled": True, "port": http_port},
                             send={"max_attempts": 1})
        node = start_node(config, node_port, workdir / "node.log")
        done = generate_series(workdir / "t1", study=PATIENT, seed=31, slices=16, rows=256,
                               columns=224, noise_sigma=60.0)
        failed = generate_series(workdir / "t2", study=PATIENT, seed=32, slices=8, rows=128,
                                 columns=128, series_number=5, series_description="T2 AX")
        storescu(done.directory, "127.0.0.1", node_port, "MR_SCANNER", NODE_AET)
        orthanc.wait_for_series(done.study_uid, lambda s: s["MainDicomTags"].get(
            "SeriesDescription", "") == "T1 AX DENOISED", count=16, timeout=300)
        result = Run(node, orthanc, f"http://127.0.0.1:{http_port}", done, failed)
        wait_until(lambda: result.job_of(done)["state"] == "done", timeout=60,
                   what="the T1 job done")
        orthanc.process.stop()  # the PACS goes down
        storescu(failed.directory, "127.0.0.1", node_port, "MR_SCANNER", NODE_AET)
        wait_until(lambda: any(j["series_uid"] == failed.series_uid for j in node.jobs("failed")),
                   timeout=300, what="the T2 job failed (Orthanc down)")
        _restart(orthanc)
        yield result
    finally:
        if node is not None:
            node.process.stop(timeout=60)
        orthanc.stop()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    yield opened
    context.close()
    assert problems == [], f"the browser reported errors: {problems}"


def _screenshot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        folder = Path(SCREENSHOTS)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"status-{name}.png"), full_page=True)


def _no_patient_data(page: Any) -> None:
    text = page.content()
    for value in FORBIDDEN:
        # Whole values only: a random UID's digits may hold "55120" by chance (a flaky failure).
        assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(value)}(?![0-9A-Za-z])", text), value


def test_overview_shows_health_and_the_run(run: Run, page: Any) -> None:
    response = page.goto(f"{run.base}/?wait=1")  # wait for the C-ECHO to Orthanc
    assert response.status == 200
    assert page.title().startswith("Overview")
    health = page.locator("table.health")
    for check in ("database", "model", "disk", "scp", "model file", "destination orthanc"):
        row = health.locator("tr", has=page.locator(f"th:text-is('{check}')"))
        assert row.locator(".check").inner_text() == "ok", f"{check}: {row.inner_text()}"
    assert page.locator(".tile-done .count").inner_text() == "1"
    assert page.locator(".tile-failed .count").inner_text() == "1"
    hour = page.locator("table.hour").inner_text()
    assert re.search(r"series denoised and sent\s+1", hour)
    assert re.search(r"instances received\s+24", hour)
    assert page.locator("table.latency th:text-is('total')").count() == 1
    charts = page.locator("svg.chart")
    assert charts.count() == 4
    sent = page.locator("svg.chart[aria-label^='series sent']")
    assert sent.locator("rect.chart-bar").count() == 24
    assert sent.locator("rect.chart-bar").last.get_attribute("height") != "0.0"  # this hour: 1
    assert "peak 1" in (sent.text_content() or "")
    _no_patient_data(page)
    _screenshot(page, "overview")


def test_series_page_shows_the_finished_series_with_its_pictures(run: Run, page: Any) -> None:
    page.goto(f"{run.base}/jobs")
    row = page.locator(f"tr[data-job='{run.job_of(run.done)['id']}']")
    assert row.locator(".state").inner_text() == "done"
    row.locator("a[href^='/series/']").click()
    page.wait_for_load_state()
    assert run.done.series_uid in page.locator("h1").inner_text()
    assert "T1 AX" in page.locator("dl.facts").first.inner_text()
    images = page.locator(".pictures img")
    assert images.count() == 3
    for index in range(3):
        image = images.nth(index)
        image.scroll_into_view_if_needed()
        loaded = image.evaluate("img => img.complete && img.naturalWidth")
        assert loaded == 224, f"{image.get_attribute('src')} did not load"
    assert "slice 9 of 16" in page.locator(".pictures").inner_text()
    gate = page.locator("table.gate").inner_text()
    for figure in ("residual_mean_ratio", "residual_std_ratio", "edge_correlation",
                   "tissue_mean_change"):
        assert figure in gate
    assert "passes" in page.locator("section", has=page.locator("h2:text-is('Safety gate')")
                                    ).inner_text()
    _no_patient_data(page)
    _screenshot(page, "series")


def test_a_replay_click_requeues_the_failed_job(run: Run, page: Any) -> None:
    failed = run.job_of(run.failed)
    assert failed["state"] == "failed"
    page.goto(f"{run.base}/jobs")
    row = page.locator(f"tr[data-job='{failed['id']}']")
    assert row.locator(".state").inner_text() == "failed"
    assert "send attempt 1 of 1" in row.locator(".reason").inner_text()
    # Named as people look it up, with the model that denoised it.
    assert re.search(r"MR \d{4}-\d{2}-\d{2} #5 T2 AX", row.inner_text())
    assert row.locator(".model").inner_text().strip()
    _no_patient_data(page)
    _screenshot(page, "jobs")

    row.locator("button", has_text="Replay").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "Queued again"
    assert f"job {failed['id']} queued" in page.locator(".message").inner_text()
    _screenshot(page, "replayed")
    events = run.node.cli("jobs", "show", str(failed["id"]), "--json").stdout
    assert '"replayed by web"' in events

    run.orthanc.wait_for_series(run.failed.study_uid, lambda s: s["MainDicomTags"].get(
        "SeriesDescription", "") == "T2 AX DENOISED", count=8, timeout=300)
    wait_until(lambda: run.job_of(run.failed)["state"] == "done", timeout=60,
               what="the replayed job done")
    page.goto(f"{run.base}/jobs?state=done")
    assert page.locator(f"tr[data-job='{failed['id']}'] .state").inner_text() == "done"
