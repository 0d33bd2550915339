"""What the node does with a series before any model runs: which instances it keeps (an MR
image of a denoised modality, not its own output), what is left to denoise (the plan), and
which rule takes it (model, destinations, intended use).

The one home of that decision: the receive path asks about each instance, the worker about a
stored series, and `denoise` (offline) and `rules test` about a folder, so that none of them
can decide differently from the node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.dimse_status import ReceiveError

# The receive path's own checks: what it refuses, and what it keeps out of a series.
from denoised_node.daemon.dicom.receive import instance_ignored_reason, parse_file
from denoised_node.daemon.jobs.pipeline import input_policy, plan_series
from denoised_node.daemon.jobs.rules import Decision, IntendedUseReader, decide
from denoised_node.daemon.jobs.series_attributes import SeriesAttributes, attributes_from_dataset
from denoised_node.storage.images.series import NothingToDenoise, StackPlan
from denoised_node.storage.job_events import IgnoredAs


@dataclass(frozen=True)
class Triage:
    """The node's decision on a series. ``ignored_reason`` set: nothing is denoised."""

    ignored_reason: str | None
    instances: int  # how many arrived (or were found), kept or not
    plan: StackPlan | None = None
    facts: SeriesAttributes | None = None
    decision: Decision | None = None
    ignored_as: IgnoredAs | None = None  # the reason's category (for the metrics)

    @property
    def denoise(self) -> bool:
        return self.ignored_reason is None


def kept_instances(paths: Sequence[Path], settings: Settings) -> tuple[list[Path], str | None]:
    """The files the receive path would keep, and (when it keeps none) the commonest reason
    for refusing or leaving out the others."""
    kept: list[Path] = []
    reasons: Counter[str] = Counter()
    for path in paths:
        try:
            ds = parse_file(path, settings.node.max_instance_mb * 2**20)
        except ReceiveError as exc:  # the sender would get a failure status
            reasons[f"refused on receipt: {exc}"] += 1
            continue
        reason = instance_ignored_reason(ds, str(ds.get("SOPClassUID", "")),
                                         settings.series.modalities)
        if reason is None:
            kept.append(path)
        else:
            reasons[reason] += 1
    return kept, (reasons.most_common(1)[0][0] if reasons and not kept else None)


def triage_series(settings: Settings, paths: Sequence[Path], intended_use: IntendedUseReader,
                  *, calling_ae: str = "", received: int | None = None,
                  override_intended_use: bool = False) -> Triage:
    """Decide on a series whose instances the receive path already kept (``paths``).

    ``received``: how many instances arrived, kept or not (default: ``len(paths)``).
    Raises what planning and the rules raise for a series that cannot be judged (a
    SeriesError, a ConfigError, a ModelError); a series with nothing to denoise is ignored.
    """
    count = len(paths) if received is None else received
    try:
        plan = plan_series(paths, input_policy(settings))
    except NothingToDenoise as exc:
        return Triage(str(exc), count, ignored_as=IgnoredAs.NO_IMAGE)
    # The rules read the header of the first image the plan will denoise.
    facts = attributes_from_dataset(plan.stacks[0].slices[0].source.header, calling_ae)
    decision = decide(settings, facts, intended_use, override_intended_use=override_intended_use)
    return Triage(decision.ignored_reason, count, plan, facts, decision, decision.ignored_as)


def triage_files(settings: Settings, paths: Sequence[Path], intended_use: IntendedUseReader,
                 *, calling_ae: str = "", override_intended_use: bool = False) -> Triage:
    """Decide on files as they would arrive: the receive path's check of each instance,
    then ``triage_series`` (offline denoising, `rules test` of a folder)."""
    kept, ignored = kept_instances(paths, settings)
    if ignored is not None:
        return Triage(ignored, len(paths), ignored_as=IgnoredAs.ON_RECEIPT)
    return triage_series(settings, kept, intended_use, calling_ae=calling_ae,
                         received=len(paths), override_intended_use=override_intended_use)
