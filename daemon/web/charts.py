"""The overview's last 24 hours as small charts drawn on the server (inline SVG, no script):
series sent, series failed, the median time from first instance to sent, and the jobs
waiting, per hour, all read from the job-event audit log."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup, escape
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from denoised_node.daemon.web.activity import events_by_job, stage_seconds
from denoised_node.daemon.web.formatting import duration
from denoised_node.storage.models import Job, JobEvent, Series
from denoised_node.storage.queue import EventKind, JobState

HOURS = 24
_WAITING = {JobState.QUEUED.value, JobState.PROCESSED.value}


@dataclass(frozen=True)
class Chart:
    title: str
    values: list[float]  # one per hour, oldest first
    ends: list[datetime]  # the end of each hour
    unit: str  # "" counts; "s" seconds

    def label(self, value: float) -> str:
        return duration(value) if self.unit == "s" else f"{value:g}"

    def svg(self) -> Markup:
        return bar_chart(self)


def day_charts(session: Session, now: datetime) -> list[Chart]:
    """Series sent, failed, median latency and jobs waiting for each of the last 24 hours."""
    start = now - timedelta(hours=HOURS)
    ends = [start + timedelta(hours=h + 1) for h in range(HOURS)]

    def hour_of(moment: datetime) -> int:
        return min(HOURS - 1, max(0, int((moment - start).total_seconds() // 3600)))

    done, failed = [0.0] * HOURS, [0.0] * HOURS
    latencies: dict[int, list[float]] = defaultdict(list)
    ended = session.execute(select(JobEvent.job_id, JobEvent.to_state, JobEvent.at).where(
        JobEvent.at >= start, JobEvent.kind.in_([EventKind.SENT.value,
                                                 EventKind.FAILED.value]))).all()
    done_at = {job_id: at for job_id, state, at in ended if state == JobState.DONE}
    for _job_id, state, at in ended:
        (done if state == JobState.DONE else failed)[hour_of(at)] += 1
    if done_at:
        events = events_by_job(session, sorted(done_at))
        received = dict(session.execute(
            select(Job.id, Series.first_received_at).join(Series, Job.series_id == Series.id)
            .where(Job.id.in_(sorted(done_at)))).all())
        for job_id, at in done_at.items():
            total = stage_seconds(events[job_id], received[job_id]).get("end_to_end")
            if total is not None:
                latencies[hour_of(at)].append(total)
    median = [statistics.median(latencies[h]) if latencies[h] else 0.0 for h in range(HOURS)]
    return [Chart("series sent", done, ends, ""),
            Chart("series failed", failed, ends, ""),
            Chart("median first instance to sent", median, ends, "s"),
            Chart("jobs waiting at the hour's end",
                  waiting_at(session, start, ends), ends, "")]


def waiting_at(session: Session, start: datetime, ends: list[datetime]) -> list[float]:
    """How many jobs were queued or waiting to be sent at each moment of ``ends``."""
    # Each job's state at ``start`` (its last event before it), then its moves after.
    last_before = (select(JobEvent.job_id, func.max(JobEvent.id).label("last"))
                   .where(JobEvent.at < start).group_by(JobEvent.job_id).subquery())
    state = {job_id: to_state for job_id, to_state in session.execute(
        select(JobEvent.job_id, JobEvent.to_state)
        .join(last_before, JobEvent.id == last_before.c.last)
        .where(JobEvent.to_state.in_(list(_WAITING)))).all()}
    moves = session.execute(select(JobEvent.job_id, JobEvent.to_state, JobEvent.at)
                            .where(JobEvent.at >= start).order_by(JobEvent.at, JobEvent.id)).all()
    counts, index = [], 0
    for end in ends:
        while index < len(moves) and moves[index].at <= end:
            job_id, to_state, _at = moves[index]
            state[job_id] = to_state
            index += 1
        counts.append(float(sum(1 for s in state.values() if s in _WAITING)))
    return counts


# Drawing: plain SVG attributes (the pages' Content-Security-Policy allows no inline style).
_WIDTH, _HEIGHT, _TOP, _BOTTOM = 288, 96, 14, 16


def bar_chart(chart: Chart) -> Markup:
    peak = max(chart.values, default=0.0)
    scale = (_HEIGHT - _TOP - _BOTTOM) / peak if peak > 0 else 0.0
    step = _WIDTH / len(chart.values)
    parts = [(f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" '
              f'height="{_HEIGHT}" role="img" aria-label="{escape(chart.title)}, last 24 hours">'),
             f'<text x="0" y="10" class="chart-title">{escape(chart.title)}</text>',
             (f'<text x="{_WIDTH}" y="10" text-anchor="end" class="chart-peak">'
              f'peak {escape(chart.label(peak))}</text>')]
    base = _HEIGHT - _BOTTOM
    for index, (value, end) in enumerate(zip(chart.values, chart.ends, strict=True)):
        height = value * scale
        hour = f"{end - timedelta(hours=1):%H:%M}-{end:%H:%M}Z"
        parts.append(f'<rect class="chart-bar" x="{index * step + 1:.1f}" '
                     f'y="{base - height:.1f}" width="{step - 2:.1f}" height="{height:.1f}">'
                     f'<title>{hour}: {escape(chart.label(value))}</title></rect>')
    parts.append(f'<line class="chart-axis" x1="0" y1="{base}" x2="{_WIDTH}" y2="{base}"/>')
    parts.append(f'<text x="0" y="{_HEIGHT - 3}" class="chart-tick">-24 h</text>'
                 f'<text x="{_WIDTH}" y="{_HEIGHT - 3}" text-anchor="end" class="chart-tick">'
                 f'now</text></svg>')
    return Markup("".join(parts))
