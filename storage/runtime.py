"""What every command that touches the node's state needs: engine, sessions, file store."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, inspect

from denoised_node.config.settings import Settings
from denoised_node.storage.db import SessionFactory, make_engine, make_session_factory
from denoised_node.storage.files import FileStore
from denoised_node.storage.schema import check_schema, upgrade


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    sessions: SessionFactory
    store: FileStore


def open_runtime(settings: Settings, *, initialise_empty: bool = False) -> Runtime:
    """Connect and check the schema. ``initialise_empty`` creates the schema in a database
    that has no tables at all (a first start); a database on an older schema is refused."""
    engine = make_engine(settings.database_url, echo=settings.database.echo)
    if initialise_empty and not inspect(engine).get_table_names():
        upgrade(engine)
    check_schema(engine)
    store = FileStore(settings.node.data_dir, min_free_bytes=settings.node.min_free_mb * 2**20)
    return Runtime(settings, engine, make_session_factory(engine), store)
