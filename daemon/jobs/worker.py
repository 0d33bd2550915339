"""The worker loop: claim a job, denoise its series (or send its derived series), repeat.

The model stays loaded for the life of the process. A lease, renewed by a heartbeat thread
while a job is in hand, lets the queue give the job to another worker if this one dies.
The first stop request finishes the job in hand; a second one releases it and stops now.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from select import select as wait_readable
from typing import Any, Protocol, Self

from sqlalchemy import select
from sqlalchemy.orm import Session

from denoised_node.config.rules import WebhookEvent
from denoised_node.config.settings import AnyDestination, ConfigError, Settings
from denoised_node.daemon.dicom.scu import SendError, SendResult
from denoised_node.daemon.jobs.destinations import send_to
from denoised_node.daemon.jobs.model_pool import ModelPool
from denoised_node.daemon.jobs.pipeline import Denoises, GateFailed, PermanentError, denoise_series
from denoised_node.daemon.jobs.series_attributes import SeriesAttributes
from denoised_node.daemon.jobs.series_triage import triage_series
from denoised_node.daemon.jobs.webhook import JobNotice, Notifier
from denoised_node.daemon.process.sd_notify import Heartbeat
from denoised_node.model.errors import ModelError
from denoised_node.storage.db import SessionFactory
from denoised_node.storage.files import FileStore
from denoised_node.storage.images.series import NoNoiseToRemove, NothingToDenoise, SeriesError
from denoised_node.storage.job_events import IgnoredAs
from denoised_node.storage.models import Instance, Job, Series, SeriesState, utcnow
from denoised_node.storage.progress import ProgressRecorder
from denoised_node.storage.queue import (
    STAGES,
    ClaimedJob,
    Columns,
    JobState,
    SendOutcome,
    StaleState,
    after_failed_attempt,
    attempt_limits,
    claim,
    next_available,
    release_expired_leases,
    released,
    renew_lease,
    return_to_stage,
    transition,
)
from denoised_node.storage.reasons import describe_error, one_line
from denoised_node.storage.superseded import note_superseded

log = logging.getLogger(__name__)

class Sender(Protocol):
    """send_to's shape: settings, destination (DIMSE or DICOMweb), files and progress(sent,
    total) or None."""

    def __call__(self, settings: Settings, destination: AnyDestination, files: Sequence[Path],
                 progress: Callable[[int, int], None] | None = None) -> SendResult: ...


class StopNow(BaseException):
    """Raised in the worker's thread by a second stop request."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseKeeper:
    """Renews a job's lease every third of its length until the block ends."""

    def __init__(self, sessions: SessionFactory, job: ClaimedJob, lease_seconds: float) -> None:
        self.sessions = sessions
        self.job = job
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job.id}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.lease_seconds / 3):
            try:
                if not renew_lease(self.sessions, self.job.id, self.job.worker, self.lease_seconds):
                    log.error("lease lost; another worker may take the job",
                              extra={"job_id": self.job.id})
                    self.lost.set()
                    return
            except Exception:  # a missed beat is retried; the lease has slack
                log.exception("lease renewal failed", extra={"job_id": self.job.id})


def load_model(settings: Settings) -> Callable[[str], Denoises]:
    """Load a checkpoint that a rule names, on the [model] section's device and options."""

    def load(checkpoint: str) -> Denoises:
        from denoised_node.model.inference import Denoiser

        return Denoiser.from_settings(settings.model.model_copy(
            update={"checkpoint": checkpoint}))

    return load


