"""The package's optional extras, read from its installed metadata (pyproject.toml's
optional-dependencies is their one home): which extra brings a module, and the one-line
error of a command whose extra is not installed."""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata, util

from denoised_node.daemon.cli.options import CommandError

DISTRIBUTION = "denoised-node"
# The extras that commands need, and what for, in the error's words.
PURPOSES = {"train": "NIfTI files, train and evaluate", "postgres": "PostgreSQL"}
# `tqdm>=4.66; extra == "train"`, `psycopg[binary]>=3.1; extra == "postgres"`
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*).*;"
                          r".*\bextra\s*==\s*['\"]([^'\"]+)['\"]")


@cache
def extras() -> dict[str, tuple[str, ...]]:
    """Each extra's packages, by the top-level name they import as (their project name in
    all of ours: tqdm, nibabel, psycopg, ...)."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return {}
    found: dict[str, list[str]] = {}
    for line in requirements:
        match = _REQUIREMENT.match(line)
        if match:
            name, extra = match.groups()
            found.setdefault(extra, []).append(name.lower().replace("-", "_").replace(".", "_"))
    return {extra: tuple(names) for extra, names in found.items()}


def extra_bringing(module: str) -> str | None:
    """The extra that installs this module (or its top-level package); None for others."""
    top = module.split(".")[0]
    return next((extra for extra, names in extras().items()
                 if extra in PURPOSES and top in names), None)


def missing_error(extra: str, modules: list[str]) -> CommandError:
    """`error: ... pip install 'denoised-node[train]'`: what is missing and how to get it."""
    many = len(modules) > 1
    return CommandError(f"{PURPOSES[extra]} need the optional "
                        f"package{'s' if many else ''} {', '.join(modules)}, which "
                        f"{'are' if many else 'is'} not installed: "
                        f"pip install '{DISTRIBUTION}[{extra}]'")


def require(extra: str) -> None:
    """Fail at once, before any work, where the command's extra is not (wholly) installed."""
    missing = [name for name in extras().get(extra, ()) if util.find_spec(name) is None]
    if missing:
        raise missing_error(extra, missing)
