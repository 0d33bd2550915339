"""Idle at zero: completion waits for what is due or for the receiver's poke, the worker's
wait for work backs off and is ended by a signal."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.jobs.completion import CompletionLoop, next_due
from denoised_node.daemon.jobs.worker import Waker, Worker
from denoised_node.storage.models import Job, Series, utcnow
from denoised_node.storage.queue import attempt_limits
from denoised_node.storage.runtime import Runtime

MR = "1.2.840.10008.5.1.4.1.1.4"


def _receive(runtime: Runtime, paths: Sequence[Path]) -> Receiver:
    receiver = Receiver(runtime.store, runtime.sessions, runtime.settings)
    for path in paths:
        receiver.receive(path.read_bytes(), MR, "MOD")
    return receiver


def test_nothing_due_on_an_empty_node(runtime: Runtime) -> None:
    assert next_due(runtime.sessions, runtime.settings.series, utcnow()) is None


def test_due_when_a_receiving_series_may_complete(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    _receive(runtime, mr_series.paths)
    with runtime.sessions() as session:
        last = session.scalars(select(Series)).one().last_received_at
    due = next_due(runtime.sessions, runtime.settings.series, utcnow())
    assert due == last + timedelta(seconds=runtime.settings.series.idle_seconds)


def test_a_released_series_is_due_after_its_grace(runtime: Runtime, mr_series) -> None:  # type: ignore[no-untyped-def]
    from collections import Counter

    receiver = _receive(runtime, mr_series.paths)
    with runtime.sessions() as session:
        series_id = session.scalars(select(Series.id)).one()
    receiver.mark_released(Counter({series_id: len(mr_series.paths)}))
    now = utcnow()
    due = next_due(runtime.sessions, runtime.settings.series, now)
    assert (
        due is not None
        and (due - now).total_seconds() <= runtime.settings.series.released_grace_seconds
    )
    # once the grace has passed (the series was not gap-free), the idle time decides
    later = now + timedelta(seconds=5)
    assert next_due(runtime.sessions, runtime.settings.series, later) > later  # type: ignore[operator]


def test_completion_sleeps_until_poked_then_queues(settings_factory, mr_series) -> None:  # type: ignore[no-untyped-def]
    from denoised_node.storage.db import make_engine
    from denoised_node.storage.runtime import open_runtime
    from denoised_node.storage.schema import upgrade

    settings = settings_factory(series__idle_seconds=0)
    upgrade(make_engine(settings.database_url))
    runtime = open_runtime(settings)
    queued: list[list[int]] = []
    loop = CompletionLoop(runtime.sessions, settings.series, attempt_limits(settings),
                          interval=0.05, idle_wait=60.0,
                          on_queued=queued.append)
    loop.start()
    try:
        time.sleep(0.3)  # the first pass finds nothing and sleeps for idle_wait
        receiver = _receive(runtime, mr_series.paths)
        receiver.on_activity = loop.poke
        receiver.on_activity()
        deadline = time.monotonic() + 5
        while not queued and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
        loop.join(5)
    assert len(queued) == 1 and len(queued[0]) == 1, "a poke did not wake completion"


def test_the_worker_backs_off_when_idle_but_not_past_a_due_retry(runtime: Runtime,
                                                                 fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(runtime.settings, runtime.sessions, runtime.store, fake_denoiser,
                    worker_id="w")
    waits = [worker._idle_wait(n) for n in range(6)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_a_signal_ends_the_idle_wait() -> None:
    waker = Waker()
    previous = signal.signal(signal.SIGUSR1, lambda _s, _f: waker.wake())
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        started = time.monotonic()
        assert waker.wait(10.0)
        assert time.monotonic() - started < 5
        assert not waker.wait(0.05)  # drained: one wake-up, one early return
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_stop_request_ends_the_idle_wait_at_once(runtime: Runtime, fake_denoiser) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(runtime.settings, runtime.sessions, runtime.store, fake_denoiser,
                    worker_id="w")
    threading.Timer(0.3, worker.request_stop).start()
    started = time.monotonic()
    worker.run()
    assert time.monotonic() - started < 3
    with runtime.sessions() as session:
        assert session.scalars(select(Job)).all() == []


def test_an_idle_scp_does_not_collect_garbage(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import gc

    from denoised_node.daemon.dicom import connection_guard

    collected: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(1) or 0)
    server = object.__new__(connection_guard.GuardedAssociationServer)
    server._served, server._passes = False, 0
    for _ in range(200):  # 100 s of pynetdicom's 0.5 s accept loop with nobody calling
        server.service_actions()
    assert collected == []
    server._served = True  # a connection was served: its dead threads are collected
    for _ in range(60):
        server.service_actions()
    assert collected == [1]
