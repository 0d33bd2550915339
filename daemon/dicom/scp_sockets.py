"""The SCP's listening sockets: bound once by `serve`, before any receiving starts, and
shared by every process that receives (node.receive_processes).

Binding in one place keeps one port one node's: a second node on the same port fails to
start (EADDRINUSE) as it always did, which SO_REUSEPORT would have let pass silently. The
receiving processes inherit the sockets and all accept from the same queue; each socket
is non-blocking, so the processes that lose the race for a connection go back to waiting.
"""

from __future__ import annotations

import errno
import socket

from denoised_node.config.settings import ConfigError, Settings

PLAIN, TLS = "plain", "tls"
# Connections the kernel queues before a receiver accepts them: a modality opening several
# associations at once, and connections that arrive while a receiving process restarts.
_BACKLOG = 64


def planned_ports(settings: Settings) -> list[tuple[str, int]]:
    """(transport, port) for each listener the settings ask for."""
    plan: list[tuple[str, int]] = []
    if settings.tls.plain_port:
        plan.append((PLAIN, settings.node.port))
    if settings.tls.enabled:
        plan.append((TLS, settings.tls.port))
    return plan


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """A listening, non-blocking socket per transport; a ConfigError naming the key when a
    port cannot be had."""
    host = settings.node.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: dict[str, socket.socket] = {}
    try:
        for transport, port in planned_ports(settings):
            key = "tls.port" if transport == TLS else "node.port"
            try:
                listening = socket.create_server((host, port), family=family, backlog=_BACKLOG)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    raise ConfigError(f"cannot listen on {host}:{port} ({key}): "
                                      f"{exc.strerror}; choose another {key} or node.host"
                                      ) from None
                raise
            listening.setblocking(False)
            sockets[transport] = listening
    except BaseException:
        for listening in sockets.values():
            listening.close()
        raise
    return sockets
