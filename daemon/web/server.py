"""waitress serving the HTTP endpoint, with the node's connection policy.

waitress answers every connection from one event loop and runs requests on a few threads, so
an idle connection holds a descriptor, never a thread. The policy bounds the descriptors so
that a flood of connections never takes those the DICOM side needs, and keeps the probes
answering through one:

- a connection silent for ``idle_seconds`` with no request in progress is closed (half a
  request line counts as silent);
- at most ``max_connections`` connections are open; past that, the one silent longest with no
  request in progress is closed to make room (a probe sends its request at once, an idle
  flood does not), and when every one has a request in progress the new connection is
  answered 503 at once and closed. waitress's own connection_limit would stop accepting
  instead, leaving a probe waiting in the listen backlog until it times out.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

log = logging.getLogger(__name__)

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 21\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
         b"too many connections\n")
_SHED_LOG_SECONDS = 10.0  # at most one line per this long about closed connections


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port): IPv6 for a host with a colon, IPv4 otherwise.

    Bound here rather than by waitress, which would resolve a name to every address it has
    (each on its own port when the port is 0) and make "::" IPv6-only.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _RoutineAtDebug(logging.LoggerAdapter):
    """A channel logs one thing at INFO: a client that went away mid-answer (a closed tab),
    which is routine."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


class _Channel(HTTPChannel):
    logger = _RoutineAtDebug(logging.getLogger("waitress"))


def _idle(channel: HTTPChannel) -> bool:
    """No request in progress and nothing left to send (a partial request counts as idle)."""
    return not (channel.requests or channel.total_outbufs_len or channel.close_when_flushed)


class CappedServer(TcpWSGIServer):
    """waitress's TCP server on a bound socket, with the connection policy above."""

    channel_class = _Channel
    next_channel_cleanup: float = 0.0  # when readable() next runs the idle sweep

    def __init__(self, app: Callable[..., Any], sock: socket.socket, *, threads: int,
                 max_connections: int, idle_seconds: float, **adjustments: Any) -> None:
        self.max_connections = max_connections
        self.idle_seconds = idle_seconds
        self._sweep_seconds = min(idle_seconds / 2, 1.0)
        self._stopping = threading.Event()
        self._shed = 0
        self._shed_logged_at = float("-inf")
        adj = Adjustments(sockets=[sock], threads=threads, **adjustments)
        sockinfo = (sock.family, sock.type, sock.proto, sock.getsockname())
        super().__init__(app, map={}, _sock=sock, adj=adj, bind_socket=False,
                         sockinfo=sockinfo)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def run(self) -> None:
        """Serve until stop() (waitress's run() serves until its map is empty). poll(), not
        select(): the node's descriptors may number past select's 1024."""
        while not self._stopping.is_set():
            wasyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._map,
                           use_poll=True, count=1)

    def stop(self) -> None:
        """Ask run() to return; the trigger wakes the loop from its poll."""
        self._stopping.set()
        self.pull_trigger()

    def close_all(self, timeout: float) -> None:
        """Stop the request threads (waiting up to ``timeout`` for requests in progress) and
        close every socket; call once run() has returned."""
        self.task_dispatcher.shutdown(timeout=timeout)
        wasyncore.close_all(self._map)

    # The event loop's calls (its thread only) ------------------------------------------

    def readable(self) -> bool:
        """Always accept: handle_accept applies the cap. Also where the idle sweep runs, as
        waitress's readable() does, since the loop asks it on every pass."""
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self._sweep_seconds
            self.maintenance(now)
        return bool(self.accepting)

    def maintenance(self, now: float) -> None:
        """Close the connections silent for idle_seconds (waitress's channel_timeout is whole
        seconds)."""
        cutoff = now - self.idle_seconds
        for channel in self.active_channels.values():
            if _idle(channel) and channel.last_activity < cutoff:
                channel.will_close = True  # the loop closes it on its next pass

    def handle_accept(self) -> None:
        if len(self.active_channels) >= self.max_connections and not self._make_room():
            self._refuse()
            return
        super().handle_accept()

    def _make_room(self) -> bool:
        idle = [channel for channel in self.active_channels.values() if _idle(channel)]
        if not idle:
            return False
        min(idle, key=lambda channel: channel.last_activity).handle_close()
        self._note_shed()
        return True

    def _refuse(self) -> None:
        accepted = self.accept()
        if accepted is None:
            return
        connection = accepted[0]
        try:
            connection.setblocking(False)  # never wait on a client in the event loop
            connection.send(_BUSY)
            connection.shutdown(socket.SHUT_WR)
            connection.recv(65536)  # what the client sent already: a close with unread
        except OSError:             # data would reset the connection before it reads 503
            pass
        connection.close()
        self._note_shed()

    def _note_shed(self) -> None:
        self._shed += 1
        now = time.monotonic()
        if now - self._shed_logged_at < _SHED_LOG_SECONDS:
            return
        shed, self._shed, self._shed_logged_at = self._shed, 0, now
        log.warning("HTTP connections closed: http.max_connections reached",
                    extra={"connections": shed})
