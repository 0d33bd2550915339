"""Run the node under test as a real `denoised-node serve` process, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.integration.peers import ManagedProcess, Orthanc
from tests.integration.peers.dcmtk import echoscu
from tests.integration.peers.tools import wait_until

NODE_AET = "DENOISER"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]],
                 destinations: list[dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for destination in destinations:
        lines.append("[[destinations]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in destination.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def node_config(workdir: Path, port: int, orthanc: Orthanc | None, *,
                destinations: list[dict[str, Any]] | None = None,
                **sections: dict[str, Any]) -> Path:
    """A config for a node on loopback that sends to ``orthanc`` (over DIMSE) and to
    ``destinations``; ``sections`` override."""
    base: dict[str, dict[str, Any]] = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port,
                 "data_dir": str(workdir / "data"), "min_free_mb": 0},
        "series": {"idle_seconds": 3},
        "model": {"device": "cpu", "threads": 1},
        "worker": {"count": 1, "poll_seconds": 0.2},
        "send": {"backoff_base_seconds": 0.5, "backoff_max_seconds": 5},
        "http": {"enabled": False},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    entries = []
    if orthanc is not None:
        entries.append({"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                        "port": orthanc.dicom_port})
    entries += destinations or []
    return write_config(workdir / "node.toml", base, entries)


@dataclass
class Node:
    config: Path
    port: int
    process: ManagedProcess

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "denoised_node.daemon.cli.main", *args,
                               "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"denoised-node {' '.join(args)} exited {done.returncode}: "
                                 f"{done.stderr}")
        return done

    def jobs(self, *states: str) -> list[dict[str, Any]]:
        args = ["jobs", "list", "--json", "--limit", "1000"]
        for state in states:
            args += ["--state", state]
        return json.loads(self.cli(*args).stdout)

    def log(self) -> str:
        return self.process.log_tail(400)

    def stop(self, timeout: float = 60.0) -> int:
        self.process.popen.send_signal(signal.SIGTERM)
        return self.process.popen.wait(timeout)


def wait_gone(pid: int, timeout: float = 60) -> None:
    """Until the process ``pid`` has gone (a killed node's children too), at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def start_node(config: Path, port: int, log: Path, *, timeout: float = 120.0) -> Node:
    env = dict(os.environ)
    env.pop("DENOISED_NODE_CONFIG", None)
    process = ManagedProcess.start(
        [sys.executable, "-m", "denoised_node.daemon.cli.main", "serve", "--config", str(config)],
        log=log, env=env, cwd=config.parent)
    node = Node(config, port, process)
    try:
        wait_until(lambda: process.check_alive() and echoscu("127.0.0.1", port, NODE_AET),
                   timeout=timeout, what=f"the node's C-ECHO on port {port}")
    except BaseException as error:
        process.stop()
        raise RuntimeError(f"the node did not start: {error}\n{process.log_tail(60)}") from error
    return node
