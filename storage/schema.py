"""Schema versions: upgrade with Alembic, and refuse to run on a schema that is behind.

The check that every command makes (check_schema) does without Alembic, whose import costs
about 0.3 s of each command: it reads the revisions from the migration files and the
database's from its alembic_version table. Only an upgrade imports Alembic."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_REVISION = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*["']?([^"'\s]+)["']?""",
                       re.MULTILINE)


class SchemaOutOfDate(Exception):
    """The database schema is not at the version this release needs; run
    `denoised-node db upgrade`."""


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


@cache
def head_revision() -> str:
    """The newest revision: the one no migration names as its down_revision."""
    revisions, downs = set(), set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = dict(_REVISION.findall(path.read_text()))
        if "revision" not in found:
            continue  # __init__.py
        revisions.add(found["revision"])
        downs.add(found.get("down_revision", "None"))
    heads = revisions - downs
    if len(heads) != 1:
        raise RuntimeError(f"the migrations in {MIGRATIONS} have heads {sorted(heads)}, not one")
    return heads.pop()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


# Any fixed number: the PostgreSQL advisory lock that serialises schema upgrades.
_UPGRADE_LOCK = 0x646E5F6E6F6465  # "dn_node"


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (before, after).

    On PostgreSQL several processes may do this at once (two `serve` instances starting on
    an empty database): an advisory lock makes them take turns, and the later ones find the
    schema at head. DDL is transactional there, so a failed upgrade leaves nothing half-done.
    """
    from alembic import command

    before = current_revision(engine)
    config = alembic_config(engine)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return before, head_revision()


def check_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        found = current or "empty"
        raise SchemaOutOfDate(
            f"database {where} is at schema revision {found}, this release needs {head}; "
            "run `denoised-node db upgrade`"
        )
