"""What the CLI's command modules share: the one-line error and its exit code, --config and
--json, and loading the settings and the node's runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from denoised_node.config.settings import CONFIG_ENV, Settings, load_settings

if TYPE_CHECKING:
    from denoised_node.daemon.runtime import Runtime

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
        self.exit_code = int(exit_code)
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
    from denoised_node.daemon.runtime import open_runtime

    return open_runtime(settings)
