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
from denoised_node.daemon.cli_options import (
    CommandError,
    ExitCode,
    config_option,
    json_option,
    open_runtime_for,
    settings_from,
)
from denoised_node.daemon.rules import Decision, decide
from denoised_node.daemon.series_attributes import SeriesAttributes, attributes_from_file


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
    """For each series under FOLDER (or --series UID): the rule that matches and why, the
    model, and where the result would go."""
    if (folder is None) == (series_uid is None):
        raise CommandError("give a FOLDER or --series UID (one of them)", ExitCode.USAGE)
    settings = settings_from(config_path)
    if folder is not None:
        found = series_in_folder(folder, calling_ae)
        if not found:
            raise CommandError(f"no DICOM files under {folder}")
    else:
        found = [(stored_series(settings, str(series_uid)), 0)]
    reader = _card_reader()
    results = [(facts, count, decide(settings, facts, reader)) for facts, count in found]
    if as_json:
        click.echo(json.dumps([{"series_uid": facts.series_uid, "images": count,
                                "description": facts.text("SeriesDescription"),
                                "model_identity": _identity(decision.checkpoint),
                                **decision.as_json()}
                               for facts, count, decision in results]))
        return
    for facts, count, decision in results:
        _print(facts, count, decision)


def series_in_folder(folder: Path, calling_ae: str) -> list[tuple[SeriesAttributes, int]]:
    """The series under ``folder``: the first readable image's facts and the image count."""
    first: dict[str, SeriesAttributes] = {}
    counts: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            facts = attributes_from_file(path, calling_ae)
        except ValueError:
            continue  # not DICOM: a README, a DICOMDIR's neighbours
        if not facts.series_uid:
            continue
        first.setdefault(facts.series_uid, facts)
        counts[facts.series_uid] = counts.get(facts.series_uid, 0) + 1
    return [(first[uid], counts[uid]) for uid in first]


def stored_series(settings: Settings, series_uid: str) -> SeriesAttributes:
    from sqlalchemy import select

    from denoised_node.storage.models import Instance, Series

    runtime = open_runtime_for(settings)
    with runtime.sessions() as session:
        series = session.scalar(select(Series).where(Series.series_uid == series_uid))
        if series is None:
            raise CommandError(f"no stored series with SeriesInstanceUID {series_uid}; "
                               "`denoised-node jobs list` shows the stored ones",
                               ExitCode.NOT_FOUND)
        paths = session.scalars(select(Instance.path).where(
            Instance.series_id == series.id, Instance.ignored_reason.is_(None))).all()
        calling_ae = series.calling_ae_title or ""
    for relative in paths:
        try:
            return attributes_from_file(runtime.store.path(relative), calling_ae)
        except ValueError:
            continue
    raise CommandError(f"series {series_uid} has no readable stored image (purged?)")


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


def _print(facts: SeriesAttributes, count: int, decision: Decision) -> None:
    images = f", {count} image(s)" if count else ""
    click.echo(f"{facts.series_uid}  {facts.describe()}{images}")
    # Without a rule, `why` is the ignored reason printed below.
    click.echo(f"  rule: {decision.rule.name} ({decision.why})" if decision.rule else "  rule: none")
    if not decision.denoise:
        click.echo(f"  ignored: {decision.ignored_reason}")
        return
    model = decision.rule.model if decision.rule else DEFAULT_MODEL
    click.echo(f"  model: {model} -> {_identity(decision.checkpoint) or decision.checkpoint}")
    click.echo(f"  destinations: {', '.join(decision.destinations) or 'none'}")
    click.echo(f"  review: {'yes, held until approved' if decision.review else 'no'}"
               f"{'; gate refusals held' if decision.hold_gate_failures else ''}")
