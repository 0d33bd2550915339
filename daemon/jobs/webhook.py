"""Notifications: a JSON POST to `[notifications] webhook_url` when a job fails, is held for
review, or is refused by the safety gate. Sent from a thread of its own (a slow or dead
receiver never holds a job up), retried with exponential backoff, then logged and dropped.

The message names the job, the series (UIDs, description, modality) and the reason; patient
name and ID, accession number and study date only with ``include_patient_data = true``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from denoised_node.config.rules import NotificationSettings, WebhookEvent
from denoised_node.daemon.jobs.series_attributes import SeriesAttributes
from denoised_node.storage.queue import backoff_seconds

log = logging.getLogger(__name__)

_PATIENT_KEYWORDS = ("PatientName", "PatientID", "AccessionNumber", "StudyDate")


@dataclass(frozen=True)
class JobNotice:
    event: WebhookEvent
    job_id: int
    state: str
    reason: str
    series_uid: str
    study_uid: str = ""
    model: str | None = None
    rule: str | None = None
    facts: SeriesAttributes | None = None  # for description, modality and (if allowed) patient data


def message(notice: JobNotice, include_patient_data: bool, node_ae_title: str) -> dict[str, object]:
    body: dict[str, object] = {
        "event": notice.event, "node": node_ae_title, "job_id": notice.job_id,
        "state": notice.state, "reason": notice.reason, "series_uid": notice.series_uid,
        "study_uid": notice.study_uid, "model": notice.model, "rule": notice.rule,
    }
    if notice.facts is not None:
        body["series_description"] = notice.facts.text("SeriesDescription")
        body["modality"] = notice.facts.text("Modality")
        if include_patient_data:
            body["patient"] = {k: notice.facts.text(k) for k in _PATIENT_KEYWORDS}
    return body


Post = Callable[[str, bytes, dict[str, str], float], int]


def post_json(url: str, data: bytes, headers: dict[str, str], timeout: float) -> int:
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310 - http(s) only
    with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 - the schema allows http(s) only
        return int(answer.status)


class Notifier:
    """Queues notices and posts them on a daemon thread; ``notify`` never blocks or raises."""

    def __init__(self, settings: NotificationSettings, node_ae_title: str,
                 post: Post = post_json, sleep: Callable[[float], bool] | None = None) -> None:
        self.settings = settings
        self.node_ae_title = node_ae_title
        self._post = post
        self._queue: queue.Queue[JobNotice | None] = queue.Queue()
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.webhook_url is not None

    def notify(self, notice: JobNotice) -> None:
        if not self.enabled or notice.event not in self.settings.events:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
            self._thread.start()
        self._queue.put(notice)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued notice was posted or given up (tests, orderly stops)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            notice = self._queue.get()
            if notice is None:
                return
            self.deliver(notice)

    def deliver(self, notice: JobNotice) -> bool:
        """Post one notice with retries; True once the receiver answered 2xx."""
        settings = self.settings
        assert settings.webhook_url is not None
        data = json.dumps(message(notice, settings.include_patient_data,
                                  self.node_ae_title)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "denoised-node"}
        if settings.token_file:
            headers["Authorization"] = f"Bearer {Path(settings.token_file).read_text().strip()}"
        for attempt in range(1, settings.max_attempts + 1):
            try:
                status = self._post(settings.webhook_url, data, headers,
                                    settings.timeout_seconds)
                if 200 <= status < 300:
                    return True
                problem = f"answered HTTP {status}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                problem = str(getattr(exc, "reason", exc))
            if attempt == settings.max_attempts:
                log.error("webhook gave up after %d attempts: %s", attempt, problem,
                          extra={"job_id": notice.job_id, "event": notice.event})
                return False
            delay = backoff_seconds(attempt, settings.backoff_base_seconds, 300.0)
            log.warning("webhook failed (attempt %d of %d), retrying in %.0f s: %s", attempt,
                        settings.max_attempts, delay, problem, extra={"job_id": notice.job_id})
            if self._sleep(delay):
                return False
        return False
