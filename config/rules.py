"""The schema of `[[rules]]` (what is denoised, by which model, sent where) and of
`[notifications]`. Matching a series against a rule happens in daemon/jobs/rules.py.

A rule's ``match`` maps a DICOM keyword to a regular expression, searched in the attribute's
text (multi-valued attributes joined with a backslash, an absent one reads as ""), to a
number (equal), or to a ``[low, high]`` range (inclusive) for a number. ``CallingAETitle`` is
the AE title that sent the series.
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum

from pydantic import Field, field_validator

from denoised_node.config.base import Section
from denoised_node.config.dicom_keywords import dicom_keywords

# Not a DICOM attribute: the calling AE title of the association that delivered the series.
CALLING_AE_TITLE = "CallingAETitle"
RULE_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
DEFAULT_MODEL = "default"

MatchValue = str | float | tuple[float, float]


def _check_match(match: dict[str, MatchValue]) -> dict[str, MatchValue]:
    keyword_dict = dicom_keywords() if match else frozenset()
    for keyword, value in match.items():
        if keyword != CALLING_AE_TITLE and keyword not in keyword_dict:
            close = [k for k in keyword_dict if k.lower() == keyword.lower()] or \
                difflib.get_close_matches(keyword, [*keyword_dict, CALLING_AE_TITLE], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{keyword!r} is not a DICOM keyword{hint}; match keys are "
                             f"keywords such as SeriesDescription, or {CALLING_AE_TITLE}")
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{keyword} = {value!r} is not a regular expression: "
                                 f"{exc}") from None
        elif isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError(f"{keyword} = [{value[0]}, {value[1]}]: the range's low end is "
                             "above its high end")
    return match


class Rule(Section):
    """One `[[rules]]` entry. Rules are tried in order; the first that matches decides."""

    name: str = Field(min_length=1, max_length=64, pattern=RULE_NAME_PATTERN)
    # DICOM keyword (or CallingAETitle) -> regex, or [low, high] for numbers; {}: any series.
    match: dict[str, MatchValue] = Field(default_factory=dict)
    # true: a matching series is ignored (recorded with this rule's name), not denoised.
    ignore: bool = False
    # "default" ([model] checkpoint), a [models] name, or a checkpoint path.
    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    # Destination names; None: every destination that is not a shadow.
    destinations: list[str] | None = None
    # true: the derived series waits in state "held" until approved (jobs approve ID).
    review: bool = False
    # A safety-gate refusal holds the series for review instead of failing it (None: as
    # gate.hold_failures says).
    hold_gate_failures: bool | None = None
    # Denoise series outside the model card's intended use (a site that validated it).
    override_intended_use: bool = False

    @field_validator("match")
    @classmethod
    def _match_is_valid(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        return _check_match(value)


class WebhookEvent(StrEnum):
    """What a notification says happened to a job: the message's ``event`` and the values of
    ``[notifications] events``."""

    FAILED = "failed"
    HELD = "held"
    GATE_REFUSED = "gate_refused"


class NotificationSettings(Section):
    """A webhook: a JSON POST for each job that fails, is held, or is refused by the gate."""

    webhook_url: str | None = Field(default=None, pattern=r"^https?://")
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WebhookEvent))
    # Patient name and ID, accession number and study date in the message; off: never.
    include_patient_data: bool = False
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)
    # A file holding a bearer token for the webhook's Authorization header.
    token_file: str | None = None
