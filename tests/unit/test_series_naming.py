"""Series named as people look them up: description, number, date and modality kept on the
series row at receive time, shown by `jobs list` and the jobs page with the model a job
used; no patient attribute."""

from __future__ import annotations

from collections.abc import Callable

from click.testing import CliRunner
from sqlalchemy import select

from denoised_node.config.settings import Settings
from denoised_node.daemon.cli.main import main
from denoised_node.daemon.jobs.queries import list_jobs
from denoised_node.storage.models import Series
from tests.fixtures.mr_series import GeneratedSeries
from tests.unit.test_web_pages import PATIENT_STRINGS, _html, build_node


def test_series_row_jobs_list_and_page_name_the_series(
        settings_factory: Callable[..., Settings],
        mr_series_factory: Callable[..., GeneratedSeries], fake_denoiser: object,
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings = settings_factory(send__max_attempts=1)
    node = build_node(settings, mr_series_factory, fake_denoiser)
    with node.runtime.sessions() as session:
        failed = session.scalars(select(Series).where(
            Series.series_uid == node.failed.series_uid)).one()
        assert (failed.description, failed.series_number) == ("T2 AX", 4)
        assert failed.series_date is not None and len(failed.series_date) == 8
        rows = {row.id: row for row in list_jobs(session)}
    name = rows[node.failed_job].series_name
    assert name.startswith("MR ") and name.endswith(" #4 T2 AX")

    jobs = _html(node.get("/jobs"))
    assert "#4 T2 AX" in jobs and fake_denoiser.identity in jobs  # type: ignore[attr-defined]
    for value in PATIENT_STRINGS:
        assert value not in jobs

    monkeypatch.setenv("DENOISED_NODE_NODE__DATA_DIR", str(settings.node.data_dir))
    monkeypatch.setenv("DENOISED_NODE_NODE__MIN_FREE_MB", "0")
    result = CliRunner().invoke(main, ["jobs", "list"])
    assert result.exit_code == 0, result.output
    assert "#4 T2 AX" in result.stdout and node.failed.series_uid in result.stdout
    assert f"model {fake_denoiser.identity}" in result.stdout  # type: ignore[attr-defined]
    for value in PATIENT_STRINGS:
        assert value not in result.stdout