class Worker:
    def __init__(self, settings: Settings, sessions: SessionFactory, store: FileStore,
                 denoiser: Denoises, *, worker_id: str | None = None,
                 sender: Sender = send_to, on_idle: Callable[[], None] | None = None,
                 models: ModelPool[Denoises] | None = None,
                 notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.denoiser = denoiser  # the [model] checkpoint's, loaded at start
        # Rules may name other checkpoints: loaded when first needed, kept as cache_mb allows.
        self.models = models or ModelPool(load_model(settings), settings.model.cache_mb * 2**20)
        self.models.add(settings.model.checkpoint, denoiser)
        self.notifier = notifier or Notifier(settings.notifications, settings.node.ae_title)
        self._facts: SeriesAttributes | None = None  # the series in hand, for notifications
        # A configured worker_id names the host's workers; the pid keeps each process apart
        # (serve starts several from one config), which lease recovery relies on.
        configured = settings.worker.worker_id
        self.worker_id = worker_id or (f"{configured}:{os.getpid()}" if configured
                                       else default_worker_id())
        self.sender = sender
        # READY=1 and WATCHDOG=1 to $NOTIFY_SOCKET: `serve` listens there (or systemd, for a
        # worker unit of its own); beats come from this loop and from denoising progress.
        self.heartbeat = Heartbeat()
        self.on_idle = on_idle or self.heartbeat.beat  # called once per loop pass
        self.stop_requested = threading.Event()
        # Wakes the idle wait: a stop, or serve saying it queued a job (SIGUSR1, see cli/main.py).
        self.waker = Waker()
        self.current: ClaimedJob | None = None

    def run(self, *, burst: bool = False, max_jobs: int | None = None) -> int:
        """Work until stopped (or, with ``burst``, until the queue is empty); returns the
        number of jobs handled."""
        handled = 0
        idle_passes = 0
        log.info("worker started", extra={"worker": self.worker_id,
                                          "model": self.denoiser.identity})
        self.heartbeat.ready(f"model {self.denoiser.identity} loaded")
        try:
            while not self.stop_requested.is_set():
                self.on_idle()
                release_expired_leases(self.sessions, attempt_limits(self.settings))
                job = claim(self.sessions, self.worker_id, self.settings.worker.lease_seconds)
                if job is None:
                    if burst:
                        break
                    self.waker.wait(self._idle_wait(idle_passes))
                    idle_passes += 1
                    continue
                idle_passes = 0
                self.current = job
                with LeaseKeeper(self.sessions, job, self.settings.worker.lease_seconds):
                    self.perform(job)
                self.current = None
                handled += 1
                if max_jobs is not None and handled >= max_jobs:
                    break
        finally:
            self._release_current()
            log.info("worker stopped", extra={"worker": self.worker_id, "jobs": handled})
        return handled

    def request_stop(self) -> None:
        self.stop_requested.set()
        self.waker.wake()

    def _idle_wait(self, idle_passes: int) -> float:
        """How long to wait for work: poll_seconds, doubling while nothing comes, up to
        idle_poll_seconds; never past the moment a waiting job (a send retry) is due."""
        settings = self.settings.worker
        wait = min(settings.idle_poll_seconds, settings.poll_seconds * 2 ** min(idle_passes, 16))
        due = next_available(self.sessions)
        if due is not None:
            wait = min(wait, max(settings.poll_seconds, (due - utcnow()).total_seconds()))
        return wait

    def perform(self, job: ClaimedJob) -> None:
        if job.stage == JobState.PROCESSING:
            if not self._process(job):
                return
            sending = self._start_sending(job)
            self.current = sending
            if sending is None:
                return
            job = sending
        self._send(job)

    # -- processing ---------------------------------------------------------------------
    def _process(self, job: ClaimedJob) -> bool:
        """Denoise the job's series; True when it should go on to be sent now."""
        extra = {"job_id": job.id, "worker": self.worker_id}
        self._facts = None
        try:
            series_uid, paths, calling_ae = self._source_files(job)
            # What the series is (localizer, reformat, no pixel data...) comes first, then
            # which rule takes it: the same decision as `denoise` and `rules test`.
            triage = triage_series(self.settings, paths, self._intended_use,
                                   calling_ae=calling_ae)
        except (PermanentError, SeriesError, ConfigError, ModelError, ValueError) as exc:
            self._move(job, JobState.PROCESSING, JobState.FAILED, one_line(str(exc)))
            return False
        self._facts = triage.facts
        decision = triage.decision
        rule_name = decision.rule.name if decision and decision.rule else None
        if decision is None or triage.plan is None or not decision.denoise:
            self._move(job, JobState.PROCESSING, JobState.IGNORED,
                       one_line(str(triage.ignored_reason)), rule_name=rule_name,
                       label=triage.ignored_as)
            return False
        plan = triage.plan
        denoiser = self.models.get(decision.checkpoint or self.settings.model.checkpoint)
        out_dir = self.store.derived_dir(job.id)
        self.store.remove_tree(out_dir)
        started = time.monotonic()
        log.info("denoising series", extra={**extra, "series_uid": series_uid,
                                            "instances": len(paths), "model": denoiser.identity,
                                            "rule": rule_name})
        try:
            outcome = denoise_series(paths, series_uid, denoiser, self.settings, out_dir,
                                     utcnow(), progress=_both(
                                         _progress_logger(job.id, self.heartbeat.beat),
                                         self._recorder(job, "denoise")),
                                     hold_gate_failures=decision.hold_gate_failures,
                                     plan=plan, refused_dir=self.store.refused_dir(job.id),
                                     noise_floor=decision.intended_use_applies)
        except NoNoiseToRemove as exc:
            self._move(job, JobState.PROCESSING, JobState.IGNORED, one_line(str(exc)),
                       label=IgnoredAs.NO_NOISE)
            return False
        except NothingToDenoise as exc:
            self._move(job, JobState.PROCESSING, JobState.IGNORED, one_line(str(exc)),
                       label=IgnoredAs.NO_IMAGE)
            return False
        except GateFailed as exc:
            log.error("series cannot be denoised: %s", exc, extra=extra)
            self._move(job, JobState.PROCESSING, JobState.FAILED, one_line(str(exc)),
                       event=WebhookEvent.GATE_REFUSED, model_identity=denoiser.identity,
                       label=" ".join(exc.checks))
            return False
        except (PermanentError, SeriesError) as exc:
            log.error("series cannot be denoised: %s", exc, extra=extra)
            self._move(job, JobState.PROCESSING, JobState.FAILED, one_line(str(exc)))
            return False
        except Exception as exc:  # out of memory, CUDA, disk: worth a retry
            log.exception("processing failed", extra=extra)
            self._retry_or_fail(job, describe_error(exc))
            return False
        seconds = time.monotonic() - started
        summary = (f"{len(outcome.files)} derived instance(s) in {seconds:.1f} s "
                   f"({outcome.describe_seconds()}){_skipped_note(outcome.skipped)}")
        values: Columns = {
            "derived_series_uid": outcome.derived_series_uid,
            "derived_count": len(outcome.files), "model_identity": denoiser.identity,
            "rule_name": rule_name, "destinations": json.dumps(list(decision.destinations))}
        if outcome.gate_refusal is not None:
            self._move(job, JobState.PROCESSING, JobState.HELD,
                       one_line(f"{outcome.gate_refusal}; held for review (approve or reject)"),
                       event=WebhookEvent.GATE_REFUSED, label=" ".join(outcome.gate_checks),
                       **values)
            return False
        if decision.review:
            self._move(job, JobState.PROCESSING, JobState.HELD,
                       f"{summary}; held for review by rule {rule_name!r} (approve or reject)",
                       **values)
            return False
        self._move(job, JobState.PROCESSING, JobState.PROCESSED, summary, **values)
        return True

    def _intended_use(self, checkpoint: str) -> dict[str, object]:
        # The model a rule names is loaded here (it denoises the series next) and its card
        # read; a model of the test suite's has no intended use.
        card = getattr(self.models.get(checkpoint), "card", None)
        return dict(getattr(card, "intended_use", None) or {})

    def _source_files(self, job: ClaimedJob) -> tuple[str, list[Path], str]:
        with self.sessions() as session:
            series = session.get_one(Series, job.series_id)
            if series.state == SeriesState.PURGED:
                raise PermanentError(f"the files of series {series.series_uid} were purged; "
                                     "send the series again from the PACS")
            rows = session.execute(select(Instance.sop_instance_uid, Instance.path).where(
                Instance.series_id == series.id, Instance.ignored_reason.is_(None))).all()
            uid, study_uid = series.series_uid, series.study_uid
            calling_ae = series.calling_ae_title or ""
        paths = []
        for sop_uid, relative in rows:
            # Never derive from bytes filed under another series: only the path this
            # series' UIDs name is read (an index an older release left inconsistent).
            if relative != self.store.instance_path(study_uid, uid, sop_uid):
                log.error("instance row names another series' file; left out",
                          extra={"job_id": job.id, "sop_instance_uid": sop_uid,
                                 "path": relative})
                continue
            paths.append(self.store.path(relative))
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise PermanentError(f"{len(missing)} stored file(s) of series {uid} are missing, "
                                 f"e.g. {missing[0]}; send the series again from the PACS")
        return uid, paths, calling_ae

    def _retry_or_fail(self, job: ClaimedJob, reason: str,
                       attempt: DestinationsTried | None = None) -> None:
        """After a failed attempt of the job's stage: back to the start of the stage after a
        backoff, or failed at the stage's attempt limit (both from the stage table).
        ``attempt``: the send attempt's destinations, recorded with the move."""
        stage = STAGES[job.stage]
        outcome = after_failed_attempt(stage, getattr(job, stage.attempts_column),
                                       stage.policy(self.settings), reason, utcnow())
        if outcome.delay is not None:
            log.warning("%s failed, retrying in %.0f s: %s", stage.state.value, outcome.delay,
                        reason, extra={"job_id": job.id})
        sends = attempt.outcomes(retried=outcome.delay is not None) if attempt else None
        self._move(job, stage.state, outcome.to_state, outcome.reason, sends=sends,
                   **outcome.values)

    # -- sending ------------------------------------------------------------------------
    def _start_sending(self, job: ClaimedJob) -> ClaimedJob | None:
        """Move the processed job on to sending; None if another worker took it meanwhile
        (this worker's lease was lost)."""
        now = utcnow()
        try:
            with self.sessions.begin() as session:
                transition(session, job.id, JobState.PROCESSED, JobState.SENDING,
                           worker=self.worker_id, reason="sending", now=now,
                           lease_owner=self.worker_id,
                           lease_expires_at=now + timedelta(
                               seconds=self.settings.worker.lease_seconds))
        except StaleState:
            log.error("job was taken over while in hand (lease lost); not sending it",
                      extra={"job_id": job.id})
            return None
        return ClaimedJob(job.id, job.series_id, JobState.SENDING, job.processing_attempts,
                          job.send_attempts, job.worker)

    def _send(self, job: ClaimedJob) -> None:
        with self.sessions() as session:
            row = session.get_one(Job, job.id)
            expected, chosen = row.derived_count or 0, row.destinations
        files = self.store.dicom_files(self.store.derived_dir(job.id))
        if len(files) != expected:
            self._move(job, JobState.SENDING, JobState.QUEUED,
                       f"{len(files)} of {expected} derived files found; denoising again",
                       **released(utcnow()))
            return
        try:
            destinations = self._destinations(chosen)
        except ConfigError as exc:
            self._move(job, JobState.SENDING, JobState.FAILED,
                       one_line(f"{exc}; fix the config, then replay the job"))
            return
        recorder = self._recorder(job, "send")
        attempt = DestinationsTried()
        try:
            for index, destination in enumerate(destinations):
                def progress(sent: int, _count: int, before: int = index * len(files)) -> None:
                    recorder(before + sent, len(files) * len(destinations))

                attempt.trying = destination.name
                result = self.sender(self.settings, destination, files, progress=progress)
                attempt.sent.append(destination.name)
                log.info("series sent", extra={"job_id": job.id, "destination": result.destination,
                                               "instances": result.sent})
        except SendError as exc:
            if not exc.permanent:
                self._retry_or_fail(job, describe_error(exc), attempt)
            else:  # a refusal for good (an AE title, no context): retrying cannot help
                self._move(job, JobState.SENDING, JobState.FAILED, one_line(
                    f"{describe_error(exc)}; not retried: {exc.fix}, then replay the job"),
                    send_attempts=job.send_attempts + 1, sends=attempt.outcomes(retried=False))
            return
        except Exception as exc:  # noqa: BLE001 - any other send failure is retried, then fails
            self._retry_or_fail(job, describe_error(exc), attempt)
            return
        names = ", ".join(d.name for d in destinations) or "no destination configured"
        # send_attempts counts every attempt made, the one that succeeded too.
        self._move(job, JobState.SENDING, JobState.DONE, f"sent {len(files)} to {names}",
                   send_attempts=job.send_attempts + 1, sends=attempt.outcomes(retried=False),
                   also=lambda session: note_superseded(session, job.id, utcnow()))

    def _destinations(self, chosen: str | None) -> list[AnyDestination]:
        """The destinations the rule chose when the series was denoised; a job from before
        rules existed goes to every destination that is not a shadow."""
        if chosen is None:
            return [d for d in self.settings.destinations if not d.shadow]
        return [self.settings.destination(name) for name in json.loads(chosen)]

    # -- bookkeeping --------------------------------------------------------------------
    def _recorder(self, job: ClaimedJob, stage: str) -> ProgressRecorder:
        return ProgressRecorder(self.sessions, job.id, self.worker_id, stage,
                                min_interval=self.settings.worker.progress_interval_seconds)

    def _move(self, job: ClaimedJob, from_state: JobState, to_state: JobState, reason: str,
              event: WebhookEvent | None = None, *, also: Callable[[Session], str] | None = None,
              **values: Any) -> None:
        """Move the job; a failed or held one (or ``event``) is also sent to the webhook.
        ``also`` writes in the same transaction and returns what the reason adds."""
        try:
            with self.sessions.begin() as session:
                if also is not None:
                    reason += also(session)
                transition(session, job.id, from_state, to_state, worker=self.worker_id,
                           reason=reason, **values)
        except StaleState:
            log.error("job was taken over while in hand (lease lost); result dropped",
                      extra={"job_id": job.id})
            return
        level = logging.ERROR if to_state == JobState.FAILED else logging.INFO
        log.log(level, "job %s: %s", to_state.value, reason,
                extra={"job_id": job.id, "state": to_state.value})
        if event is not None or to_state in (JobState.FAILED, JobState.HELD):
            self._notify(job, event or WebhookEvent(to_state.value), to_state, reason, values)

    def _notify(self, job: ClaimedJob, event: WebhookEvent, state: JobState, reason: str,
                values: Columns) -> None:
        if not self.notifier.enabled:
            return
        with self.sessions() as session:
            series = session.get_one(Series, job.series_id)
            row = session.get_one(Job, job.id)
            notice = JobNotice(event, job.id, state.value, reason, series.series_uid,
                               series.study_uid, row.model_identity, row.rule_name,
                               self._facts)
        self.notifier.notify(notice)

    def _release_current(self) -> None:
        job = self.current
        if job is None:
            return
        try:
            with self.sessions.begin() as session:
                return_to_stage(session, job.id, job.stage, reason="worker stopped; job released",
                                worker=self.worker_id)
            log.info("job released", extra={"job_id": job.id})
        except StaleState:
            log.error("job was taken over while in hand (lease lost); not released",
                      extra={"job_id": job.id})
        except Exception:  # the lease expires anyway
            log.exception("could not release the job in hand", extra={"job_id": job.id})
        self.current = None


@dataclass
class DestinationsTried:
    """One send attempt of a job: the destinations that took the series, and the one being
    tried (which failed, when the attempt ends in an error)."""

    sent: list[str] = field(default_factory=list)
    trying: str | None = None

    def outcomes(self, *, retried: bool) -> dict[str, SendOutcome]:
        """send_attempts rows: each destination tried, and how its part ended."""
        found = dict.fromkeys(self.sent, SendOutcome.SENT)
        if self.trying is not None and self.trying not in found:
            found[self.trying] = SendOutcome.RETRY if retried else SendOutcome.FAILED
        return found


def _skipped_note(skipped: Sequence[tuple[str, str]]) -> str:
    """The images left out, for the job's record: how many, and the reasons (no UIDs)."""
    if not skipped:
        return ""
    reasons = sorted({reason for _, reason in skipped})
    return one_line(f"; {len(skipped)} image(s) skipped: {'; '.join(reasons)}")


def _progress_logger(job_id: int,
                     beat: Callable[[], None] | None = None) -> Callable[[int, int], None]:
    last = {"quarter": -1}

    def report(done: int, total: int) -> None:
        if beat is not None:
            beat()  # a long series still feeds the watchdog, batch by batch
        quarter = (4 * done) // max(total, 1)
        if quarter != last["quarter"]:
            last["quarter"] = quarter
            log.info("denoising %d/%d slices", done, total, extra={"job_id": job_id})

    return report


class Waker:
    """A wait that a signal handler can end: the self-pipe (writing to a pipe is safe in a
    handler; setting a threading.Event is not, it takes a lock the waiting thread may hold)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def wake(self) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway

    def wait(self, timeout: float) -> bool:
        """True when woken before ``timeout`` seconds."""
        ready, _, _ = wait_readable([self._read], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        return True


def _both(*reporters: Callable[[int, int], None]) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        for reporter in reporters:
            reporter(done, total)

    return report


def stop_handler(worker: Worker) -> Callable[[int, object], None]:
    """A signal handler: the first signal asks the worker to finish its job, the second
    stops it at once (the job in hand goes back to the queue)."""

    def handle(signum: int, _frame: object) -> None:
        if worker.stop_requested.is_set():
            raise StopNow()
        log.info("stop requested; finishing the job in hand", extra={"signal": signum})
        worker.request_stop()

    return handle

