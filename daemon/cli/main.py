"""The `denoised-node` command line. Every command takes --config; errors end with one line
on stderr and a non-zero exit status.

Heavy imports happen only where needed, so that a quick command (`status`, `jobs list`)
answers in a fraction of a second: commands import what they use inside their function, and
the command modules of their own (rules, train, evaluate) are imported when run (LAZY)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from denoised_node.config.settings import CONFIG_ENV, ConfigError, Settings
from denoised_node.daemon.cli.options import (
    SINCE_HELP,
    CommandError,
    ExitCode,
    config_option,
    json_option,
    open_runtime_for,
    parse_since,
    settings_from,
)
from denoised_node.storage.queue import JobState

# Commands in modules of their own: name -> "module:attribute", imported when asked for.
LAZY = {"rules": "denoised_node.daemon.cli.rules_commands:rules",
        "train": "denoised_node.daemon.cli.model_commands:train_command",
        "evaluate": "denoised_node.daemon.cli.model_commands:evaluate_command"}


class NodeGroup(click.Group):
    """Turns every failure into one `error: ...` line (JSON with --json) and the exit code
    its kind has (ExitCode), instead of a traceback or click's `Error:`; loads LAZY commands."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY and cmd_name not in self.commands:
            import importlib

            module, attribute = LAZY[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Errors of any subcommand answer in JSON when its command line asks for JSON.
        ctx.meta["denoised_node.json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise  # an exit status, not an error: and no import of torch to classify it
        except BaseException as exc:
            error = command_error(exc)
            if error is None:
                raise
            error.as_json = bool(ctx.meta.get("denoised_node.json"))
            raise error from None


def command_error(exc: BaseException) -> CommandError | None:
    """The one-line error and exit code for a failure the node knows; None for a bug."""
    from denoised_node.daemon.cli.denoise import OfflineError
    from denoised_node.daemon.dicom.scu import SendError
    from denoised_node.daemon.jobs.queries import AdminError, NotFound
    from denoised_node.storage.schema import SchemaOutOfDate

    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, click.UsageError):
        where = exc.ctx.command_path if exc.ctx else "denoised-node"
        return CommandError(f"{exc.format_message()} (see `{where} --help`)", ExitCode.USAGE)
    if isinstance(exc, click.ClickException):
        return CommandError(exc.format_message(), ExitCode.FAILED)
    if isinstance(exc, ConfigError):
        return CommandError(str(exc), ExitCode.USAGE)
    if isinstance(exc, NotFound):
        return CommandError(str(exc), ExitCode.NOT_FOUND)
    if isinstance(exc, SendError):
        return CommandError(str(exc), ExitCode.UNREACHABLE)
    if isinstance(exc, (SchemaOutOfDate, AdminError, OfflineError)):
        return CommandError(str(exc))
    try:
        from denoised_node.model.errors import ModelError

        model_errors: tuple[type[Exception], ...] = (ModelError,)
    except ImportError:  # a plain install without the model's dependencies
        model_errors = ()
    if isinstance(exc, model_errors):
        return CommandError(str(exc))
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        from denoised_node.daemon.cli.extras import extra_bringing, missing_error

        extra = extra_bringing(exc.name)
        return missing_error(extra, [exc.name.split(".")[0]]) if extra else None
    if isinstance(exc, OSError):
        return CommandError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    return None


def _setup_logging(settings: Settings, level: str | None = None) -> None:
    from denoised_node.daemon.process.logs import setup_logging

    setup_logging(level or settings.logging.level, settings.logging.json_lines)


@click.group(cls=NodeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="denoised-node")
def main() -> None:
    """denoised-node: a DICOM node that denoises MR series and sends them back to the PACS."""


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the node: the storage SCP, series completion and the worker processes."""
    from denoised_node.daemon.supervisor import serve as run_serve

    settings = settings_from(config_path)
    _setup_logging(settings)
    sys.exit(run_serve(settings, config_path or _env_config()))


def _env_config() -> Path | None:
    import os

    value = os.environ.get(CONFIG_ENV)
    return Path(value) if value else None


@main.command()
@config_option
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
@click.option("--max-jobs", type=int, default=None, help="Stop after this many jobs.")
def worker(config_path: Path | None, burst: bool, max_jobs: int | None) -> None:
    """Run one worker: claim jobs, denoise, send. Needs no SCP on this host."""
    # serve sends SIGUSR1 when it queues a job; until the worker listens, it must not kill.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    settings = settings_from(config_path)
    _check_shared_store(settings)

    from denoised_node.daemon.jobs.worker import StopNow, Worker, stop_handler
    from denoised_node.model.inference import Denoiser

    _setup_logging(settings)
    runtime = open_runtime_for(settings)
    model = settings.model
    denoiser = Denoiser.from_settings(model)
    node_worker = Worker(settings, runtime.sessions, runtime.store, denoiser)
    handler = stop_handler(node_worker)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: node_worker.waker.wake())
    try:
        node_worker.run(burst=burst, max_jobs=max_jobs)
    except StopNow:
        pass


@main.command(hidden=True)
@config_option
@click.option("--listen", "listen", multiple=True, required=True,
              help="TRANSPORT=FD: a listening socket inherited from serve.")
@click.option("--events-fd", type=int, required=True, help="The pipe to serve's counts.")
@click.option("--processes", type=int, default=1, help="How many receive on these sockets.")
def receiver(config_path: Path | None, listen: tuple[str, ...], events_fd: int,
             processes: int) -> None:
    """One receiving process of serve (node.receive_processes): not run by hand."""
    from denoised_node.daemon.dicom.receiver_process import inherited_sockets, run_receiver

    settings = settings_from(config_path)
    _setup_logging(settings)
    sys.exit(run_receiver(settings, inherited_sockets(list(listen)), events_fd,
                          shared=processes > 1))


def _check_shared_store(settings: Settings) -> None:
    """A worker on a shared (PostgreSQL) queue reads what an SCP on another host stored:
    refuse a data_dir that holds no store (the share not mounted) rather than start and fail
    every job it claims for missing files."""
    if settings.database_url.startswith("sqlite"):
        return
    if not (settings.node.data_dir / "instances").is_dir():
        raise CommandError(
            f"node.data_dir {settings.node.data_dir} holds no file store (no instances/ "
            "folder): mount the shared store there (see docs/scale-out.md), or start "
            "`denoised-node serve` on it first")


@main.command()
@config_option
@json_option
def status(config_path: Path | None, as_json: bool) -> None:
    """Counts of jobs by state and the age of the oldest waiting job."""
    from denoised_node.daemon.jobs.queries import status_summary

    runtime = open_runtime_for(settings_from(config_path))
    with runtime.sessions() as session:
        summary = status_summary(session)
    if as_json:
        click.echo(json.dumps(summary))
        return
    jobs: dict[str, int] = summary["jobs"]  # type: ignore[assignment]
    click.echo("jobs: " + ", ".join(f"{state} {count}" for state, count in jobs.items()))
    click.echo(f"retrying after a failure: {summary['retrying']}")
    click.echo(f"series still receiving: {summary['series_receiving']}")
    age = summary["oldest_waiting_job_seconds"]
    click.echo(f"oldest waiting job: {'none' if age is None else f'{age:.0f} s'}")


@main.group()
def jobs() -> None:
    """Inspect jobs."""


@jobs.command("list")
@config_option
@json_option
@click.option("--state", "states", multiple=True,
              type=click.Choice([state.value for state in JobState]),
              help="Only jobs in this state (repeatable).")
@click.option("--since", default=None, help=f"Only jobs updated since then: {SINCE_HELP}.")
@click.option("--limit", type=int, default=50, show_default=True)
def jobs_list(config_path: Path | None, as_json: bool, states: tuple[str, ...],
              since: str | None, limit: int) -> None:
    """The most recent jobs, newest first."""
    from denoised_node.daemon.jobs.job_status import AttemptLimits, job_status
    from denoised_node.daemon.jobs.queries import list_jobs
    from denoised_node.storage.models import utcnow

    settings = settings_from(config_path)
    runtime = open_runtime_for(settings)
    with runtime.sessions() as session:
        rows = list_jobs(session, states=list(states), since=parse_since(since), limit=limit)
    now, limits = utcnow(), AttemptLimits.from_settings(settings)
    if as_json:
        click.echo(json.dumps([{**row.as_json(now), "status": job_status(row, now, limits)}
                               for row in rows]))
        return
    click.echo(f"{'ID':>6}  {'STATE':<10}  {'UPDATED (UTC)':<19}  {'N':>5}  "
               "SERIES / MODEL / UID / STATUS")
    for row in rows:
        model = f"  model {row.model_identity}" if row.model_identity else ""
        click.echo(f"{row.id:>6}  {row.state:<10}  {row.updated_at:%Y-%m-%d %H:%M:%S}  "
                   f"{row.arrived:>5}  {row.series_name}{model}")
        click.echo(f"{'':>6}  {'':<10}  {'':<19}  {'':>5}  {row.series_uid}")
        # Every job that is not simply done says what it is doing or why it stopped.
        line = job_status(row, now, limits)
        if line:
            click.echo(f"{'':>6}  {'':<10}  {'':<19}  {'':>5}  {line}")


@jobs.command("show")
@click.argument("job_id", type=int)
@config_option
@json_option
def jobs_show(job_id: int, config_path: Path | None, as_json: bool) -> None:
    """One job with its event history."""
    from denoised_node.daemon.jobs.job_status import AttemptLimits, job_status
    from denoised_node.daemon.jobs.queries import job_detail
    from denoised_node.storage.models import utcnow
    from denoised_node.storage.queue import EventKind

    settings = settings_from(config_path)
    runtime = open_runtime_for(settings)
    with runtime.sessions() as session:
        row, events = job_detail(session, job_id)
    now = utcnow()
    status_line = job_status(row, now, AttemptLimits.from_settings(settings))
    if as_json:
        click.echo(json.dumps({**row.as_json(now), "status": status_line,
                               "events": [e.as_json() for e in events]}))
        return
    for key, value in row.as_json(now).items():
        if key == "progress":
            continue  # the status line says it for people
        click.echo(f"{key + ':':<22}{'' if value is None else value}")
    click.echo(f"{'status:':<22}{status_line or ''}")
    click.echo("events:")
    for event in events:
        move = (f"({event.to_state}: note)" if event.kind == EventKind.NOTE
                else f"{event.from_state or '-'} -> {event.to_state}")
        click.echo(f"  {event.at:%Y-%m-%d %H:%M:%S}  {move:<24}  {event.worker or '':<20}  "
                   f"{event.reason or ''}")


def _review(job_id: int, config_path: Path | None, as_json: bool, approve: bool) -> None:
    import getpass

    from denoised_node.daemon.jobs.queries import review

    runtime = open_runtime_for(settings_from(config_path))
    with runtime.sessions.begin() as session:
        message = review(session, job_id, approve=approve, who=f"cli ({getpass.getuser()})")
    click.echo(json.dumps({"job_id": job_id, "approved": approve, "message": message})
               if as_json else message)


@jobs.command("approve")
@click.argument("job_id", type=int)
@config_option
@json_option
def jobs_approve(job_id: int, config_path: Path | None, as_json: bool) -> None:
    """Send a held job's derived series to its rule's destinations."""
    _review(job_id, config_path, as_json, approve=True)


@jobs.command("reject")
@click.argument("job_id", type=int)
@config_option
@json_option
def jobs_reject(job_id: int, config_path: Path | None, as_json: bool) -> None:
    """Drop a held job's derived series: nothing is sent."""
    _review(job_id, config_path, as_json, approve=False)


@main.command()
@config_option
@json_option
@click.option("--job", "job_id", type=int, default=None, help="Replay this job.")
@click.option("--series", "series_uid", default=None, help="Replay this SeriesInstanceUID.")
@click.option("--study", "study_uid", default=None, help="Replay every series of this study.")
@click.option("--failed", is_flag=True, help="Replay every failed job.")
@click.option("--since", default=None,
              help=f"With --failed: only jobs failed since then: {SINCE_HELP}.")
def replay(config_path: Path | None, as_json: bool, job_id: int | None, series_uid: str | None,
           study_uid: str | None, failed: bool, since: str | None) -> None:
    """Queue jobs again: a failed one, a series, a study or all failed ones."""
    from denoised_node.daemon.jobs.queries import replay as do_replay

    chosen = [x for x in (job_id, series_uid, study_uid) if x is not None] + ([1] if failed else [])
    if len(chosen) != 1:
        raise CommandError("give exactly one of --job, --series, --study, --failed",
                           ExitCode.USAGE)
    if since and not failed:
        raise CommandError("--since goes with --failed", ExitCode.USAGE)
    runtime = open_runtime_for(settings_from(config_path))
    with runtime.sessions.begin() as session:
        outcomes = do_replay(session, job_id=job_id, series_uid=series_uid, study_uid=study_uid,
                             failed=failed, since=parse_since(since), who="cli")
    if as_json:
        click.echo(json.dumps([o.__dict__ for o in outcomes]))
    else:
        for outcome in outcomes:
            click.echo(outcome.message)
        if not outcomes:
            click.echo("nothing to replay")
    if outcomes and not any(o.requeued for o in outcomes):
        sys.exit(1)


def _check_series_known(runtime: Any, series_uid: str) -> None:
    from sqlalchemy import select

    from denoised_node.storage.models import Series

    with runtime.sessions() as session:
        if session.scalar(select(Series.id).where(Series.series_uid == series_uid)) is None:
            raise CommandError(f"no series with SeriesInstanceUID {series_uid}; "
                               "`denoised-node jobs list` shows the stored ones",
                               ExitCode.NOT_FOUND)


@main.command()
@config_option
@json_option
@click.option("--older-than", "older_than_hours", type=float, default=None,
              help="Hours since the series finished (default: retention.done_after_hours).")
@click.option("--failed", "include_failed", is_flag=True,
              help="Purge failed series too (they are kept otherwise).")
@click.option("--series", "series_uid", default=None, help="Only this SeriesInstanceUID.")
@click.option("--dry-run", is_flag=True, help="Count what would be purged, remove nothing.")
def purge(config_path: Path | None, as_json: bool, older_than_hours: float | None,
          include_failed: bool, series_uid: str | None, dry_run: bool) -> None:
    """Remove the files of finished series (received and derived); keep their history."""
    from datetime import timedelta

    from denoised_node.storage.retention import purge_finished

    settings = settings_from(config_path)
    runtime = open_runtime_for(settings)
    if series_uid is not None:
        _check_series_known(runtime, series_uid)
    hours = settings.retention.done_after_hours if older_than_hours is None else older_than_hours
    result = purge_finished(runtime.sessions, runtime.store, timedelta(hours=hours),
                            include_failed=include_failed, series_uid=series_uid,
                            dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"series": result.series, "files": result.files,
                               "dry_run": dry_run}))
    else:
        verb = "would purge" if dry_run else "purged"
        click.echo(f"{verb} {result.series} series ({result.files} files)")


