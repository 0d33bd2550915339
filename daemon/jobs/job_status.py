"""One line that says what a job is doing now, for `jobs list|show` and the status pages:
how far its stage is, when its next attempt comes and why the last one failed, or why it
stopped. Pure: the caller passes the time and the attempt limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.queries import JobRow
from denoised_node.storage.queue import STAGES, JobState


@dataclass(frozen=True)
class AttemptLimits:
    """The attempt limit of each stage (storage.queue.STAGES), by the stage's state."""

    by_stage: Mapping[JobState, int]

    @classmethod
    def from_settings(cls, settings: Settings) -> AttemptLimits:
        return cls({state: stage.policy(settings).max_attempts
                    for state, stage in STAGES.items()})


def _in(seconds: float) -> str:
    if seconds < 1:
        return "now"
    if seconds < 90:
        return f"in {seconds:.0f} s"
    return f"in {seconds / 60:.0f} min"


def retry_note(row: JobRow, now: datetime, limits: AttemptLimits) -> str | None:
    """'send attempt 4 of 20 in 41 s (12:01:10Z)' for a job waiting to try again."""
    stage = next((stage for stage in STAGES.values()
                  if row.state == stage.back_to and getattr(row, stage.attempts_column)), None)
    if stage is None:
        return None
    failed = getattr(row, stage.attempts_column)
    note = f"{stage.attempt_noun} {failed + 1} of {limits.by_stage[stage.state]}"
    if row.available_at is not None:
        wait = (row.available_at - now).total_seconds()
        note += (f" {_in(wait)} ({row.available_at:%H:%M:%S}Z)" if wait >= 1
                 else ", due now (waiting for a free worker)")
    return note


def job_status(row: JobRow, now: datetime, limits: AttemptLimits) -> str | None:
    """What the job is doing, or why it stopped; None for a job done without remark."""
    if row.progress is not None:
        return row.progress.describe(now)
    retry = retry_note(row, now, limits)
    if retry is not None:
        return f"retrying: {retry}; last error: {row.reason}" if row.reason else retry
    if row.state in (JobState.PROCESSING, JobState.SENDING):
        return f"{row.state}, no progress reported yet"
    if row.state == JobState.DONE:
        return None
    return row.reason
