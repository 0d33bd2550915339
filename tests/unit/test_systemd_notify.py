"""The sd_notify protocol both ways, what serve tells systemd, and the worker pool's watchdog,
with stand-in processes instead of real workers."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest

from denoised_node.daemon.process.sd_notify import (
    Heartbeat,
    Notification,
    NotifyListener,
    sd_notify,
    watchdog_seconds,
)
from denoised_node.daemon.supervisor import SystemdLink, WorkerPool


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    box = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", box.name)
    yield box
    box.close()


def _fields(listener: NotifyListener) -> list[dict[str, str]]:
    time.sleep(0.05)
    return [n.fields for n in listener.receive()]


def test_sd_notify_reaches_the_listener_with_the_senders_pid(listener: NotifyListener) -> None:
    assert sd_notify("READY=1\nSTATUS=loaded")
    (note,) = listener.receive()
    assert note == Notification(os.getpid(), {"READY": "1", "STATUS": "loaded"})
    assert not sd_notify("READY=1", environ={})  # no supervisor: nothing, no error
    assert not sd_notify("READY=1", environ={"NOTIFY_SOCKET": "@nobody-listens-here"})


def test_heartbeat_is_rate_limited(listener: NotifyListener) -> None:
    beat = Heartbeat(min_interval=60)
    beat.ready("model x loaded")
    for _ in range(5):
        beat.beat()  # within the interval of READY=1: dropped
    assert _fields(listener) == [{"READY": "1", "STATUS": "model x loaded"}]
    Heartbeat(min_interval=0).beat()
    assert _fields(listener) == [{"WATCHDOG": "1"}]


def test_watchdog_period_is_systemds_for_this_process_only() -> None:
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000",
                             "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_seconds({}) is None


def test_serve_is_ready_with_a_worker_and_feeds_the_watchdog_while_healthy(
        listener: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    link = SystemdLink(workers=1)
    assert link.interval == 0.5
    assert not link.tick(ready_workers=0, healthy=True, status="0 of 1")
    assert _fields(listener) == [{"WATCHDOG": "1"}]
    assert link.tick(ready_workers=1, healthy=True, status="1 of 1")
    assert _fields(listener) == [{"READY": "1", "STATUS": "1 of 1"}, {"WATCHDOG": "1"}]
    assert not link.tick(ready_workers=1, healthy=False, status="1 of 1")
    assert _fields(listener) == []  # a stopped thread: systemd's watchdog will fire
    assert SystemdLink(workers=0).tick(ready_workers=0, healthy=True, status="")


def test_pool_kills_a_silent_worker_and_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = WorkerPool(1, None, notify_socket="@test-pool", watchdog_seconds=0.3)
    pool.command = [sys.executable, "-c", "import time; time.sleep(60)"]  # a worker stand-in
    pool.start()
    try:
        (child,) = pool.children
        first = child.process
        assert first is not None and pool.ready_count == 0
        pool.notified([Notification(first.pid, {"READY": "1"}),
                       Notification(12345678, {"READY": "1"})])  # not a child: ignored
        assert pool.ready_count == 1
        pool.check()
        assert first.poll() is None  # heard from just now
        time.sleep(0.5)
        pool.check()  # silent for longer than watchdog_seconds: killed
        assert first.poll() is not None and pool.ready_count == 0
        pool.check()  # its exit noticed; restart in 1 s
        deadline = time.monotonic() + 5
        while child.process is None and time.monotonic() < deadline:
            time.sleep(0.1)
            pool.check()
        assert child.process is not None and child.process.pid != first.pid
        assert child.process.poll() is None
    finally:
        pool.stop(timeout=2)
