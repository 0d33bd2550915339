"""Schema versions: upgrade with Alembic, and refuse to run on a schema that is behind."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class SchemaOutOfDate(Exception):
    """The database schema is not at the version this release needs; run `denoised-node db upgrade`."""


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def head_revision(engine: Engine) -> str:
    heads = ScriptDirectory.from_config(alembic_config(engine)).get_heads()
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# Any fixed number: the PostgreSQL advisory lock that serialises schema upgrades.
_UPGRADE_LOCK = 0x646E5F6E6F6465  # "dn_node"


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (before, after).

    On PostgreSQL several processes may do this at once (two `serve` instances starting on
    an empty database): an advisory lock makes them take turns, and the later ones find the
    schema at head. DDL is transactional there, so a failed upgrade leaves nothing half-done.
    """
    before = current_revision(engine)
    config = alembic_config(engine)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return before, head_revision(engine)


def check_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision(engine)
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        found = current or "empty"
        raise SchemaOutOfDate(
            f"database {where} is at schema revision {found}, this release needs {head}; "
            "run `denoised-node db upgrade`"
        )
