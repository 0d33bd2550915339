"""One receiving process (`denoised-node receiver`, started by serve when
node.receive_processes > 1; see receiver_pool.py): the storage SCP on inherited sockets."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

from denoised_node.config.settings import Settings
from denoised_node.daemon.dicom.receive import Receiver
from denoised_node.daemon.dicom.receiver_events import EventWriter
from denoised_node.daemon.dicom.receiver_pool import FINISH_SECONDS
from denoised_node.daemon.dicom.scp import start_scp
from denoised_node.storage.runtime import open_runtime

log = logging.getLogger(__name__)


def inherited_sockets(listen: list[str]) -> dict[str, socket.socket]:
    """``transport=fd`` pairs, as serve passes them, as sockets."""
    sockets = {}
    for pair in listen:
        transport, _, fd = pair.partition("=")
        listening = socket.socket(fileno=int(fd))
        listening.setblocking(False)
        sockets[transport] = listening
    return sockets


def run_receiver(settings: Settings, sockets: dict[str, socket.socket], events_fd: int,
                 shared: bool) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    runtime = open_runtime(settings)
    events = EventWriter(events_fd)
    receiver = Receiver.for_node(runtime)
    receiver.on_activity = events.activity
    listeners = start_scp(settings, receiver, events, sockets, shared=shared)
    try:
        while not stop.wait(1.0):
            if not listeners.alive():
                log.error("a storage SCP thread stopped; exiting so that serve restarts "
                          "this receiving process")
                return 1
    finally:
        listeners.shutdown()
        _finish(listeners.associations())
        runtime.engine.dispose()
    return 0


def _finish(associations: list[Any]) -> None:
    """Let the associations in progress end (their instances acknowledged or refused)."""
    deadline = time.monotonic() + FINISH_SECONDS
    for association in associations:
        association.join(max(0.0, deadline - time.monotonic()))
