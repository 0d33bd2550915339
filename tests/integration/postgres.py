"""A real PostgreSQL server for the tests: Debian's binaries, a temp data directory, a free
loopback port, stopped by its PID in teardown.

`initdb` and `postgres` refuse to run as root, so under root (CI) the server runs as the
unprivileged user `nobody` (its data directory is chowned to it). Outside CI a missing server
or driver skips the tests with the package to install; in CI (CI=1) it fails them.

Use it from a test module with
    from tests.integration.postgres import postgres_server, postgres_url  # noqa: F401
`postgres_url` is a fresh, empty database per test on one server per test session.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.peers.tools import free_port, skip_or_fail

SERVER_USER = "nobody"  # who runs the server when the tests run as root
_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/usr/pgsql-*/bin")


def find_bindir() -> Path | None:
    """The newest server bin folder that has initdb and postgres, else None."""
    candidates = [Path(p) for pattern in _SEARCH for p in glob.glob(pattern)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)

    def version(folder: Path) -> tuple[int, ...]:
        digits = "".join(c if c.isdigit() else " " for c in str(folder)).split()
        return tuple(int(d) for d in digits)

    for folder in sorted(candidates, key=version, reverse=True):
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def missing_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if find_bindir() is None:
        return "PostgreSQL server binaries not found (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install -e '.[postgres]')"
    return None


def require_postgres() -> None:
    """Skip (outside CI) or fail (in CI) when PostgreSQL cannot run here."""
    reason = missing_reason()
    if reason is not None:
        skip_or_fail(reason, "CI must run the PostgreSQL tests")


@dataclass
class PostgresServer:
    """A running server; `url(database)` builds SQLAlchemy URLs (trust auth on loopback)."""

    bindir: Path
    root: Path  # temp folder: data/, the socket and the log
    port: int
    process: subprocess.Popen[bytes]
    superuser: str = "postgres"
    host: str = "127.0.0.1"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.superuser}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.superuser,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.root / "server.log").read_text(errors="replace")
                             .splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT) by PID; SIGQUIT (immediate) if it hangs; then remove files."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGQUIT)
                self.process.wait(timeout)
        shutil.rmtree(self.root, ignore_errors=True)


def _as_server_user() -> dict[str, object]:
    """Popen arguments that drop root to SERVER_USER (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(SERVER_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start_postgres(*, durable: bool = False, timeout: float = 60.0) -> PostgresServer:
    """initdb into a fresh temp folder and start the server on a free loopback port.

    ``durable=False`` (tests) turns fsync off: a crash of the test server loses nothing that
    matters, and the 2-core CI machine runs faster. The benchmark passes True.
    """
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
    # Not under pytest's basetemp: its folders are 0700 root, which the server user cannot
    # enter. /tmp is world-traversable; mkdtemp makes the folder 0700 for its owner.
    root = Path(tempfile.mkdtemp(prefix="denoised-node-pg-"))
    drop = _as_server_user()
    if drop:
        os.chown(root, int(drop["user"]), int(drop["group"]))  # type: ignore[call-overload]
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
           "HOME": str(root)}
    data = root / "data"
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                    "-E", "UTF8", "--no-sync", "--no-instructions"],
                   check=True, capture_output=True, env=env, cwd=root, **drop)  # type: ignore[call-overload]
    port = free_port()
    options = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
               "-c", "max_connections=100", "-c", "shared_buffers=32MB",
               "-c", "timezone=Europe/Paris"]  # not UTC: naive-UTC columns must not care
    if not durable:
        options += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off"]
    log = (root / "server.log").open("ab")
    if drop:
        os.chown(root / "server.log", int(drop["user"]), int(drop["group"]))  # type: ignore[call-overload]
    process = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                *options],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=env, cwd=root, start_new_session=True, **drop)  # type: ignore[call-overload]
    log.close()
    server = PostgresServer(bindir, root, port, process)
    deadline = time.monotonic() + timeout
    while not _accepts(server):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"PostgreSQL did not start on port {port}:\n{tail}")
        time.sleep(0.1)
    return server


def _accepts(server: PostgresServer) -> bool:
    import psycopg

    try:
        with psycopg.connect(host=server.host, port=server.port, user=server.superuser,
                             dbname="postgres", connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


# One server per test session, shared by every module that imports the fixtures below
# (pytest would otherwise make one per importing module).
_shared: PostgresServer | None = None
_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    global _shared
    require_postgres()
    if _shared is None or _shared.process.poll() is not None:
        _shared = start_postgres()
    yield _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh empty database on the shared server."""
    return postgres_server.create_database(f"test_{os.getpid()}_{next(_database_numbers)}")
