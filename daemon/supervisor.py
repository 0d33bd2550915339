"""`denoised-node serve`: the SCP and completion in this process, workers as child processes.

Workers run in their own processes so that a crash, a CUDA error or an out-of-memory kill in
one of them never takes the SCP down; a dead worker is restarted with a growing delay.
SIGTERM (or SIGINT) stops accepting associations, asks the workers to finish or release the
job in hand, and exits.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from denoised_node.config.settings import Settings
from denoised_node.daemon.completion import CompletionLoop
from denoised_node.daemon.maintenance import RetentionLoop, release_dead_local_leases
from denoised_node.daemon.receive import Receiver
from denoised_node.daemon.runtime import open_runtime
from denoised_node.daemon.scp import start_scp

log = logging.getLogger(__name__)

_RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 60.0)
_WORKER_STOP_SECONDS = 60.0


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    failures: int = 0
    restart_at: float = 0.0
    started_at: float = field(default_factory=time.monotonic)


class WorkerPool:
    """Keeps ``count`` worker processes running."""

    def __init__(self, count: int, config_path: Path | None) -> None:
        self.command = [sys.executable, "-m", "denoised_node.daemon.cli", "worker"]
        if config_path is not None:
            self.command += ["--config", str(config_path)]
        self.children = [_Child(i) for i in range(count)]

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: _Child) -> None:
        child.process = subprocess.Popen(self.command, preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        log.info("worker process started", extra={"worker_index": child.index,
                                                   "pid": child.process.pid})

    def check(self) -> None:
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None:
                if now - child.started_at > 300:
                    child.failures = 0  # it has been healthy for a while
                continue
            if process is not None:
                child.failures += 1
                delay = _RESTART_DELAYS[min(child.failures, len(_RESTART_DELAYS)) - 1]
                child.restart_at = now + delay
                log.error("worker process exited; restarting in %.0f s", delay,
                          extra={"worker_index": child.index, "pid": process.pid,
                                 "exit_status": process.returncode})
                child.process = None
            elif now >= child.restart_at:
                self._spawn(child)

    def stop(self, timeout: float = _WORKER_STOP_SECONDS) -> None:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
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


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when `serve` dies, even by
    SIGKILL, so no orphaned worker keeps claiming jobs (it finishes the job in hand)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(settings: Settings, config_path: Path | None,
          ready: threading.Event | None = None) -> int:
    runtime = open_runtime(settings, initialise_empty=True)
    runtime.store.clean_incoming()
    release_dead_local_leases(runtime.sessions)
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    receiver = Receiver(runtime.store, runtime.sessions, settings)
    server = start_scp(settings, receiver)
    completion = CompletionLoop(runtime.sessions, settings.series)
    completion.start()
    retention = RetentionLoop(runtime.sessions, runtime.store, settings.retention)
    retention.start()
    pool = WorkerPool(settings.worker.count, config_path)
    pool.start()
    if ready is not None:
        ready.set()
    log.info("node ready", extra={"ae_title": settings.node.ae_title,
                                  "workers": settings.worker.count,
                                  "data_dir": str(settings.node.data_dir)})
    try:
        while not stop.wait(1.0):
            pool.check()
    finally:
        server.shutdown()  # no new associations; the ones in progress finish first
        completion.stop()
        retention.stop()
        pool.stop()
        completion.join(timeout=5)
        runtime.engine.dispose()
        log.info("node stopped")
    return 0