@main.command()
@click.argument("destination")
@config_option
@json_option
def echo(destination: str, config_path: Path | None, as_json: bool) -> None:
    """C-ECHO a configured destination (a DICOMweb one: a QIDO-RS query), by its name or
    its AE title."""
    from denoised_node.daemon.jobs.destinations import echo as do_echo

    settings = settings_from(config_path)
    try:
        dest = settings.destination_named_or_titled(destination)
    except ConfigError as exc:
        raise CommandError(f"{exc}; destinations are [[destinations]] in the config",
                           ExitCode.NOT_FOUND) from None
    answer = do_echo(settings, dest)  # SendError: unreachable or rejected, with the reason
    if not answer.ok:
        raise CommandError(answer.line(dest.name))
    if as_json:
        facts = {k: v for k, v in answer.facts.items() if k != "where"}
        click.echo(json.dumps(facts))
    else:
        click.echo(answer.line(dest.name))


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@config_option
@json_option
def db_upgrade(config_path: Path | None, as_json: bool) -> None:
    """Create the schema, or bring it to this release's version."""
    from denoised_node.storage.db import make_engine
    from denoised_node.storage.schema import upgrade

    settings = settings_from(config_path)
    engine = make_engine(settings.database_url)
    before, after = upgrade(engine)
    if as_json:
        click.echo(json.dumps({"before": before, "after": after, "changed": before != after}))
    elif before == after:
        click.echo(f"schema already at revision {after}")
    else:
        click.echo(f"schema upgraded from {before or 'empty'} to {after}")


