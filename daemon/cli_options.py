"""What the CLI's command modules share: the one-line error, --config and --json, and
loading the settings and the node's runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from denoised_node.config.settings import CONFIG_ENV, Settings, load_settings

if TYPE_CHECKING:
    from denoised_node.daemon.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """A failure reported as one line: `error: ...`."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def config_option(func: F) -> F:
    return click.option(
        "--config", "config_path", type=click.Path(path_type=Path), default=None,
        help=f"TOML config file (default: ${CONFIG_ENV}, else the embedded defaults).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(func)


def settings_from(config_path: Path | None) -> Settings:
    return load_settings(config_path)


def open_runtime_for(settings: Settings) -> Runtime:
    from denoised_node.daemon.runtime import open_runtime

    return open_runtime(settings)
