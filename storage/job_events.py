"""What the job-event audit log says, read from the events' kinds (never their reason text):
how long each stage of a job took, and how a job ended.

The metrics (daemon/web/metrics.py) and the status pages (daemon/web/activity.py) both read it
through ``stage_durations`` and ``outcome_of``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from denoised_node.storage.queue import EventKind, JobState

# The stages a job's time is split into (the names of the denoised_node_stage_seconds metric).
LATENCY_STAGES = {
    "receive_to_complete": "first instance received to series complete (job queued)",
    "queue_wait": "job queued (or requeued) to claimed by a worker",
    "inference": "claimed to derived series written (load, denoise, gate, write)",
    "send": "sending started to the last destination's success",
    "end_to_end": "first instance received to the derived series sent",
}
# How a job ends; "superseded": newer instances queued the series again before it started.
OUTCOMES = {EventKind.SENT: "done", EventKind.FAILED: "failed", EventKind.IGNORED: "ignored",
            EventKind.REJECTED: "ignored", EventKind.SUPERSEDED: "superseded"}
SERIES_OUTCOMES = ("done", "failed", "ignored", "superseded")


class IgnoredAs(StrEnum):
    """Why a series was ignored, as a category (the reason says it to people, with details)."""

    ON_RECEIPT = "on_receipt"  # every instance was left out on receipt: not MR, own output
    NO_IMAGE = "no_image"  # no image to denoise: localizers, reformats, no pixel data
    NO_RULE = "no_rule"  # no rule matches
    RULE = "rule"  # a rule with ignore = true
    INTENDED_USE = "intended_use"  # outside the model card's intended use
    NO_NOISE = "no_noise"  # less noise than the model's floor (its card's noise_floor_percent)
    REJECTED = "rejected"  # held for review, and a person rejected it
    OTHER = "other"  # a row from before labels (schema revision 0007)


# job_events.label by kind: what the metrics count by category. A label is a category,
# never free text, so the metrics' label sets stay bounded.
EVENT_LABELS = {
    EventKind.IGNORED: "an IgnoredAs",
    EventKind.FAILED: "the safety gate's failed checks (model.gate CHECKS), space-separated, "
                      "when the gate refused the result; else none",
    EventKind.HELD: "as for failed: held because the gate refused the result",
}


def ignored_as(kind: str, label: str | None) -> IgnoredAs | None:
    """The category of an event that ignores its series; None for any other event."""
    if kind == EventKind.REJECTED:
        return IgnoredAs.REJECTED
    if kind != EventKind.IGNORED:
        return None
    try:
        return IgnoredAs(label or IgnoredAs.OTHER)
    except ValueError:  # a category a newer release wrote
        return IgnoredAs.OTHER


def gate_checks(kind: str, label: str | None) -> list[str]:
    """The gate checks that refused the result, for a failed or held event (else [])."""
    if kind not in (EventKind.FAILED, EventKind.HELD) or not label:
        return []
    return label.split()


class Event(Protocol):
    """What is read of an audit row (a JobEvent, an EventRow...)."""

    @property
    def at(self) -> datetime: ...
    @property
    def to_state(self) -> str: ...
    @property
    def kind(self) -> str: ...


@dataclass(frozen=True)
class StageTime:
    """One stage of a job, measured: ``run`` counts the replays before it (0: the first)."""

    stage: str
    seconds: float
    run: int


def outcome_of(kind: str) -> str | None:
    """How the job ended, for an event that ends it; None for any other event."""
    return OUTCOMES.get(EventKind(kind))


def stage_durations(events: Iterable[Event], first_received_at: datetime) -> list[StageTime]:
    """Every stage measured in a job's events (in order, ``first_received_at``: its series'
    first instance), in the order they ended. A stage run again (a retry) is measured again;
    a replay starts a new run, which has no end-to-end figure, nor has a run whose events
    begin after its creation. Clocks of several hosts may disagree: never below 0 s."""
    found: list[StageTime] = []
    entered: dict[str, datetime] = {}
    run, from_creation = 0, False

    def measured(stage: str, since: datetime | None, at: datetime) -> None:
        if since is not None:
            found.append(StageTime(stage, max((at - since).total_seconds(), 0.0), run))

    for event in events:
        kind, at = EventKind(event.kind), event.at
        if kind == EventKind.NOTE:
            continue  # an event of the series, not a stage
        if kind == EventKind.CREATED:
            from_creation = True
            measured("receive_to_complete", first_received_at, at)
        elif kind == EventKind.REPLAYED:
            run, from_creation = run + 1, False
            entered.clear()
        elif kind == EventKind.STARTED and event.to_state == JobState.PROCESSING:
            measured("queue_wait", entered.get(JobState.QUEUED), at)
        elif kind == EventKind.DENOISED:
            measured("inference", entered.get(JobState.PROCESSING, at), at)
        elif kind == EventKind.SENT:
            measured("send", entered.get(JobState.SENDING), at)
            if from_creation:
                measured("end_to_end", first_received_at, at)
        entered[event.to_state] = at
    return found


def latest_run(times: Iterable[StageTime]) -> dict[str, float]:
    """Seconds per stage of the job's latest run, the last measure of each; the series'
    receive_to_complete is kept from the first run."""
    times = list(times)
    last = max((t.run for t in times), default=0)
    return {t.stage: t.seconds for t in times
            if t.run == last or t.stage == "receive_to_complete"}
