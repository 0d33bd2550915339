"""What a receiving process tells `serve` (node.receive_processes > 1): the SCP's counts
for /metrics and "something arrived" for series completion.

One short line per event on a pipe all receiving processes share; a line is shorter than
PIPE_BUF, so lines of several processes never interleave. A receiver never waits on the
pipe: when serve is slow to read, the event is dropped (a count is lost; completion still
looks on its own timer), never an image.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from denoised_node.daemon.dicom.scp import ScpCounts

log = logging.getLogger(__name__)

_INSTANCE, _ASSOCIATION, _ACTIVITY, _STOP = "i", "a", "w", "q"


class EventWriter:
    """A receiving process's ScpCounts, and its Receiver.on_activity."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self.dropped = 0

    def instance(self, outcome: str, size: int = 0) -> None:
        self._write(f"{_INSTANCE} {outcome} {int(size)}\n")

    def association(self, result: str, transport: str) -> None:
        self._write(f"{_ASSOCIATION} {result} {transport}\n")

    def activity(self) -> None:
        self._write(f"{_ACTIVITY}\n")

    def _write(self, line: str) -> None:
        try:
            os.write(self._fd, line.encode())
        except BlockingIOError:
            self.dropped += 1
        except BrokenPipeError:
            pass  # serve is gone; its death signal stops this process next


class EventReader:
    """serve's side: applies every process's events to its counts, on its own thread."""

    def __init__(self, counts: ScpCounts, on_activity: Callable[[], None]) -> None:
        self._read_fd, self.write_fd = os.pipe()
        os.set_inheritable(self.write_fd, True)
        self._counts = counts
        self._on_activity = on_activity
        self._thread = threading.Thread(target=self._run, name="receiver-events", daemon=True)

    def start(self) -> EventReader:
        self._thread.start()
        return self

    def stop(self) -> None:
        os.write(self.write_fd, f"{_STOP}\n".encode())
        self._thread.join(timeout=5)
        os.close(self.write_fd)
        os.close(self._read_fd)

    def _run(self) -> None:
        pending = b""
        while chunk := os.read(self._read_fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if not self.apply(lines):
                return

    def apply(self, lines: list[bytes]) -> bool:
        """Apply whole lines; False once told to stop."""
        active = False
        for raw in lines:
            kind, *fields = raw.decode(errors="replace").split(" ")
            try:
                if kind == _INSTANCE:
                    self._counts.instance(fields[0], int(fields[1]))
                    active = True
                elif kind == _ASSOCIATION:
                    self._counts.association(fields[0], fields[1])
                elif kind == _ACTIVITY:
                    active = True
                elif kind == _STOP:
                    return False
            except (IndexError, ValueError):
                log.warning("unreadable event from a receiving process",
                            extra={"event": raw[:80].decode(errors="replace")})
        if active:
            self._on_activity()
        return True
