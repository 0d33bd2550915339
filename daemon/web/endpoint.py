"""The node's HTTP endpoint (loopback by default): /metrics for Prometheus, /healthz (the
process answers), /readyz (database, a worker with its model loaded, disk space, SCP), and
the status pages (daemon/web) on every other path.

The application (app.py) is served by waitress on a thread of its own, with the node's
limits on connections (server.py). When credentials are configured (http.password_file,
http.token_file) /metrics and the pages need them; the probes stay open.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry

from denoised_node.config.settings import ConfigError, HttpSettings
from denoised_node.daemon.web.app import HttpApp, Pages, Stow
from denoised_node.daemon.web.auth import Guard
from denoised_node.daemon.web.probes import Readiness
from denoised_node.daemon.web.request import MAX_FORM_BYTES
from denoised_node.daemon.web.server import CappedServer, bind

log = logging.getLogger(__name__)


# At most this many requests are worked on at once; a connection holds a thread only while
# its request is worked on, so a browser fetching a page's pictures leaves some for probes.
_THREADS = 8
MAX_HEADER_BYTES = 64 * 1024  # the request line and headers (no cookies here)
_SHUTDOWN_SECONDS = 2.0  # for requests in progress to finish at shutdown


class StatusServer:
    """The HTTP server on its own thread."""

    def __init__(self, settings: HttpSettings, registry: CollectorRegistry,
                 readiness: Readiness, pages: Pages | None = None,
                 stow: Stow | None = None) -> None:
        guard = Guard(settings)  # reads the credential files: a ConfigError before binding
        app = HttpApp(registry, readiness, guard, pages, stow)
        self._paths = ("/metrics /healthz /readyz" + (" and the status pages" if pages else "")
                       + (", STOW-RS at /dicom-web/studies" if stow else ""))
        # A STOW-RS body may be large: waitress keeps one past 512 KiB in a temporary file
        # (never in memory) until it is whole; forms stay small (http_app.py checks them).
        max_body = settings.max_stow_mb * 2**20 if stow is not None else MAX_FORM_BYTES
        try:
            sock = bind(settings.host, settings.port)
        except OSError as exc:
            raise ConfigError(f"cannot serve HTTP on {settings.host}:{settings.port} "
                              f"(http.host, http.port): {exc.strerror or exc}; choose another "
                              "address or port, or set http.enabled = false") from None
        self._server = CappedServer(
            app, sock, threads=min(_THREADS, settings.max_connections),
            max_connections=settings.max_connections, idle_seconds=settings.request_timeout,
            max_request_body_size=max_body, max_request_header_size=MAX_HEADER_BYTES,
            ident="denoised-node",
            log_socket_errors=False)  # a client that resets its connection is routine
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("HTTP endpoint listening", extra={"host": self._server.effective_host,
                                                   "port": self.port,
                                                   "paths": self._paths})
        return self

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._server.stop()
            self._thread.join(timeout=_SHUTDOWN_SECONDS)
        self._server.close_all(timeout=_SHUTDOWN_SECONDS)
