"""`denoised-node serve`: the SCP and completion in this process, workers as child processes.

Workers run in their own processes so that a crash, a CUDA error or an out-of-memory kill in
one of them never takes the SCP down; a dead worker is restarted with a growing delay.
Workers speak sd_notify to a socket of serve's own: READY=1 once the model is loaded,
WATCHDOG=1 while they make progress; one silent for worker.watchdog_seconds is killed and
restarted. serve tells systemd READY=1 when the SCP listens and a worker has its model, and
feeds systemd's watchdog while its own threads run.
SIGTERM (or SIGINT) stops accepting associations, asks the workers to finish or release the
job in hand, and exits.
SIGHUP (`systemctl reload`) reads the config again (reload.py checks it whole): an accepted one
applies to the associations requested from then on, and each worker finishes its job in hand
and restarts with it; a refused one is logged and the running one kept.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.receiver_events import EventReader
from denoised_node.daemon.dicom.receiver_pool import ReceiverPool
from denoised_node.daemon.dicom.rescan import settle_unindexed
from denoised_node.daemon.dicom.scp import ScpCounts, ScpListeners, start_scp
from denoised_node.daemon.dicom.scp_sockets import bind_listeners
from denoised_node.daemon.dicom.tls import server_context
from denoised_node.daemon.jobs.completion import CompletionLoop
from denoised_node.daemon.maintenance import (
    RetentionLoop,
    release_dead_local_leases,
)
from denoised_node.daemon.process.child_process import Check, ChildSlot, node_command, spawn
from denoised_node.daemon.process.sd_notify import (
    Notification,
    NotifyListener,
    sd_notify,
    watchdog_seconds,
)
from denoised_node.daemon.reload import (
    SERVE_SECTIONS,
    ReloadRefused,
    changed_sections,
    load_for_reload,
)
from denoised_node.daemon.web import probes
from denoised_node.daemon.web.endpoint import StatusServer
from denoised_node.daemon.web.health_rows import ConfigState
from denoised_node.daemon.web.metrics import node_registry
from denoised_node.daemon.web.pages import StatusPages
from denoised_node.daemon.web.probes import Readiness
from denoised_node.daemon.web.stow import StowReceiver
from denoised_node.storage.db import is_sqlite
from denoised_node.storage.queue import attempt_limits
from denoised_node.storage.runtime import Runtime, open_runtime

log = logging.getLogger(__name__)

_WORKER_STOP_SECONDS = 60.0
_WORKER_START_SECONDS = 600.0


@dataclass
class _Child(ChildSlot):
    ready: bool = False  # said READY=1: its model is loaded
    last_heard: float = field(default_factory=time.monotonic)


class WorkerPool:
    """Keeps ``count`` worker processes running."""

    def __init__(self, count: int, config_path: Path | None, *, notify_socket: str | None = None,
                 watchdog_seconds: float = 600.0) -> None:
        self.command = node_command("worker", config_path)
        self.children = [_Child(i) for i in range(count)]
        self.notify_socket = notify_socket
        self.watchdog_seconds = watchdog_seconds

    @property
    def ready_count(self) -> int:
        return sum(1 for c in self.children
                   if c.ready and c.process is not None and c.process.poll() is None)

    def notified(self, notifications: list[Notification]) -> None:
        """Take the workers' sd_notify messages: any message proves the sender alive."""
        by_pid = {c.process.pid: c for c in self.children if c.process is not None}
        now = time.monotonic()
        for note in notifications:
            child = by_pid.get(note.pid)
            if child is None:
                continue
            child.last_heard = now
            if note.fields.get("READY") == "1" and not child.ready:
                child.ready = True
                log.info("worker ready", extra={"worker_index": child.index, "pid": note.pid,
                                                "status": note.fields.get("STATUS", "")})

    def wake(self, _jobs: object = None) -> None:
        """A job was queued: wake the idle workers now rather than at their next poll."""
        for child in self.children:
            process = child.process
            if child.ready and process is not None and process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass

    def _hung(self, child: _Child, now: float) -> bool:
        """Silent for worker.watchdog_seconds once ready; before that, loading the model
        (CUDA start-up included) may take up to _WORKER_START_SECONDS."""
        if not self.notify_socket or child.process is None:
            return False
        silent = now - child.last_heard
        if child.ready and silent > self.watchdog_seconds:
            log.error("worker sent no heartbeat for %.0f s; killing it", silent,
                      extra={"worker_index": child.index, "pid": child.process.pid})
            return True
        if not child.ready and silent > max(self.watchdog_seconds, _WORKER_START_SECONDS):
            log.error("worker did not load its model in %.0f s; killing it", silent,
                      extra={"worker_index": child.index, "pid": child.process.pid})
            return True
        return False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def reload(self) -> None:
        """A reloaded config: each worker finishes (or, idle, leaves) its job in hand and is
        started again at once, reading the new config. One at a time would keep a model
        loaded meanwhile, but two models at once may not fit a GPU."""
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None and not child.reloading:
                child.reloading = True
                process.send_signal(signal.SIGTERM)

    def _spawn(self, child: _Child) -> None:
        child.process = spawn(self.command, notify_socket=self.notify_socket)
        child.started_at = child.last_heard = time.monotonic()
        child.ready = False
        log.info("worker process started", extra={"worker_index": child.index,
                                                   "pid": child.process.pid})

    def check(self) -> None:
        now = time.monotonic()
        for child in self.children:
            state = child.check(now, "worker process", "worker_index")
            if state is Check.DUE:
                self._spawn(child)
            elif state is Check.RUNNING and self._hung(child, now):
                # A stuck CUDA call, a deadlock: its lease expires and the job goes back to
                # the queue; the next check restarts it.
                process = child.process
                assert process is not None
                process.kill()
                child.ready = False
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:  # stuck in the kernel or the driver
                    log.error("worker did not exit after SIGKILL; trying again later",
                              extra={"worker_index": child.index, "pid": process.pid})
                    child.last_heard = now

    def stop(self, timeout: float = _WORKER_STOP_SECONDS) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for child in self.children:
            process = child.process
            if process in running and process is not None and not child.reloading:
                process.send_signal(signal.SIGTERM)  # a reloading one had its SIGTERM
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A second SIGTERM makes the worker release its job and exit at once.
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()


