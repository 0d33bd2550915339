"""How far the stage in hand is: slices denoised or instances sent, of how many.

The worker records it on the job at a bounded rate (one UPDATE per ``min_interval`` at most,
plus the first and the last), only while it still holds the job's lease; the CLI and the
status pages read it back with a time-left estimate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update

from denoised_node.storage.db import SessionFactory
from denoised_node.storage.models import Job, utcnow

log = logging.getLogger(__name__)

# The stage a progress record belongs to, and the job state in which it is live.
STAGE_STATES = {"denoise": "processing", "send": "sending"}
# Set in the UPDATE that claims a stage, so an earlier attempt's figures never show.
CLEARED: dict[str, Any] = {"progress_stage": None, "progress_done": None,
                              "progress_total": None, "progress_started_at": None,
                              "progress_at": None}


@dataclass(frozen=True)
class Progress:
    stage: str  # denoise | send
    done: int
    total: int
    started_at: datetime
    at: datetime  # when ``done`` was recorded

    @classmethod
    def from_row(cls, job: Job) -> Progress | None:
        """The job's progress while the stage it belongs to is in hand; None otherwise."""
        if (job.progress_stage is None or job.progress_done is None or not job.progress_total
                or job.progress_started_at is None or job.progress_at is None
                or STAGE_STATES.get(job.progress_stage) != job.state):
            return None
        return cls(job.progress_stage, job.progress_done, job.progress_total,
                   job.progress_started_at, job.progress_at)

    @property
    def percent(self) -> int:
        return min(100, (100 * self.done) // max(self.total, 1))

    def seconds_left(self, now: datetime) -> float | None:
        """At the rate so far; None until there is a rate to go by."""
        elapsed = (self.at - self.started_at).total_seconds()
        if self.done <= 0 or elapsed <= 0:
            return None
        estimate = elapsed / self.done * (self.total - self.done)
        return max(0.0, estimate - max(0.0, (now - self.at).total_seconds()))

    def describe(self, now: datetime) -> str:
        unit = "slices" if self.stage == "denoise" else "instances"
        text = f"{self.stage} {self.percent}% ({self.done}/{self.total} {unit})"
        left = self.seconds_left(now)
        return text if left is None else f"{text}, about {_short(left)} left"

    def as_json(self, now: datetime) -> dict[str, object]:
        left = self.seconds_left(now)
        return {"stage": self.stage, "done": self.done, "total": self.total,
                "percent": self.percent,
                "seconds_left": None if left is None else round(left, 1)}


def _short(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressRecorder:
    """``recorder(done, total)``: writes the job's progress, at most once per
    ``min_interval`` seconds (the first and the final call always), while ``worker`` holds
    the job. A failed write is logged and skipped: progress must never fail a job."""

    def __init__(self, sessions: SessionFactory, job_id: int, worker: str, stage: str, *,
                 min_interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stage not in STAGE_STATES:
            raise ValueError(f"no progress stage {stage!r}")
        self.sessions = sessions
        self.job_id = job_id
        self.worker = worker
        self.stage = stage
        self.min_interval = min_interval
        self.clock = clock
        self.started_at = utcnow()
        self.writes = 0
        self._last: float | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        final = done >= total
        if self._last is not None and not final and now - self._last < self.min_interval:
            return
        self._last = now
        try:
            with self.sessions.begin() as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.lease_owner == self.worker,
                           Job.state == STAGE_STATES[self.stage])
                    .values(progress_stage=self.stage, progress_done=done,
                            progress_total=total, progress_started_at=self.started_at,
                            progress_at=utcnow())
                    .execution_options(synchronize_session=False))
            self.writes += 1
        except Exception:  # a busy database only costs a progress update
            log.warning("could not record progress", exc_info=True,
                        extra={"job_id": self.job_id})
