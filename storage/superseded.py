"""Which derived series a sent one supersedes, recorded in the job history.

New content of a source series goes out under new UIDs (storage/images/derived_uids.py), so a PACS
keeps the derived series sent before beside the new one. Both jobs' histories say so: the
new job's names the series it supersedes, the old job gets a note naming its successor, so
that an administrator can find the stale copy and remove it from the PACS.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from denoised_node.storage.models import Job, JobEvent
from denoised_node.storage.queue import EventKind, JobState


def note_superseded(session: Session, job_id: int, now: datetime) -> str:
    """Called as job ``job_id`` is first marked sent: when the series' previous sent job
    sent another derived series, a note on that job names it superseded by this one. Returns
    what this job's reason adds ("" when nothing was superseded: a first send, a replay)."""
    job = session.get_one(Job, job_id)
    sent_before = session.scalar(select(JobEvent.id).where(
        JobEvent.job_id == job_id, JobEvent.kind == EventKind.SENT.value).limit(1))
    if sent_before is not None:
        return ""  # a replay: its first send named what it superseded
    previous = session.execute(
        select(Job.id, Job.derived_series_uid)
        .where(Job.series_id == job.series_id, Job.id != job.id,
               Job.state == JobState.DONE.value, Job.derived_series_uid.is_not(None))
        .order_by(Job.completed_at.desc(), Job.id.desc()).limit(1)).first()
    if previous is None or previous.derived_series_uid == job.derived_series_uid:
        return ""
    session.add(JobEvent(
        job_id=previous.id, at=now, from_state=JobState.DONE.value,
        to_state=JobState.DONE.value, kind=EventKind.NOTE.value,
        reason=(f"derived series {previous.derived_series_uid} superseded by "
                f"{job.derived_series_uid} of job {job.id} (new content under the same "
                "source UIDs); the PACS keeps both until this one is removed there")))
    return (f"; derived series {job.derived_series_uid} supersedes derived series "
            f"{previous.derived_series_uid} of job {previous.id} (new content)")