class SystemdLink:
    """What serve tells systemd: READY=1 once the SCP listens and a worker has its model
    loaded (at once when worker.count = 0), WATCHDOG=1 while serve's own threads run."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.announced = False
        self.watchdog = watchdog_seconds()
        self._starving = False

    @property
    def interval(self) -> float:
        return min(1.0, self.watchdog / 4) if self.watchdog else 1.0

    def tick(self, ready_workers: int, healthy: bool, status: str) -> bool:
        """Returns True the moment the node becomes ready."""
        became_ready = False
        if not self.announced and (ready_workers > 0 or self.workers == 0):
            self.announced = became_ready = True
            sd_notify(f"READY=1\nSTATUS={status}")
        if self.watchdog:
            if healthy:
                sd_notify("WATCHDOG=1")
            elif not self._starving:
                log.error("an SCP or completion thread stopped; no longer feeding the systemd "
                          "watchdog, so systemd restarts the node")
            self._starving = not healthy
        return became_ready


def serve(settings: Settings, config_path: Path | None,
          ready: threading.Event | None = None) -> int:
    runtime = open_runtime(settings, initialise_empty=True)
    runtime.store.clean_incoming()
    # Indexes again what a crash left unindexed: synced commits, like every other writer here.
    rescanner = Receiver(runtime.store, runtime.sessions, settings)
    settle_unindexed(rescanner, timedelta(0))
    release_dead_local_leases(runtime.sessions, attempt_limits(settings))
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    reload_requested = threading.Event()
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reload_requested.set())
    config_state = ConfigState.started()

    listener = NotifyListener()
    pool = WorkerPool(settings.worker.count, config_path, notify_socket=listener.name,
                      watchdog_seconds=settings.worker.watchdog_seconds)
    registry, scp_counts = node_registry(runtime.sessions, postgres=not is_sqlite(runtime.engine),
                                         gauges={
        "workers_ready": ("Local worker processes with the model loaded",
                          lambda: float(pool.ready_count)),
        "disk_free_bytes": ("Free space where node.data_dir is",
                            lambda: float(runtime.store.free_bytes())),
        "config_loaded_timestamp_seconds": ("When the running config was loaded (Unix time)",
                                            lambda: config_state.loaded_at),
        "config_last_reload_successful": (("1: the last reload was accepted (or none "
                                           "asked); 0: refused, the old config runs"),
                                          lambda: float(config_state.last_reload_ok)),
    })
    completion = CompletionLoop(runtime.sessions, settings.series, attempt_limits(settings),
                                on_queued=pool.wake)
    server = _start_receiving(settings, config_path, runtime, scp_counts, completion.poke)
    http: StatusServer | None = None
    pages: StatusPages | None = None
    stow: StowReceiver | None = None
    retention = RetentionLoop(rescanner, settings.retention)
    try:
        if settings.http.enabled:
            readiness = Readiness([
                ("database", probes.database(runtime.engine)),
                ("model", probes.model_loaded(lambda: pool.ready_count, settings.worker.count)),
                ("disk", probes.disk(runtime.store, settings.node.min_free_mb)),
                ("scp", probes.listening(server.alive, "storage SCP")),
            ])
            pages = StatusPages(settings, runtime.sessions, runtime.store, readiness,
                                config_state=config_state)
            stow = _stow_receiver(settings, runtime, scp_counts, completion.poke)
            http = StatusServer(settings.http, registry, readiness, pages, stow).start()
    except BaseException:
        server.stop()
        raise
    completion.start()
    retention.start()
    pool.start()
    if ready is not None:
        ready.set()
    systemd = SystemdLink(settings.worker.count)
    try:
        while not stop.wait(systemd.interval):
            if reload_requested.is_set():
                reload_requested.clear()
                settings = _reload(settings, config_path, config_state, _Reloadable(
                    server, completion, pool, pages, stow), tell_systemd=systemd.announced)
            pool.notified(listener.receive())
            pool.check()
            server.check()
            status = f"{pool.ready_count} of {settings.worker.count} worker(s) ready"
            if systemd.tick(pool.ready_count, server.alive() and completion.is_alive(), status):
                log.info("node ready", extra={"ae_title": settings.node.ae_title,
                                              "workers": settings.worker.count,
                                              "data_dir": str(settings.node.data_dir)})
    finally:
        sd_notify("STOPPING=1")
        server.stop()  # no new associations; the ones in progress finish first
        completion.stop()
        retention.stop()
        pool.stop()
        completion.join(timeout=5)
        if http is not None:
            http.shutdown()
        listener.close()
        runtime.engine.dispose()
        log.info("node stopped")
    return 0


@dataclass(frozen=True)
class _Reloadable:
    """What an accepted config is handed to in serve."""

    receiving: _Receiving
    completion: CompletionLoop
    workers: WorkerPool
    pages: StatusPages | None
    stow: StowReceiver | None = None


def _reload(running: Settings, config_path: Path | None, state: ConfigState,
            parts: _Reloadable, *, tell_systemd: bool = True) -> Settings:
    """Read and check the config again; apply it, or log why not. Returns the config in
    force. systemd waits between RELOADING=1 and READY=1 (`systemctl reload` returns then);
    before the node's first READY=1 (``tell_systemd`` false) it is told nothing."""
    notify = sd_notify if tell_systemd else (lambda _message: False)
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        new = load_for_reload(running, config_path)
    except ReloadRefused as exc:
        state.refused(str(exc))
        log.error("config reload refused; the running config stays: %s", exc,
                  extra={"config": str(config_path)})
        notify("READY=1\nSTATUS=config reload refused")
        return running
    changed = changed_sections(running, new)
    parts.receiving.reload(new)
    parts.completion.settings = new.series
    parts.completion.attempt_limits = attempt_limits(new)
    if parts.pages is not None:
        parts.pages.reconfigure(new)
    if parts.stow is not None:
        parts.stow.receiver.settings = new  # as the SCP's receiver: the next request on
    if changed - SERVE_SECTIONS:
        parts.workers.reload()
    state.accepted()
    log.info("config reloaded", extra={"config": str(config_path),
                                       "changed": " ".join(sorted(changed)) or "nothing"})
    notify("READY=1\nSTATUS=config reloaded")
    return new


