"""``denoised-node rules test``: what the rules would do with each series of a folder, or with
a stored series, without denoising or sending anything."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import click

from denoised_node.config.rules import DEFAULT_MODEL
from denoised_node.config.settings import Settings
from denoised_node.daemon.cli.options import (
    CommandError,
    ExitCode,
    config_option,
    json_option,
    open_runtime_for,
    settings_from,
)
from denoised_node.daemon.jobs.rules import IntendedUseReader
from denoised_node.daemon.jobs.series_attributes import (
    SeriesAttributes,
    attributes_from_file,
    attributes_from_mapping,
)
from denoised_node.daemon.jobs.series_triage import Triage, triage_files, triage_series


@click.group()
def rules() -> None:
    """Which rule takes a series: the model, the destinations, review."""


@rules.command("test")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False,
                                                          path_type=Path))
@click.option("--series", "series_uid", default=None,
              help="A series the node has stored (its SeriesInstanceUID) instead of a folder.")
@click.option("--calling-ae", default="", help="Test as if this AE title had sent the files.")
@config_option
@json_option
def rules_test(folder: Path | None, series_uid: str | None, calling_ae: str,
               config_path: Path | None, as_json: bool) -> None:
    """For each series under FOLDER (or --series UID): what the node would do with it (the
    instances it leaves out, what there is to denoise, the rule that matches and why, the
    model), and where the result would go."""
    if (folder is None) == (series_uid is None):
        raise CommandError("give a FOLDER or --series UID (one of them)", ExitCode.USAGE)
    settings = settings_from(config_path)
    reader = _card_reader()
    if folder is not None:
        found = series_in_folder(folder)
        if not found:
            raise CommandError(f"no DICOM files under {folder}")
        # The receive path's check of each file, then the worker's plan and rules.
        results = [(facts, triage_files(settings, paths, reader, calling_ae=calling_ae))
                   for facts, paths in found]
    else:
        results = [stored_series(settings, str(series_uid), reader)]
    if as_json:
        click.echo(json.dumps([_as_json(facts, triage) for facts, triage in results]))
        return
    for facts, triage in results:
        _print(facts, triage)


def series_in_folder(folder: Path) -> list[tuple[SeriesAttributes, list[Path]]]:
    """The series under ``folder``: the first readable file's facts (to name the series)
    and the series' files."""
    first: dict[str, SeriesAttributes] = {}
    paths: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            facts = attributes_from_file(path)
        except ValueError:
            continue  # not DICOM: a README, a DICOMDIR's neighbours
        if not facts.series_uid:
            continue
        first.setdefault(facts.series_uid, facts)
        paths.setdefault(facts.series_uid, []).append(path)
    return [(first[uid], paths[uid]) for uid in first]


def stored_series(settings: Settings, series_uid: str,
                  reader: IntendedUseReader) -> tuple[SeriesAttributes, Triage]:
    """A stored series as the worker would judge it now; one whose every instance was left
    out on receipt, with the reason the receive path recorded."""
    from sqlalchemy import func, select

    from denoised_node.storage.models import Instance, Series

    runtime = open_runtime_for(settings)
    with runtime.sessions() as session:
        series = session.scalar(select(Series).where(Series.series_uid == series_uid))
        if series is None:
            raise CommandError(f"no stored series with SeriesInstanceUID {series_uid}; "
                               "`denoised-node jobs list` shows the stored ones",
                               ExitCode.NOT_FOUND)
        relative = session.scalars(select(Instance.path).where(
            Instance.series_id == series.id, Instance.ignored_reason.is_(None))).all()
        arrived = session.scalar(select(func.count(Instance.id)).where(
            Instance.series_id == series.id)) or 0
        left_out = session.scalar(select(Instance.ignored_reason).where(
            Instance.series_id == series.id, Instance.ignored_reason.is_not(None)).limit(1))
        calling_ae = series.calling_ae_title or ""
        named = attributes_from_mapping(series_uid, {
            "SeriesDescription": series.description or "", "Modality": series.modality or ""})
    if not relative:
        reason = series.ignored_reason or left_out or "no instance kept (purged?)"
        return named, Triage(reason, arrived)
    paths = [runtime.store.path(r) for r in relative]
    triage = triage_series(settings, paths, reader, calling_ae=calling_ae, received=arrived)
    return triage.facts or named, triage


def _card_reader() -> Any:
    @cache
    def intended_use(checkpoint: str) -> Mapping[str, Any]:
        from denoised_node.model.card import read_card

        return read_card(checkpoint).intended_use

    return intended_use


def _identity(checkpoint: str | None) -> str | None:
    if checkpoint is None:
        return None
    from denoised_node.model.card import read_card
    from denoised_node.model.errors import ModelError

    try:
        return read_card(checkpoint).identity
    except ModelError:
        return None


def _as_json(facts: SeriesAttributes, triage: Triage) -> dict[str, object]:
    decision = triage.decision.as_json() if triage.decision else {
        "rule": None, "why": None, "model": None, "checkpoint": None, "destinations": [],
        "review": False, "hold_gate_failures": False}
    checkpoint = triage.decision.checkpoint if triage.decision else None
    return {"series_uid": facts.series_uid, "images": triage.instances,
            "description": facts.text("SeriesDescription"),
            "model_identity": _identity(checkpoint) if triage.denoise else None,
            **decision, "denoise": triage.denoise, "ignored_reason": triage.ignored_reason}


def _print(facts: SeriesAttributes, triage: Triage) -> None:
    images = f", {triage.instances} image(s)" if triage.instances else ""
    click.echo(f"{facts.series_uid}  {facts.describe()}{images}")
    decision = triage.decision
    if decision is not None:  # without a rule, `why` is the ignored reason printed below
        click.echo(f"  rule: {decision.rule.name} ({decision.why})" if decision.rule
                   else "  rule: none")
    if decision is None or not triage.denoise:
        click.echo(f"  ignored: {triage.ignored_reason}")
        return
    model = decision.rule.model if decision.rule else DEFAULT_MODEL
    click.echo(f"  model: {model} -> {_identity(decision.checkpoint) or decision.checkpoint}")
    click.echo(f"  destinations: {', '.join(decision.destinations) or 'none'}")
    click.echo(f"  review: {'yes, held until approved' if decision.review else 'no'}"
               f"{'; gate refusals held' if decision.hold_gate_failures else ''}")
