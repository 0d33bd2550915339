"""node.receive_processes: several processes receive on one port. A real `serve` with two
receiving processes, real storescu associations: every instance is indexed once, /metrics
counts what the receivers stored, and a receiver killed outright is restarted while the
port keeps answering."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import urllib.request
from pathlib import Path

from tests.fixtures.mr_series import generate_series
from tests.integration.node import NODE_AET, node_config, start_node
from tests.integration.peers import free_port, storescu
from tests.integration.peers.tools import wait_until


def _indexed(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(value) for value in re.findall(rf"^{name} (\S+)$", text, re.MULTILINE))


def _receiver_pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"receiving process started receiver_index=\d+ "
                                           r"pid=(\d+)", log)]


def test_two_receiving_processes_share_the_port(tmp_path: Path) -> None:
    folders = [generate_series(tmp_path / f"series{i}", rows=32, columns=32, slices=6,
                               seed=100 + i).directory
               for i in range(4)]
    port, http_port = free_port(), free_port()
    (tmp_path / "node").mkdir()
    config = node_config(tmp_path / "node", port, None, worker={"count": 0},
                         series={"idle_seconds": 3600}, node={"receive_processes": 2},
                         http={"enabled": True, "port": http_port})
    node = start_node(config, port, tmp_path / "node.log")
    database = tmp_path / "node" / "data" / "node.db"
    try:
        threads = [threading.Thread(target=storescu, args=(folder, "127.0.0.1", port, "MOD",
                                                            NODE_AET)) for folder in folders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert _indexed(database) == 24
        wait_until(lambda: _metric(http_port, 'denoised_node_received_instances_total'
                                   r'\{outcome="stored"\}') == 24,
                   timeout=10, what="the receivers' counts in serve's /metrics")

        first, _second = _receiver_pids(node.log())
        os.kill(first, signal.SIGKILL)
        extra = generate_series(tmp_path / "after", rows=32, columns=32, slices=5,
                            seed=200).directory
        storescu(extra, "127.0.0.1", port, "MOD", NODE_AET)  # the other one takes it
        assert _indexed(database) == 29
        wait_until(lambda: len(_receiver_pids(node.log())) == 3, timeout=30,
                   what="the killed receiver restarted")
        assert "receiving process exited; restarting" in node.log()
    finally:
        assert node.stop() == 0
