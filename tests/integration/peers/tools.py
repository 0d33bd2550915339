"""Finding peer binaries, free ports, the environment for DCMTK/Orthanc, and waiting."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

T = TypeVar("T")

# Debian installs Orthanc in /usr/sbin; DCMTK in /usr/bin. pynetdicom puts its own python
# `storescu`/`storescp`/`echoscu` scripts in the venv's bin, which shadow DCMTK on PATH.
SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")
APT_PACKAGE = {
    "Orthanc": "orthanc",
    "dciodvfy": "dicom3tools",
    "dcm2niix": "dcm2niix",
    "psql": "postgresql",
    "pg_ctl": "postgresql",
}


def in_ci() -> bool:
    """True where a missing peer must fail the run (CI sets CI=1 or CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _is_python_script(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            first = handle.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def find_tool(name: str) -> str | None:
    """Absolute path of a native binary: system folders first, never a Python look-alike."""
    for folder in SYSTEM_DIRS:
        candidate = Path(folder) / name
        if (
            candidate.is_file()
            and os.access(candidate, os.X_OK)
            and not _is_python_script(candidate)
        ):
            return str(candidate)
    found = shutil.which(name)
    if found and not _is_python_script(Path(found)):
        return found
    return None


def require_tool(name: str) -> str:
    """The tool's path; skip (outside CI) or fail (in CI) when it is not installed."""
    path = find_tool(name)
    if path is not None:
        return path
    package = APT_PACKAGE.get(name, "dcmtk")
    skip_or_fail(f"{name} is not installed (apt-get install {package})", "CI must have every peer")


def skip_or_fail(message: str, in_ci_because: str) -> NoReturn:
    """Skip the test outside CI; in CI (CI=1) fail it, since CI installs everything."""
    if in_ci():
        pytest.fail(f"{message}; {in_ci_because}", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on every interface now (Orthanc binds all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def nodelay_env(**extra: str) -> dict[str, str]:
    """The environment for DCMTK-based peers: Nagle off (else ~40 ms per C-STORE)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def wait_until(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
) -> T:
    """Poll until condition() returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
