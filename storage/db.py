"""Engine and session factory: SQLite in WAL mode by default, PostgreSQL through the same code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

SessionFactory = sessionmaker[Session]


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def is_postgres(session: Session) -> bool:
    """True where row locks (FOR UPDATE, SKIP LOCKED) mean something; SQLite ignores them
    and serialises writers instead (BEGIN IMMEDIATE)."""
    return session.get_bind().dialect.name == "postgresql"


def make_engine(url: str, *, echo: bool = False, synced_commits: bool = True) -> Engine:
    """Build the engine for ``url``; for SQLite, make the file's folder and set the pragmas
    the node relies on (WAL, full sync so a commit survives power loss, a busy timeout).

    ``synced_commits=False`` (the receiver's index only): a commit returns before it is on
    disk (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off). A power loss can
    undo the last such commits, never corrupt the database; what they indexed is found
    again from the files (daemon/dicom/rescan.py, docs/reliability.md). Any synced commit after
    them makes them durable too."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine, "FULL" if synced_commits else "NORMAL")
        return engine
    kwargs["pool_pre_ping"] = True
    if not synced_commits and parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"options": "-c synchronous_commit=off"}
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: two processes that read then write can't
        # deadlock on a lock upgrade; the busy timeout makes the loser wait instead of fail.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)
