"""Housekeeping that `serve` runs: retention on a timer, and at start the recovery of jobs
held by workers of this host that died with the previous run."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timedelta

from sqlalchemy import select

from denoised_node.config.settings import RetentionSettings
from denoised_node.storage.db import SessionFactory
from denoised_node.storage.files import FileStore
from denoised_node.storage.models import Job, utcnow
from denoised_node.storage.queue import LEASE_RETURNS, JobState, StaleState, transition
from denoised_node.storage.retention import forget_purged, purge_finished

log = logging.getLogger(__name__)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_local_leases(sessions: SessionFactory) -> list[int]:
    """Jobs leased by a worker on this host whose process no longer exists go back to the
    start of their stage now, instead of waiting for the lease to expire."""
    host = socket.gethostname()
    released = []
    now = utcnow()
    with sessions.begin() as session:
        held = session.execute(select(Job.id, Job.state, Job.lease_owner).where(
            Job.state.in_([s.value for s in LEASE_RETURNS]))).all()
        for job_id, state, owner in held:
            owner_host, _, pid = (owner or "").rpartition(":")
            if owner_host != host or not pid.isdigit() or _process_alive(int(pid)):
                continue
            from_state = JobState(state)
            try:
                transition(session, job_id, from_state, LEASE_RETURNS[from_state],
                           reason=f"worker {owner} is gone (node restarted)", now=now,
                           lease_owner=None, lease_expires_at=None, available_at=now)
            except StaleState:
                continue
            released.append(job_id)
    if released:
        log.warning("recovered jobs of dead workers", extra={"jobs": len(released)})
    return released


class RetentionLoop(threading.Thread):
    def __init__(self, sessions: SessionFactory, store: FileStore,
                 settings: RetentionSettings) -> None:
        super().__init__(name="retention", daemon=True)
        self.sessions = sessions
        self.store = store
        self.settings = settings
        self.stopping = threading.Event()

    def run_once(self) -> None:
        if self.settings.done_after_hours > 0:
            purge_finished(self.sessions, self.store,
                           timedelta(hours=self.settings.done_after_hours))
        if self.settings.forget_after_days > 0:
            forget_purged(self.sessions, timedelta(days=self.settings.forget_after_days))

    def run(self) -> None:
        while not self.stopping.wait(self.settings.check_minutes * 60):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - retried at the next pass
                log.exception("retention pass failed")

    def stop(self) -> None:
        self.stopping.set()
