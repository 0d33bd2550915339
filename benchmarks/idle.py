"""Idle CPU: `denoised-node serve` (SCP, completion, status pages) and its worker with nothing
to do, beside Orthanc and DCMTK's storescp idle over the same seconds.

CPU time is read from /proc (user + system of each process), so a busy machine slows nothing
down here: the figure is what the idle node itself spends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.common import Row, fresh_dir
from tests.integration.node import node_config, start_node
from tests.integration.peers import free_port, start_orthanc, start_storescp
from tests.integration.peers.tools import wait_until

SECTION = "idle"
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


def share_of_a_core(pids: list[int], seconds: float) -> float:
    """Per cent of one core the processes used, together, over ``seconds``."""
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(seconds)
    after = sum(cpu_seconds(p) for p in pids)
    return 100.0 * (after - before) / seconds


def idle_rows(workdir: Path, seconds: float = 60.0) -> list[Row]:
    orthanc = start_orthanc(fresh_dir(workdir / "orthanc-idle"))
    storescp = start_storescp(fresh_dir(workdir / "storescp-idle"))
    port = free_port()
    node_dir = fresh_dir(workdir / "node-idle")
    http_port = free_port()
    config = node_config(node_dir, port, orthanc, model={"device": "cpu", "threads": 1},
                         http={"enabled": True, "port": http_port})
    node = start_node(config, port, node_dir / "node.log")
    try:
        wait_until(lambda: "worker started" in node.process.log.read_text(), timeout=180,
                   what="the worker's model")
        time.sleep(5)  # past start-up: orphan scans, the first health checks
        serve = node.process.popen.pid
        workers = children(serve)
        peers = {"Orthanc": share_of_a_core([orthanc.process.popen.pid], seconds),
                 "storescp": share_of_a_core([storescp.process.popen.pid], seconds)}
        serve_share = share_of_a_core([serve], seconds)
        worker_share = share_of_a_core(workers, seconds)
    finally:
        node.process.stop(timeout=60)
        storescp.stop()
        orthanc.stop()
    return [
        Row(SECTION, "serve (SCP, completion, status pages), nothing to do", serve_share,
            "% of a core", peers, note=f"over {seconds:.0f} s"),
        Row(SECTION, f"worker(s) ({len(workers)}), model loaded, no job", worker_share,
            "% of a core", note=f"over {seconds:.0f} s"),
        Row(SECTION, "serve + worker", serve_share + worker_share, "% of a core",
            note="target < 0.2"),
    ]
