"""Several receiving processes (node.receive_processes > 1): each runs the storage SCP on
the listening sockets serve bound (scp_sockets.py), with its own interpreter and database
connection, so that associations arriving together are received in parallel instead of
taking turns for one interpreter.

serve keeps the sockets, so a receiver that dies loses no connection (the kernel queues
them until another accepts) and is restarted with a growing delay. SIGTERM stops a
receiver accepting; it finishes the associations in progress, then exits.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from pathlib import Path

from denoised_node.daemon.dicom.receiver_events import EventReader
from denoised_node.daemon.process.child_process import Check, ChildSlot, node_command, spawn

log = logging.getLogger(__name__)

# A receiver finishes its associations within this on SIGTERM (receiver_process.py).
FINISH_SECONDS = 30.0


class ReceiverPool:
    """Keeps ``count`` receiving processes running on ``sockets``."""

    def __init__(self, count: int, config_path: Path | None,
                 sockets: dict[str, socket.socket], events: EventReader) -> None:
        self.sockets = sockets
        self.events = events
        fds = [f"{transport}={listening.fileno()}" for transport, listening in sockets.items()]
        self.command = node_command("receiver", config_path,
                                    *[option for fd in fds for option in ("--listen", fd)],
                                    "--events-fd", str(events.write_fd),
                                    "--processes", str(count))
        self.receivers = [ChildSlot(i) for i in range(count)]
        self.draining: list[subprocess.Popen[bytes]] = []  # replaced, finishing associations

    def start(self) -> ReceiverPool:
        self.events.start()
        for receiver in self.receivers:
            self._spawn(receiver)
        return self

    def alive(self) -> bool:
        """Receiving: at least one receiver runs (the others are being restarted)."""
        return any(r.process is not None and r.process.poll() is None for r in self.receivers)

    def _spawn(self, receiver: ChildSlot) -> None:
        fds = [listening.fileno() for listening in self.sockets.values()]
        receiver.process = spawn(self.command, pass_fds=[*fds, self.events.write_fd])
        receiver.started_at = time.monotonic()
        log.info("receiving process started", extra={"receiver_index": receiver.index,
                                                     "pid": receiver.process.pid})

    def check(self) -> None:
        now = time.monotonic()
        for receiver in self.receivers:
            if receiver.check(now, "receiving process", "receiver_index") is Check.DUE:
                self._spawn(receiver)
        self.draining = [p for p in self.draining if p.poll() is None]

    def reload(self, _settings: object) -> None:
        """A reloaded config (the new processes read it from the file): start a new receiver
        beside each running one at once, and ask the old one to stop accepting and finish its
        associations (nothing is dropped, and the sockets always have a process accepting)."""
        for receiver in self.receivers:
            old = receiver.process
            if old is None or old.poll() is not None:
                continue  # its restart reads the new config anyway
            self._spawn(receiver)
            old.send_signal(signal.SIGTERM)
            self.draining.append(old)

    def stop(self) -> None:
        """Stop accepting; wait for the associations in progress; close the sockets."""
        running = [r.process for r in self.receivers
                   if r.process is not None and r.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        running += self.draining  # told to stop already
        deadline = time.monotonic() + FINISH_SECONDS + 10
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        for listening in self.sockets.values():
            listening.close()
        self.events.stop()
