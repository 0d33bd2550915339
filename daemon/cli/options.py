"""What the CLI's command modules share: the one-line error and its exit code, --config,
--json and --since, and loading the settings and the node's runtime."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from denoised_node.config.settings import CONFIG_ENV, Settings, load_settings

if TYPE_CHECKING:
    from denoised_node.storage.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(IntEnum):
    """The exit statuses the README lists; scripts rely on them."""

    OK = 0
    FAILED = 1  # the command ran and the work failed (a send, a check, a replay refused)
    USAGE = 2  # bad arguments or configuration: fix the command line or the config
    NOT_FOUND = 3  # the job, series, study or destination named does not exist
    UNREACHABLE = 4  # a DICOM peer did not answer or refused the association


class CommandError(click.ClickException):
    """A failure reported as one line, `error: ...` on stderr, or with --json as
    ``{"error": ..., "exit_code": ...}`` on stdout, where a script reads the answer."""

    def __init__(self, message: str, exit_code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        # click types exit_code as a class variable; each of these errors carries its own.
        self.exit_code = int(exit_code)  # type: ignore[misc]
        self.as_json = False

    def show(self, file: Any = None) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": self.message, "exit_code": self.exit_code}))
        else:
            click.echo(f"error: {self.message}", err=True)


def config_option(func: F) -> F:
    return click.option(
        "--config", "-c", "config_path", type=click.Path(path_type=Path), default=None,
        help=f"TOML config file (default: ${CONFIG_ENV}, else the embedded defaults).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON for scripts (errors too).")(func)


def settings_from(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def open_runtime_for(settings: Settings) -> Runtime:
    from denoised_node.storage.runtime import open_runtime

    return open_runtime(settings)


_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SINCE_HELP = ("an ISO date/time (UTC unless it names a zone) or a duration back from now: "
              "30m, 1h, 2d, 1w")


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """--since: an ISO date or time, or a duration back from ``now`` (30m, 1h, 2d, 1w)."""
    if value is None:
        return None
    if duration := _DURATION.fullmatch(value.strip().lower()):
        seconds = int(duration[1]) * _UNIT_SECONDS[duration[2]]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--since {value!r} is neither an ISO date or time (2026-11-25, "
                           "2026-11-25T08:00) nor a duration (30m, 1h, 2d, 1w)",
                           ExitCode.USAGE) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
