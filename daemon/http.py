"""The node's HTTP endpoint (loopback by default): /metrics for Prometheus, /healthz (the
process answers), /readyz (database, a worker with its model loaded, disk space, SCP), and
the status pages (daemon/web) on every other path.

The standard library's threading server is enough for a scrape every few seconds and an
administrator's browser; every handler's dependencies are bound, not global. When
credentials are configured (http.password_file, http.token_file) /metrics and the pages
need them; the probes stay open.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from denoised_node.config.settings import ConfigError, HttpSettings
from denoised_node.daemon.web.auth import Guard, Verdict
from denoised_node.daemon.web.request import MAX_FORM_BYTES, Request, Response

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str


# A health or readiness probe: a quick call that says ok or not, and why (doctor.Check is the
# slower, fuller finding `denoised-node doctor` prints).
Probe = Callable[[], CheckResult]


class Readiness:
    """Named checks; ready when every one passes. A check that raises has failed."""

    def __init__(self, checks: Sequence[tuple[str, Probe]]) -> None:
        self.checks = list(checks)

    def report(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        results: dict[str, dict[str, Any]] = {}
        for name, check in self.checks:
            try:
                result = check()
            except Exception as exc:  # noqa: BLE001 - a failing check is a finding, not a crash
                result = CheckResult(False, f"{type(exc).__name__}: {exc}".splitlines()[0])
            results[name] = {"ok": result.ok, "detail": result.detail}
        return all(r["ok"] for r in results.values()), results


class Pages(Protocol):
    """The status pages (daemon.web.pages.StatusPages)."""

    def handle(self, request: Request) -> Response: ...


_PROBES = ("/healthz", "/readyz")


class _Handler(BaseHTTPRequestHandler):
    server_version = "denoised-node"

    def __init__(self, *args: Any, registry: CollectorRegistry, readiness: Readiness,
                 guard: Guard, pages: Pages | None, timeout: float, **kwargs: Any) -> None:
        self.registry = registry
        self.readiness = readiness
        self.guard = guard
        self.pages = pages
        # Every read and write of the connection (StreamRequestHandler.setup applies it).
        self.timeout = timeout  # type: ignore[misc]
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            ready, checks = self.readiness.report()
            body = json.dumps({"ready": ready, "checks": checks}, indent=1).encode() + b"\n"
            self._send(200 if ready else 503, body, "application/json")
        elif (verdict := self._admit()) is None:
            return
        elif path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif self.pages is not None:
            self._respond(self.pages.handle(self._request(verdict.user, b"")))
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n",
                       "text/plain; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802 - the standard library's name
        if (verdict := self._admit()) is None:
            return
        length = self.headers.get("Content-Length", "0")
        if self.pages is None or self.path.split("?", 1)[0] in (*_PROBES, "/metrics"):
            self._send(405, b"method not allowed\n", "text/plain; charset=utf-8")
        elif not length.isdigit() or int(length) > MAX_FORM_BYTES:
            self._send(413, b"a form of at most 64 KiB, with its Content-Length\n",
                       "text/plain; charset=utf-8")
        else:
            body = self.rfile.read(int(length))
            self._respond(self.pages.handle(self._request(verdict.user, body)))

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        request_read = getattr(self.server, "request_read", None)
        if request_read is not None:
            request_read(self.connection)
        return parsed

    def _admit(self) -> Verdict | None:
        """The guard's verdict when the request may go on; None once it was refused."""
        verdict = self.guard.check({k.lower(): v for k, v in self.headers.items()})
        if verdict.allowed:
            return verdict
        extra = (("WWW-Authenticate", self.guard.challenge()),) if verdict.status == 401 else ()
        self._respond(Response(verdict.status, (verdict.reason + "\n").encode(),
                               "text/plain; charset=utf-8", extra))
        return None

    def _request(self, user: str | None, body: bytes) -> Request:
        return Request.build(self.command, self.path, dict(self.headers.items()), body, user)

    def _respond(self, response: Response) -> None:
        self.send_response(response.status)
        for name, value in response.all_headers():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s", format % args)  # every scrape at INFO would drown the log


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 21\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
         b"too many connections\n")


class _CappedServer(ThreadingHTTPServer):
    """At most ``max_connections`` connections at once, so that a flood of connections never
    takes the descriptors the DICOM side needs. Past the cap, the connection that has waited
    longest without sending a whole request is closed to make room (a probe sends its
    request at once, an idle flood does not); when every connection is busy with a request,
    the new one is answered 503 from the accept loop and closed."""

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._open = 0  # connections with a thread, not counting those told to close
        self._waiting: dict[socket.socket, None] = {}  # no whole request yet, oldest first
        self._closing: set[socket.socket] = set()
        self._shed = 0
        self._shed_logged_at = 0.0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            victim = None
            if self._open >= self._max_connections:
                victim = next(iter(self._waiting), None)
                if victim is None:
                    refuse = True
                else:
                    refuse = False
                    del self._waiting[victim]
                    self._closing.add(victim)
                    self._open -= 1
            else:
                refuse = False
            if not refuse:
                self._open += 1
                self._waiting[request] = None
        if victim is not None:
            _shut(victim)
        if refuse:
            self._refuse(request)
        if victim is not None or refuse:
            self._note_shed()
        if refuse:
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._finished(request)
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line, not the standard library's traceback on stderr: a browser that
        goes away mid-answer is routine (DEBUG); anything else is a bug worth its stack."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("http client went away: %s", type(exc).__name__)
            return
        log.exception("http request failed", extra={"peer_address": str(client_address[0])})

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._finished(request)

    def request_read(self, connection: socket.socket) -> None:
        """The handler has its request line and headers: no longer a candidate to close."""
        with self._lock:
            self._waiting.pop(connection, None)

    def _finished(self, request: socket.socket) -> None:
        with self._lock:
            if request in self._closing:
                self._closing.discard(request)
            else:
                self._open -= 1
                self._waiting.pop(request, None)

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)  # never wait on a client in the accept loop
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def _note_shed(self) -> None:
        with self._lock:
            self._shed += 1
            now = time.monotonic()
            if now - self._shed_logged_at < 10.0:
                return
            shed, self._shed, self._shed_logged_at = self._shed, 0, now
        log.warning("HTTP connections closed: http.max_connections reached",
                    extra={"connections": shed})


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)  # its thread's read returns; it closes it
    except OSError:
        pass


class _IPv6Server(_CappedServer):
    address_family = socket.AF_INET6


class StatusServer:
    """The HTTP server on its own thread."""

    def __init__(self, settings: HttpSettings, registry: CollectorRegistry,
                 readiness: Readiness, pages: Pages | None = None) -> None:
        guard = Guard(settings)  # reads the credential files: a ConfigError before binding
        handler = partial(_Handler, registry=registry, readiness=readiness, guard=guard,
                          pages=pages, timeout=settings.request_timeout)
        self._paths = "/metrics /healthz /readyz" + (" and the status pages" if pages else "")
        try:
            kind = _IPv6Server if ":" in settings.host else _CappedServer
            self._server = kind((settings.host, settings.port), handler,
                                settings.max_connections)
        except OSError as exc:
            raise ConfigError(f"cannot serve HTTP on {settings.host}:{settings.port} "
                              f"(http.host, http.port): {exc.strerror or exc}; choose another "
                              "address or port, or set http.enabled = false") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("HTTP endpoint listening", extra={"host": self._server.server_address[0],
                                                   "port": self.port,
                                                   "paths": self._paths})
        return self

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