class _Receiving(Protocol):
    def alive(self) -> bool: ...

    def check(self) -> None: ...

    def reload(self, settings: Settings) -> None: ...

    def stop(self) -> None: ...


class _InProcess:
    """The storage SCP on serve's own threads (node.receive_processes = 1)."""

    def __init__(self, listeners: ScpListeners, receiver: Receiver) -> None:
        self.listeners = listeners
        self.receiver = receiver

    def reload(self, settings: Settings) -> None:
        self.listeners.reconfigure(settings)
        self.receiver.settings = settings

    def alive(self) -> bool:
        return self.listeners.alive()

    def check(self) -> None:
        pass  # a stopped SCP thread starves systemd's watchdog, which restarts the node

    def stop(self) -> None:
        self.listeners.shutdown()


def _stow_receiver(settings: Settings, runtime: Runtime, counts: ScpCounts,
                   on_activity: Callable[[], None]) -> StowReceiver | None:
    """The STOW-RS receiver (http.stow_rs): the same receive path as the SCP's, in serve."""
    if not settings.http.stow_rs:
        return None
    receiver = Receiver.for_node(runtime)
    receiver.on_activity = on_activity
    return StowReceiver(receiver, settings.http.max_stow_mb * 2**20, counts)


def _start_receiving(settings: Settings, config_path: Path | None, runtime: Runtime,
                     counts: ScpCounts, on_activity: Callable[[], None]) -> _Receiving:
    processes = settings.node.receive_processes
    if processes == 1:
        receiver = Receiver.for_node(runtime)
        receiver.on_activity = on_activity
        return _InProcess(start_scp(settings, receiver, counts), receiver)
    if settings.tls.enabled:
        server_context(settings.tls)  # a bad certificate stops serve, not each receiver
    sockets = bind_listeners(settings)
    log.info("storage SCP listening in %d processes", processes, extra={
        "ae_title": settings.node.ae_title, "host": settings.node.host,
        "ports": " ".join(str(s.getsockname()[1]) for s in sockets.values())})
    return ReceiverPool(processes, config_path, sockets,
                        EventReader(counts, on_activity)).start()
