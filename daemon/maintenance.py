"""Housekeeping that `serve` runs: retention on a timer, and at start the recovery of jobs
held by workers of this host that died with the previous run."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Mapping
from datetime import timedelta

from sqlalchemy import select

from denoised_node.config.settings import RetentionSettings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.rescan import settle_unindexed
from denoised_node.storage.db import SessionFactory, is_postgres
from denoised_node.storage.files import STALE_TEMP_SECONDS
from denoised_node.storage.models import Job, utcnow
from denoised_node.storage.queue import STAGES, JobState, StaleState, release_lost
from denoised_node.storage.retention import forget_purged, purge_finished

log = logging.getLogger(__name__)

# An unindexed file under instances/ this old is a crash's leftover, not a write in progress.
ORPHAN_AGE = timedelta(seconds=STALE_TEMP_SECONDS)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_local_leases(sessions: SessionFactory,
                              limits: Mapping[JobState, int]) -> list[int]:
    """Jobs leased by a worker on this host whose process no longer exists go back to the
    start of their stage now, instead of waiting for the lease to expire; the loss counts as
    an attempt, as an expired lease does (queue.release_lost; ``limits``: attempt_limits).

    A lease owner is "host:pid" (worker.default_worker_id), so with workers on several hosts
    this only ever touches this host's: another host's PIDs mean nothing here, and its jobs
    wait for their leases to expire. Host names must therefore differ between hosts.
    """
    host = socket.gethostname()
    released = []
    now = utcnow()
    with sessions.begin() as session:
        query = (select(Job.id, Job.state, Job.lease_owner, Job.processing_attempts,
                        Job.send_attempts)
                 .where(Job.state.in_([s.value for s in STAGES]),
                        Job.lease_owner.like(f"{_escape_like(host)}:%", escape="\\"))
                 .order_by(Job.id))
        if is_postgres(session):
            query = query.with_for_update(skip_locked=True)  # see release_expired_leases
        for row in session.execute(query).all():
            owner_host, _, pid = (row.lease_owner or "").rpartition(":")
            if owner_host != host or not pid.isdigit() or _process_alive(int(pid)):
                continue
            from_state = JobState(row.state)
            try:
                release_lost(session, row.id, from_state,
                             getattr(row, STAGES[from_state].attempts_column),
                             limits[from_state],
                             reason=f"worker {row.lease_owner} is gone (node restarted)",
                             now=now)
            except StaleState:
                continue
            released.append(row.id)
    if released:
        log.warning("recovered jobs of dead workers", extra={"jobs": len(released)})
    return released


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class RetentionLoop(threading.Thread):
    def __init__(self, receiver: Receiver, settings: RetentionSettings) -> None:
        super().__init__(name="retention", daemon=True)
        self.receiver = receiver
        self.sessions = receiver.sessions
        self.store = receiver.store
        self.settings = settings
        self.stopping = threading.Event()

    def run_once(self) -> None:
        settle_unindexed(self.receiver, ORPHAN_AGE)
        if self.settings.done_after_hours > 0:
            purge_finished(self.sessions, self.store,
                           timedelta(hours=self.settings.done_after_hours))
        if self.settings.forget_after_days > 0:
            forget_purged(self.sessions, timedelta(days=self.settings.forget_after_days))

    def run(self) -> None:
        while not self.stopping.wait(self.settings.check_minutes * 60):
            try:
                self.run_once()
            except Exception:  # retried at the next pass
                log.exception("retention pass failed")

    def stop(self) -> None:
        self.stopping.set()
