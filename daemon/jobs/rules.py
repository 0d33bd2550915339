"""Which rule takes a series, and what it decides: ignore it, or denoise it with which model
and send it where (with review or not). Used by the worker and by `denoised-node rules test`,
so a dry run says exactly what the node would do."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from denoised_node.config.rules import Rule
from denoised_node.config.settings import Settings
from denoised_node.daemon.jobs.intended_use import outside_intended_use
from denoised_node.daemon.jobs.series_attributes import SeriesAttributes
from denoised_node.storage.job_events import IgnoredAs

NO_RULE_MATCHES = "no rule matches"
# Equal numbers: within this relative tolerance (DS values are decimal strings).
_NUMBER_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Decision:
    """What the node does with a series. ``ignored_reason`` set: nothing is denoised."""

    rule: Rule | None
    why: str  # which match entries held, or why nothing matched
    ignored_reason: str | None = None
    ignored_as: IgnoredAs | None = None  # the reason's category (for the metrics)
    checkpoint: str | None = None  # what the worker loads (a path or a shipped name)
    destinations: tuple[str, ...] = ()
    review: bool = False
    hold_gate_failures: bool = False
    # The card's intended use applies (False where a rule or a flag overrides it): the
    # attributes above, and after loading, the model's noise floor.
    intended_use_applies: bool = True

    @property
    def denoise(self) -> bool:
        return self.ignored_reason is None

    def as_json(self) -> dict[str, object]:
        return {"rule": self.rule.name if self.rule else None, "why": self.why,
                "denoise": self.denoise, "ignored_reason": self.ignored_reason,
                "model": self.rule.model if self.rule else None,
                "checkpoint": self.checkpoint, "destinations": list(self.destinations),
                "review": self.review, "hold_gate_failures": self.hold_gate_failures}


def entry_matches(facts: SeriesAttributes, keyword: str, wanted: str | float | tuple[float, float]
                  ) -> bool:
    if isinstance(wanted, str):
        return re.search(wanted, facts.text(keyword)) is not None
    number = facts.number(keyword)
    if number is None:
        return False
    if isinstance(wanted, tuple):
        return wanted[0] <= number <= wanted[1]
    return abs(number - wanted) <= _NUMBER_TOLERANCE * max(1.0, abs(wanted))


def first_match(rules: Sequence[Rule], facts: SeriesAttributes) -> tuple[Rule | None, str]:
    """The first rule all of whose entries match, and a line saying why (or why none did)."""
    misses = []
    for rule in rules:
        failed = [k for k, wanted in rule.match.items() if not entry_matches(facts, k, wanted)]
        if not failed:
            held = ", ".join(f"{k}={facts.text(k)!r}" for k in rule.match) or "matches any series"
            return rule, f"rule {rule.name!r}: {held}"
        misses.append(f"{rule.name}: {failed[0]}={facts.text(failed[0])!r}")
    return None, f"{NO_RULE_MATCHES} ({'; '.join(misses)})" if misses else NO_RULE_MATCHES


IntendedUseReader = Callable[[str], Mapping[str, Any]]


def decide(settings: Settings, facts: SeriesAttributes, intended_use: IntendedUseReader,
           *, override_intended_use: bool = False) -> Decision:
    """Apply the rules to a series. ``intended_use(checkpoint)`` gives the model card's
    intended use (the worker reads the loaded card; a dry run reads the file's header).
    ``override_intended_use``: as if the rule said so (offline denoising's flag)."""
    rule, why = first_match(settings.effective_rules, facts)
    if rule is None:
        return Decision(None, why, ignored_reason=why, ignored_as=IgnoredAs.NO_RULE)
    if rule.ignore:
        return Decision(rule, why, ignored_reason=f"ignored by rule {rule.name!r}",
                        ignored_as=IgnoredAs.RULE)
    checkpoint = settings.checkpoint_for(rule.model)
    applies = not (rule.override_intended_use or override_intended_use)
    if applies:
        outside = outside_intended_use(facts, intended_use(checkpoint))
        if outside is not None:
            return Decision(rule, why, ignored_reason=f"{outside}; a rule with "
                            "override_intended_use = true denoises it anyway",
                            ignored_as=IgnoredAs.INTENDED_USE, checkpoint=checkpoint)
    hold = settings.gate.hold_failures if rule.hold_gate_failures is None \
        else rule.hold_gate_failures
    return Decision(rule, why, checkpoint=checkpoint,
                    destinations=tuple(d.name for d in settings.rule_destinations(rule)),
                    review=rule.review, hold_gate_failures=hold, intended_use_applies=applies)
