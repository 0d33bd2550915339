"""The sd_notify protocol, both ends, without a dependency.

A process tells whoever started it that it is ready (``READY=1``) and alive (``WATCHDOG=1``)
with one datagram to ``$NOTIFY_SOCKET``. systemd listens there for `serve`; `serve` listens
on a socket of its own for its worker processes (``NotifyListener``), so a worker speaks
the same protocol under `serve` as under a unit of its own on another host.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
_UCRED = struct.Struct("3i")  # pid, uid, gid


def _address(text: str) -> str:
    return "\0" + text[1:] if text.startswith("@") else text  # "@name": the abstract namespace


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. "READY=1") to $NOTIFY_SOCKET; False when there is none or the
    send failed (never raises: a missing supervisor must not stop the work)."""
    target = (os.environ if environ is None else environ).get(NOTIFY_SOCKET)
    if not target:
        return False
    try:
        # Non-blocking: with the listener's queue full (it holds 10 datagrams), a heartbeat
        # is better dropped than waited for.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                           | socket.SOCK_NONBLOCK) as sock:
            sock.connect(_address(target))
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False
    return True


def watchdog_seconds(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period systemd asks this process to keep (WatchdogSec=), or None."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 or None
    except ValueError:
        return None


class Heartbeat:
    """READY=1 once, WATCHDOG=1 at most every ``min_interval`` seconds."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self.min_interval = min_interval
        self._last = float("-inf")

    def ready(self, status: str = "") -> None:
        sd_notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last = time.monotonic()

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            sd_notify("WATCHDOG=1")

    def stopping(self) -> None:
        sd_notify("STOPPING=1")


@dataclass(frozen=True)
class Notification:
    pid: int
    fields: dict[str, str]


class NotifyListener:
    """A notify socket in the abstract namespace; each message comes with the sender's pid
    from the kernel (SO_PASSCRED), so a child cannot speak for another."""

    def __init__(self) -> None:
        self.name = f"@denoised-node-{os.getpid()}-{secrets.token_hex(6)}"
        self._sock = socket.socket(socket.AF_UNIX,
                                   socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(_address(self.name))

    def receive(self) -> list[Notification]:
        """Every message waiting now (never blocks)."""
        received: list[Notification] = []
        while True:
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return received
            pid = next((_UCRED.unpack(cdata[:_UCRED.size])[0]
                        for level, kind, cdata in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines()
                          if "=" in line)
            received.append(Notification(pid, fields))

    def close(self) -> None:
        self._sock.close()
