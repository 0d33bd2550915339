"""`denoised-node serve` as systemd sees it, without systemd: the test listens on the
NOTIFY_SOCKET it gives the node, and checks READY=1 (SCP listening and a worker with its
model loaded), WATCHDOG=1, the restart of a hung worker, /healthz and /readyz, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from denoised_node.daemon.process.sd_notify import Notification, NotifyListener
from tests.integration.node import NODE_AET, node_config
from tests.integration.peers import ManagedProcess, echoscu, free_port, port_open, wait_until

pytestmark = pytest.mark.slow


class Notifications:
    """The test's end of the node's NOTIFY_SOCKET: keeps every message received."""

    def __init__(self) -> None:
        self.listener = NotifyListener()
        self.seen: list[Notification] = []

    def poll(self) -> list[Notification]:
        self.seen += self.listener.receive()
        return self.seen

    def count(self, key: str, pid: int | None = None) -> int:
        return sum(1 for n in self.poll() if key in n.fields and (pid is None or n.pid == pid))


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie is gone for our purpose


@pytest.fixture
def service(tmp_path: Path, notifications: Notifications) -> Iterator[tuple[ManagedProcess, int,
                                                                             int]]:
    node_port, http_port = free_port(), free_port()
    config = node_config(tmp_path, node_port, None,
                         http={"enabled": True, "port": http_port},
                         worker={"count": 1, "watchdog_seconds": 6, "poll_seconds": 0.2})
    env = {key: value for key, value in os.environ.items() if not key.startswith("DENOISED_NODE")}
    env.update(NOTIFY_SOCKET=notifications.listener.name, WATCHDOG_USEC="2000000")
    process = ManagedProcess.start(
        [sys.executable, "-m", "denoised_node.daemon.cli.main", "serve", "--config", str(config)],
        log=tmp_path / "node.log", env=env, cwd=tmp_path)
    yield process, node_port, http_port
    process.stop(timeout=90)


def test_ready_watchdog_hung_worker_and_sigterm(service: Any, notifications: Notifications) -> None:
    process, node_port, http_port = service
    pid = process.pid
    wait_until(lambda: process.check_alive() and notifications.count("READY", pid) == 1,
               timeout=180, what="READY=1 from serve")
    # READY=1 comes after the SCP listens and a worker has loaded its model.
    assert echoscu("127.0.0.1", node_port, NODE_AET)
    status, body = http_get(http_port, "/readyz")
    assert status == 200, body
    checks = json.loads(body)["checks"]
    assert set(checks) == {"database", "model", "disk", "scp"}
    assert checks["model"]["detail"].startswith("1 of 1 worker(s)")
    assert http_get(http_port, "/healthz") == (200, "ok\n")
    assert http_get(http_port, "/nothing")[0] == 404
    beats = notifications.count("WATCHDOG", pid)
    wait_until(lambda: notifications.count("WATCHDOG", pid) >= beats + 3, timeout=10,
               what="WATCHDOG=1 every half period")

    # A worker that stops making progress is killed and replaced; serve stays up.
    (worker,) = children(pid)
    os.kill(worker, signal.SIGSTOP)
    wait_until(lambda: notifications.poll() and not _alive(worker), timeout=30,
               what="the hung worker killed")
    assert http_get(http_port, "/readyz")[0] == 503  # no worker with a model, for now
    wait_until(
        lambda: (
            notifications.poll()
            and len(children(pid)) == 1
            and children(pid)[0] != worker
            and http_get(http_port, "/readyz")[0] == 200
        ),
        timeout=180,
        what="a new worker ready",
    )
    assert "worker sent no heartbeat" in process.log_tail(200)
    assert notifications.count("READY", pid) == 1  # serve itself was never restarted

    (replacement,) = children(pid)
    process.popen.send_signal(signal.SIGTERM)
    assert process.popen.wait(90) == 0
    assert notifications.count("STOPPING", pid) == 1
    assert not port_open(node_port) and not port_open(http_port)
    assert not _alive(replacement)
    assert "node stopped" in process.log_tail(50)


def test_sigterm_finishes_or_releases_the_job_in_hand(tmp_path: Path, mr_series_factory: Any,
                                                      notifications: Notifications) -> None:
    node_port = free_port()
    config = node_config(tmp_path, node_port, None, series={"idle_seconds": 1},
                         send={"max_attempts": 50})
    env = {key: value for key, value in os.environ.items() if not key.startswith("DENOISED_NODE")}
    env.update(NOTIFY_SOCKET=notifications.listener.name)
    process = ManagedProcess.start(
        [sys.executable, "-m", "denoised_node.daemon.cli.main", "serve", "--config", str(config)],
        log=tmp_path / "node.log", env=env, cwd=tmp_path)
    try:
        wait_until(lambda: process.check_alive() and notifications.count("READY") == 1,
                   timeout=180, what="READY=1 from serve")
        series = mr_series_factory(slices=24, rows=192, columns=192)
        from tests.integration.peers import storescu

        storescu(series.directory, "127.0.0.1", node_port, "MODALITY", NODE_AET)
        log = tmp_path / "node.log"
        wait_until(lambda: "denoising series" in log.read_text(), timeout=60,
                   what="a job in hand")
        started = time.monotonic()
        process.popen.send_signal(signal.SIGTERM)
        # No new associations at once, while the worker still finishes the job in hand.
        wait_until(lambda: not port_open(node_port), timeout=10, what="the SCP port closed")
        assert process.popen.poll() is None
        assert process.popen.wait(120) == 0
        assert time.monotonic() - started < 110
    finally:
        process.stop(timeout=30)
    from tests.integration.node import Node

    jobs = Node(config, node_port, process).jobs()
    assert len(jobs) == 1
    # Finished (processed, then a send that failed: no PACS here) or given back: never left
    # in a stage with a lease that only its expiry would release.
    assert jobs[0]["state"] in {"queued", "processed", "done", "failed"}, jobs[0]
    text = log.read_text()
    assert "stop requested; finishing the job in hand" in text
    assert "node stopped" in text