@main.command()
@click.argument("input_path", type=click.Path(exists=True, path_type=Path))
@click.argument("output_path", type=click.Path(path_type=Path))
@config_option
@json_option
@click.option("--checkpoint", default=None,
              help="Model to use: a checkpoint path or name (default: [model] checkpoint).")
@click.option("--device", default=None,
              help="auto | cpu | cuda | cuda:N (default: [model] device).")
@click.option("--no-gate", is_flag=True, help="Write the result even if the safety gate fails.")
@click.option("--override-intended-use", is_flag=True,
              help="Denoise a series outside the model card's intended use (never another "
                   "modality than series.modalities).")
def denoise(input_path: Path, output_path: Path, config_path: Path | None, as_json: bool,
            checkpoint: str | None, device: str | None, no_gate: bool,
            override_intended_use: bool) -> None:
    """Denoise a DICOM series folder (writing the derived series as the node would) or a
    NIfTI file, without the network."""
    from denoised_node.daemon.cli.denoise import denoise_path, is_nifti
    from denoised_node.daemon.cli.progress_bar import LineProgress

    if is_nifti(input_path):
        from denoised_node.daemon.cli.extras import require

        require("train")  # NIfTI files are read and written with nibabel
    settings = settings_from(config_path)
    model = {k: v for k, v in (("checkpoint", checkpoint), ("device", device)) if v}
    if model:
        settings = _with_model(settings, model)
    if no_gate:
        settings = settings.model_copy(update={"gate": settings.gate.model_copy(
            update={"enabled": False})})
    _setup_logging(settings, "WARNING")
    bar = LineProgress("denoising", "slices", file=sys.stderr)
    try:
        message = denoise_path(settings, input_path, output_path,
                               progress=None if as_json else bar.progress,
                               override_intended_use=override_intended_use)
    finally:
        bar.close()
    click.echo(json.dumps({"output": str(output_path), "message": message}) if as_json
               else message)


