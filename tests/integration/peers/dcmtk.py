"""DCMTK as the modality: storescu, echoscu, and a storescp receiver."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.integration.peers.process import ManagedProcess
from tests.integration.peers.tools import (
    free_port,
    nodelay_env,
    port_open,
    require_tool,
    wait_until,
)

# storescu proposes uncompressed syntaxes only, unless told which compressed one the files use.
STORESCU_SYNTAX_ARGS: dict[str, tuple[str, ...]] = {
    RLELossless: ("-xr",),
    JPEGLosslessSV1: ("-xs",),
    JPEGLossless: ("-xs",),  # -xs proposes process 14 SV1 first, process 14 too
    JPEGLSLossless: ("-xt",),
    JPEG2000Lossless: ("-xv",),
}


def storescu_syntax_args(transfer_syntax: str) -> tuple[str, ...]:
    """The storescu option that proposes this transfer syntax ((): uncompressed)."""
    return STORESCU_SYNTAX_ARGS.get(transfer_syntax, ())


def storescu(
    directory: Path,
    host: str,
    port: int,
    calling: str,
    called: str,
    extra_args: tuple[str, ...] | list[str] = (),
    *,
    pattern: str | None = "*.dcm",
    timeout: float = 300.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Send every file under directory in one association (+sd +r), with TCP_NODELAY=1."""
    command = [
        require_tool("storescu"),
        "-aet",
        calling,
        "-aec",
        called,
        "+sd",
        "+r",
        "-to",
        "10",
        "-ta",
        "30",
        "-td",
        "60",
    ]
    if pattern:
        command += ["+sp", pattern]
    command += [*extra_args, host, str(port), str(directory)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=nodelay_env(), check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"storescu exited {done.returncode}: {' '.join(command)}\n{done.stdout}{done.stderr}"
        )
    return done


def echoscu(
    host: str, port: int, called: str, calling: str = "ECHOSCU", *, timeout: float = 15.0
) -> bool:
    """True when a C-ECHO to called@host:port succeeds."""
    command = [
        require_tool("echoscu"),
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "5",
        "-ta",
        "5",
        "-td",
        "5",
        host,
        str(port),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=nodelay_env(), check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@dataclass
class StoreSCP:
    """A running DCMTK storescp that accepts every transfer syntax (+xa) into directory."""

    directory: Path
    port: int
    aet: str
    process: ManagedProcess = field(repr=False)

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 60.0) -> list[Path]:
        return wait_until(
            lambda: found if len(found := self.files()) >= count else None,
            timeout=timeout,
            what=f"{count} files in {self.directory}",
        )

    def stop(self) -> None:
        self.process.stop()


def start_storescp(
    directory: Path,
    *,
    aet: str = "STORESCP",
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
    startup_timeout: float = 20.0,
) -> StoreSCP:
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = directory.parent / f"storescp-{port}.log"
    command = [
        require_tool("storescp"),
        "-aet",
        aet,
        "+xa",
        "-od",
        str(directory),
        *extra_args,
        str(port),
    ]
    process = ManagedProcess.start(command, log=log, env=nodelay_env())
    scp = StoreSCP(directory, port, aet, process)
    try:
        wait_until(
            lambda: process.check_alive() and port_open(port),
            timeout=startup_timeout,
            what=f"storescp on port {port}",
        )
    except BaseException:
        scp.stop()
        raise
    return scp
