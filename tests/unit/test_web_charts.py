"""The overview's 24-hour charts: hourly figures from the job history, drawn as inline SVG."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from denoised_node.daemon.web.charts import Chart, bar_chart, day_charts
from denoised_node.storage.models import Job, JobEvent, Series
from denoised_node.storage.queue import JobState, kind_of_move
from denoised_node.storage.runtime import Runtime

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def _job(runtime: Runtime, uid: str, moves: list[tuple[float, str | None, str]]) -> None:
    """A series and one job with events ``(hours before NOW, from, to)``."""
    with runtime.sessions.begin() as session:
        first = NOW - timedelta(hours=moves[0][0], minutes=2)
        series = Series(study_uid="1.2", series_uid=uid, state="receiving",
                        first_received_at=first, last_received_at=first)
        session.add(series)
        session.flush()
        job = Job(series_id=series.id, state=moves[-1][2], series_revision=1)
        session.add(job)
        session.flush()
        for hours, from_state, to_state in moves:
            before = None if from_state is None else JobState(from_state)
            session.add(JobEvent(job_id=job.id, at=NOW - timedelta(hours=hours),
                                 from_state=from_state, to_state=to_state,
                                 kind=kind_of_move(before, JobState(to_state)).value))


def test_hourly_sent_failed_latency_and_waiting(runtime: Runtime) -> None:
    _job(runtime, "1.2.1", [(3.5, None, "queued"), (3.45, "queued", "processing"),
                            (3.4, "processing", "processed"), (3.4, "processed", "sending"),
                            (3.35, "sending", "done")])
    _job(runtime, "1.2.2", [(2.5, None, "queued"), (2.4, "queued", "processing"),
                            (2.3, "processing", "failed")])
    _job(runtime, "1.2.3", [(30, None, "queued")])  # queued before the window, still waiting
    _job(runtime, "1.2.4", [(1.2, None, "queued"), (0.5, "queued", "processing")])
    with runtime.sessions() as session:
        sent, failed, latency, waiting = day_charts(session, NOW)
    assert sent.values[-4] == 1 and sum(sent.values) == 1
    assert failed.values[-3] == 1 and sum(failed.values) == 1
    assert 9 * 60 < latency.values[-4] < 12 * 60  # first instance 3h32 ago, sent 3h21 ago
    assert waiting.values[0] == 1  # the job queued 30 h ago
    assert waiting.values[-2] == 2 and waiting.values[-1] == 1  # 1.2.4 waited, then was claimed


def test_the_svg_has_a_bar_per_hour_and_no_inline_style() -> None:
    chart = Chart("series sent", [0.0] * 23 + [4.0], [NOW - timedelta(hours=23 - h)
                                                       for h in range(24)], "")
    svg = str(bar_chart(chart))
    assert svg.count("<rect") == 24 and "style=" not in svg and "<script" not in svg
    assert "peak 4" in svg and "11:00-12:00Z: 4" in svg
    assert '<text x="0" y="10" class="chart-title">series sent</text>' in svg
    escaped = str(bar_chart(Chart("<b>", [1.0], [NOW], "")))
    assert "<b>" not in escaped and "&lt;b&gt;" in escaped


def test_an_empty_node_draws_flat_charts(runtime: Runtime) -> None:
    with runtime.sessions() as session:
        charts = day_charts(session, NOW)
        assert session.scalars(select(Job)).all() == []
    assert [c.values for c in charts] == [[0.0] * 24] * 4
    assert all(str(c.svg()).count("<rect") == 24 for c in charts)