def _with_model(settings: Settings, values: dict[str, str]) -> Settings:
    """The settings with [model] keys from the command line, checked as the file's are."""
    from pydantic import ValidationError

    from denoised_node.config.settings import ModelSettings, describe_validation_error

    try:
        model = ModelSettings.model_validate({**settings.model.model_dump(), **values})
    except ValidationError as exc:
        raise CommandError(f"--{'/--'.join(values)}: {describe_validation_error(exc)}",
                           ExitCode.USAGE) from None
    return settings.model_copy(update={"model": model})


@main.command("http-password")
@click.argument("password_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--user", "username", required=True, help="The user name (http.username).")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from standard input instead of asking twice.")
def http_password(password_file: Path, username: str, password_stdin: bool) -> None:
    """Write USER:bcrypt-hash to PASSWORD_FILE (mode 0600) for http.password_file."""
    from denoised_node.daemon.web.passwords import write_password_file

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        raise CommandError("the password is shorter than 8 characters; choose a longer one")
    try:
        write_password_file(password_file, username, password)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    click.echo(f"wrote a bcrypt hash for {username} to {password_file}; set http.username = "
               f"\"{username}\" and http.password_file = \"{password_file}\"")


@main.command()
@config_option
@json_option
def doctor(config_path: Path | None, as_json: bool) -> None:
    """Check config, database, model, GPU, disk and destinations; say how to fix problems."""
    from denoised_node.daemon.cli.doctor import run_checks

    settings = settings_from(config_path)
    _setup_logging(settings, "ERROR")
    checks = run_checks(settings)
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks]))
    else:
        click.echo("config: ok")
        for check in checks:
            click.echo(f"{check.name}: {'ok' if check.ok else 'PROBLEM'}: {check.detail}")
            if not check.ok and check.fix:
                click.echo(f"  fix: {check.fix}")
    if not all(c.ok for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
